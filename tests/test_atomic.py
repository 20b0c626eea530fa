"""embedstore.atomic: replacing files and folders never loses the old version or touches what is not ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from embedstore import atomic
from embedstore.errors import ConfigError


def _write_run(out, text, overwrite=False):
    with atomic.replacing_folder(out, overwrite=overwrite, kind="probe") as staging:
        (staging / "result.txt").write_text(text)


def test_a_folder_is_replaced_whole_and_marked(tmp_path):
    out = tmp_path / "run"
    _write_run(out, "one")
    _write_run(out, "two", overwrite=True)
    assert (out / "result.txt").read_text() == "two"
    assert json.loads((out / atomic.MARKER).read_text()) == {"kind": "probe"}
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_an_existing_run_needs_overwrite(tmp_path):
    out = tmp_path / "run"
    _write_run(out, "one")
    with pytest.raises(ConfigError, match="--overwrite"):
        _write_run(out, "two")
    assert (out / "result.txt").read_text() == "one"


@pytest.mark.parametrize("make", ["notes", "store", "file"])
def test_what_embedstore_did_not_write_is_never_replaced(tmp_path, make):
    out = tmp_path / "target"
    if make == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / ("zarr.json" if make == "store" else "notes.txt")).write_text("{}")
    with pytest.raises(ConfigError, match="did not write|not a run folder"):
        _write_run(out, "x", overwrite=True)
    assert out.exists() and (out.read_text() if out.is_file() else os.listdir(out))


def test_a_failing_block_leaves_the_old_folder_and_no_staging(tmp_path):
    out = tmp_path / "run"
    _write_run(out, "one")
    with pytest.raises(RuntimeError):
        with atomic.replacing_folder(out, overwrite=True, kind="probe") as staging:
            (staging / "result.txt").write_text("half")
            raise RuntimeError("boom")
    assert (out / "result.txt").read_text() == "one"
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_older_run_folders_count_as_ours(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"format": 1, "kind": "match"}))
    _write_run(out, "new", overwrite=True)
    assert (out / "result.txt").read_text() == "new"


def test_leftovers_of_dead_processes_are_cleaned_and_a_parked_original_restored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "run"
    staging = tmp_path / f".run.embedstore-tmp-{pid}-abc123"
    parked = tmp_path / f".run.embedstore-old-{pid}-def456"
    staging.mkdir()
    parked.mkdir()
    (parked / "result.txt").write_text("original")
    mine = tmp_path / f".run.embedstore-tmp-{os.getpid()}-live00"  # a live process's staging stays
    mine.mkdir()
    atomic.clean_stale(out)
    assert (out / "result.txt").read_text() == "original"
    assert sorted(os.listdir(tmp_path)) == sorted(["run", mine.name])


def test_write_file_replaces_atomically(tmp_path):
    path = tmp_path / "a" / "table.txt"
    atomic.write_text(path, "v1")
    with pytest.raises(ValueError):
        atomic.write_file(path, lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(ValueError("x"))))
    assert path.read_text() == "v1"
    assert os.listdir(path.parent) == ["table.txt"]
