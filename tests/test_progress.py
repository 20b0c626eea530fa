"""Progress in a log file: plain lines at every 10 % step and every few seconds, not a bar drawn once at the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from embedstore import progress
from embedstore.errors import ConfigError
from embedstore.progress import SECONDS_ENV, progress_bar

LINE = re.compile(r"^(?P<what>.+): (?P<done>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\) [\d,.]+ (?P<unit>\w+)/s, "
                  r"\d+:\d\d:\d\d elapsed(, eta \d+:\d\d:\d\d)?$")


def _lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def test_extract_with_stderr_in_a_log_file_writes_progress_lines(tmp_path, ham_root):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((ham_root / "images").glob("*.jpg"))[:12]:
        (images / path.name).write_bytes(path.read_bytes())
    log = tmp_path / "extract.log"
    env = {k: v for k, v in os.environ.items() if k != SECONDS_ENV}  # the default: every 10 % and every 5 s
    with log.open("w") as stderr:
        proc = subprocess.run([sys.executable, "-m", "embedstore.cli", "extract", images, "-s", tmp_path / "s.zarr",
                               "-b", "4", "-j", "0", "--device", "cpu"], stdout=subprocess.PIPE, stderr=stderr,
                              text=True, env=env, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "12 written" in proc.stdout
    lines = _lines(text)
    hashing = [(int(m["done"]), m["unit"]) for m in lines if m["what"] == "hashing"]
    assert hashing[-1] == (12, "images") and len(hashing) >= 9  # every 10 % step of 12 images
    extracting = [m for m in lines if m["what"] == "extracting mobilenet_v2"]
    assert [int(m["done"]) for m in extracting] == [4, 8, 12]  # one line per batch of 4: each is a 10 % step
    assert [int(m["pct"]) for m in extracting] == [33, 66, 100]
    assert ", eta " in extracting[0].group(0) and ", eta " not in extracting[-1].group(0)
    assert "━" not in text and "\r" not in text  # no bar drawn into the log


def test_lines_come_every_ten_percent_and_a_final_line_says_where_the_loop_ended(capsys, monkeypatch):
    monkeypatch.setenv(SECONDS_ENV, "1000")
    with progress_bar("scoring", 1000, unit="pairs") as advance:
        for _ in range(1000):
            advance()
    done = [int(m["done"]) for m in _lines(capsys.readouterr().err)]
    assert done == list(range(100, 1001, 100))  # the 100 % line is the final one: not repeated
    with pytest.raises(KeyError):
        with progress_bar("scoring", 1000, unit="pairs") as advance:
            advance(42)
            advance(0, "scoring, fold 2")
            raise KeyError("stopped")
    lines = _lines(capsys.readouterr().err)
    assert [(m["what"], int(m["done"]), m["unit"]) for m in lines] == [("scoring, fold 2", 42, "pairs")]


def test_lines_come_at_most_every_interval_between_steps(capsys, monkeypatch):
    clock = iter(range(0, 1000, 2))  # each reading two seconds later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setenv(SECONDS_ENV, "5")
    with progress_bar("hashing", 1000) as advance:
        for _ in range(20):  # 2 % of the work: no 10 % step
            advance()
    lines = _lines(capsys.readouterr().err)
    # started at 0 s; advances at 2, 4, 6 ... 40 s; a line once 5 s have passed since the last: 6, 12, ... 36 s,
    # and the final line at 42 s
    assert [int(m["done"]) for m in lines] == [3, 6, 9, 12, 15, 18, 20]
    assert lines[-1].group(0).endswith("0:00:42 elapsed, eta 0:34:18")


def test_a_bad_interval_is_one_line(monkeypatch):
    monkeypatch.setenv(SECONDS_ENV, "often")
    with pytest.raises(ConfigError, match=f"{SECONDS_ENV} must be a number of seconds"):
        with progress_bar("hashing", 10):
            pass


def test_nothing_is_written_when_disabled_or_empty(capsys):
    for enabled, total in ((False, 10), (True, 0)):
        with progress_bar("hashing", total, enabled=enabled) as advance:
            advance(3, "ignored")
    assert capsys.readouterr().err == ""
