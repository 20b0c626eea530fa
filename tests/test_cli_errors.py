"""The console script as a user meets it: every mistake on the command line is one line on stderr and exit 2.

Each case runs the installed ``embedstore`` script in a fresh process, so nothing in-process (a test
runner, a caught exception) can hide a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("embedstore")


def embedstore(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command (asserting exit 2 and no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (("query",), "Missing argument 'store'"),
    (("ls",), "Missing argument 'store'"),
    (("ls", "x.zarr", "--bogus"), "No such option: --bogus"),
    (("extract", "x.csv", "--batch-size", "abc"), "'--batch-size'"),
    (("nosuchcommand",), "No such command 'nosuchcommand'"),
])
def test_usage_errors_are_one_line_with_exit_2(args, says):
    line = one_line(embedstore(*args))
    assert says in line and "--help" in line


def test_bare_command_prints_the_help_and_exits_2():
    proc = embedstore()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "extract" in proc.stdout + proc.stderr  # the commands are listed
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no command given")


def test_help_exits_0():
    proc = embedstore("match", "--help")
    assert proc.returncode == 0 and "--out" in proc.stdout and proc.stderr == ""


def test_offline_hub_encoder_fails_in_one_line_naming_weights(ham_root, tmp_path):
    """No network (here: a hub endpoint nothing listens on) and nothing cached: one line, no retries."""
    csv = tmp_path / "one.csv"
    csv.write_text("image_id,dx\nISIC_0027419,bkl\n")
    hub = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "",
           **dict.fromkeys(("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"), "")}
    line = one_line(embedstore("extract", csv, "--images", ham_root / "images", "--id-col", "image_id",
                               "--store", tmp_path / "s.zarr", "--encoder", "dinov2_vits14", env=hub))
    assert "dinov2_vits14" in line and "--weights FILE" in line and "cannot be reached" in line


@pytest.mark.parametrize("args, says", [
    (("--trials", "-1"), "--trials"),
    (("--encoder", "dinov2_vits14"), "offline"),
])
def test_bad_demo_options_fail_before_any_extraction(args, says, tmp_path):
    line = one_line(embedstore("demo", "--store", tmp_path / "demo.zarr", "--runs", tmp_path / "runs", *args))
    assert says in line
    assert not (tmp_path / "demo.zarr").exists() and not (tmp_path / "runs").exists()


def test_demo_refuses_run_folders_it_did_not_write_before_extracting(tmp_path):
    (tmp_path / "runs" / "demo-match").mkdir(parents=True)
    (tmp_path / "runs" / "demo-match" / "notes.txt").write_text("mine")
    line = one_line(embedstore("demo", "--store", tmp_path / "demo.zarr", "--runs", tmp_path / "runs"))
    assert "did not write" in line and not (tmp_path / "demo.zarr").exists()
    assert (tmp_path / "runs" / "demo-match" / "notes.txt").read_text() == "mine"
