"""`probe --out` (issue #10, item 2): a run folder replaces only a run folder, only with --overwrite, and a kill
at any moment leaves the old run or the new one, whole.

Refusals are checked before any model is fitted: the tests make fitting fail loudly, so a refusal that came
after it would show.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from embedstore.probe import Probe
from embedstore.store import FeatureStore
from processes import run_embedstore

OPTS = ("-f", "mobilenet_v2", "-t", "dx", "-g", "lesion_id", "--folds", "2", "--n-boot", "20", "--no-report")


@pytest.fixture
def no_fitting(monkeypatch):
    """Fitting any model fails the test: a refusal must come first."""
    def fitted(*args, **kwargs):
        raise AssertionError("a model was fitted before --out was checked")
    monkeypatch.setattr(Probe, "evaluate_model", fitted)


@pytest.fixture(scope="module")
def first_run(ham_store, tmp_path_factory) -> Path:
    """A real probe run folder (C=1), written by a subprocess like a user's shell would."""
    out = tmp_path_factory.mktemp("runs") / "probe"
    proc = run_embedstore("probe", ham_store, *OPTS, "-p", "logreg.C=1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_with_the_users_files_is_never_replaced(overwrite, ham_store, cli, no_fitting, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.md").write_text("six months of notes\n")
    code, _, err = cli("probe", ham_store, *OPTS, "--out", notes, *overwrite)
    assert code == 2 and err.count("\n") == 1 and "did not write" in err, err
    assert _snapshot(notes) == {"thesis.md": b"six months of notes\n"}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_the_store_itself_is_never_replaced(overwrite, ham_store, cli, no_fitting, tmp_path):
    store = tmp_path / "x.zarr"
    shutil.copytree(ham_store, store)
    before = _snapshot(store)
    code, _, err = cli("probe", store, *OPTS, "--out", store, *overwrite)
    assert code == 2 and err.count("\n") == 1 and "did not write" in err, err
    assert _snapshot(store) == before
    assert len(FeatureStore.open(store).load("mobilenet_v2")[0]) > 300


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_the_working_directory_is_never_replaced(overwrite, ham_store, cli, no_fitting, tmp_path):
    (tmp_path / "data.csv").write_text("id,label\n1,a\n")
    code, _, err = cli("probe", ham_store, *OPTS, "--out", ".", *overwrite, cwd=tmp_path)
    assert code == 2 and err.count("\n") == 1 and "the folder you are working in" in err, err
    assert (tmp_path / "data.csv").read_text() == "id,label\n1,a\n"
    empty = tmp_path / "empty"  # an empty working directory too, and any folder holding it
    empty.mkdir()
    for out in (".", ".."):
        code, _, err = cli("probe", ham_store, *OPTS, "--out", out, *overwrite, cwd=empty)
        assert code == 2 and err.count("\n") == 1 and "the folder you are working in" in err, err
    assert empty.is_dir()


def test_a_run_folder_under_a_file_is_one_line_before_fitting(ham_store, cli, no_fitting, tmp_path):
    (tmp_path / "table.csv").write_text("a\n")
    code, _, err = cli("probe", ham_store, *OPTS, "--out", tmp_path / "table.csv" / "run")
    assert code == 2 and err.count("\n") == 1 and "is a file, not a folder" in err, err


def test_predict_never_writes_into_a_store_and_an_unwritable_path_is_one_line(first_run, ham_store, cli, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(ham_store, store)
    before = (store / "manifest.parquet").read_bytes()
    code, _, err = cli("predict", first_run / "head", store, "--out", store / "manifest.parquet")
    assert code == 2 and err.count("\n") == 1 and "inside the zarr store" in err, err
    assert (store / "manifest.parquet").read_bytes() == before
    code, _, err = cli("predict", first_run / "head", store, "--out", "/proc/predictions.csv")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err


def test_a_previous_run_is_replaced_only_with_overwrite(first_run, ham_store, cli, no_fitting):
    before = _snapshot(first_run)
    code, _, err = cli("probe", ham_store, *OPTS, "--out", first_run)
    assert code == 2 and err.count("\n") == 1 and "--overwrite" in err, err
    assert _snapshot(first_run) == before


def test_the_default_run_folder_follows_the_same_rule(ham_store, cli, no_fitting, tmp_path):
    old = tmp_path / "runs" / "probe"
    old.mkdir(parents=True)
    (old / "run.json").write_text(json.dumps({"format": 1, "kind": "probe"}))
    code, _, err = cli("probe", ham_store, *OPTS, cwd=tmp_path)
    assert code == 2 and "runs/probe already exists" in err and "--overwrite" in err, err
    assert (old / "run.json").is_file()


def test_a_kill_while_replacing_keeps_the_old_run_and_the_next_run_replaces_it(first_run, ham_store, tmp_path):
    runs = tmp_path / "runs"
    out = runs / "probe"
    shutil.copytree(first_run, out)
    before = _snapshot(out)
    proc = run_embedstore("probe", ham_store, *OPTS, "-p", "logreg.C=0.1", "--out", out, "--overwrite",
                       fault="folder-replace")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _snapshot(out) == before  # the old run, whole
    assert [p.name for p in runs.iterdir() if p.name != "probe"]  # the killed run's staging copy, hidden
    proc = run_embedstore("probe", ham_store, *OPTS, "-p", "logreg.C=0.1", "--out", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in runs.iterdir()] == ["probe"]  # leftover cleaned
    config = (out / "config.yaml").read_text()
    assert "C: 0.1" in config and (out / "head" / "model.skops").is_file()
