"""Every run folder that probe and match write round-trips through ``read_run``, and the report reads a run
folder only through it (``embedstore.runs.folder``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from embedstore.match.config import MatchConfig
from embedstore.match.run import run_match
from embedstore.probe import ProbeConfig, run_probe
from embedstore.runs import Metrics, RunRecord, read_run
from embedstore.runs.record import MatchRecord, ProbeRecord

PROBES = {
    "plain": {"features": "mobilenet_v2", "heads": "logreg"},
    "compared": {"features": "mobilenet_v2,efficientnet_lite0", "heads": "logreg,knn"},
    "stack-binary-holdout": {"features": "mobilenet_v2+efficientnet_lite0", "heads": "stack", "positive": "mel",
                             "holdout": 0.25, "stack_joint": "lgbm", "metadata": "age,sex",
                             "params": {"lgbm": {"n_estimators": 20}}},
    "tuned": {"features": "mobilenet_v2", "heads": "knn", "trials": 2, "folds": 3},
}
MATCHES = {
    "threshold": {"method": "threshold"},
    "agglomerative": {"method": "agglomerative", "folds": 3},
    "projection": {"projection": "triplet", "head": {"epochs": 2}, "write_features": False},
}


def _probe(ham_store, out: Path, report: bool = False, **options):
    cfg = ProbeConfig.from_dict({"store": str(ham_store), "target": "dx", "groups": "lesion_id", "n_boot": 30,
                                 "tsne_max": 100, "report": report, "out": str(out),
                                 "storage": f"sqlite:///{out.parent / 'studies.db'}", **options})
    return run_probe(cfg)


def _match(ham_store, out: Path, report: bool = False, **options):
    cfg = MatchConfig.from_dict({"store": str(ham_store), "features": "mobilenet_v2", "groups": "lesion_id",
                                 "n_boot": 30, "report": report, "out": str(out), **options})
    return run_match(cfg)


def _assert_round_trip(run, folder: Path, record_type) -> None:
    again = read_run(folder)
    assert isinstance(again.record, record_type) and again.kind == record_type.kind
    assert again.record == run.record and again.metrics == run.metrics
    written = json.loads((folder / "run.json").read_text())
    assert RunRecord.from_dict(written).to_dict() == written  # no field of the file is lost or invented
    metrics = json.loads((folder / "metrics.json").read_text())
    assert Metrics.from_dict(metrics).to_dict() == metrics
    assert again.metrics.headline and set(again.metrics.headline) <= set(again.metrics.metrics)


@pytest.mark.parametrize("name", PROBES)
def test_every_probe_run_folder_round_trips_through_read_run(name, ham_store, tmp_path):
    folder = tmp_path / name
    run = _probe(ham_store, folder, **PROBES[name])
    _assert_round_trip(run, folder, ProbeRecord)
    assert list(run.record.models) == list(run.metrics.models) or run.record.head == "stack"


@pytest.mark.parametrize("name", MATCHES)
def test_every_match_run_folder_round_trips_through_read_run(name, ham_store, tmp_path):
    folder = tmp_path / name
    run = _match(ham_store, folder, **MATCHES[name])
    _assert_round_trip(run, folder, MatchRecord)
    assert run.metrics.evaluated_on == "cv" and run.record.parameter


@pytest.fixture
def reads_of(monkeypatch):
    """Record every file opened for reading under a folder, with whether the read went through
    ``embedstore/runs/folder.py`` (read_run or Run.table)."""
    seen: list[tuple[str, bool]] = []
    watched: list[Path] = []
    runs_module = str(Path(sys.modules["embedstore.runs.folder"].__file__))

    def hook(event, args):
        if event != "open" or not watched or not isinstance(args[0], (str, Path)):
            return
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        path = Path(args[0]).absolute()
        writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes or not path.is_file() or not any(path.is_relative_to(w) for w in watched):
            return  # a write, a folder opened to sync it, or a file that is not there: only reads of files count
        frame, through = sys._getframe(1), False
        while frame is not None and not through:
            through = frame.f_code.co_filename == runs_module
            frame = frame.f_back
        seen.append((path.name, through))

    sys.addaudithook(hook)  # an audit hook cannot be removed: it does nothing once `watched` is empty
    yield lambda folder: watched.append(Path(folder).absolute()) or seen
    watched.clear()


def test_the_report_reads_a_run_folder_only_through_read_run(ham_store, tmp_path, reads_of):
    from embedstore.report import write_report

    for folder, make in ((tmp_path / "probe", _probe), (tmp_path / "match", _match)):
        make(ham_store, folder, **({"heads": "logreg", "features": "mobilenet_v2"} if make is _probe else {}))
        seen = reads_of(folder)
        write_report(folder)
        assert {"run.json", "metrics.json"} <= {name for name, _ in seen}
        assert [name for name, through in seen if not through] == []
        seen.clear()
