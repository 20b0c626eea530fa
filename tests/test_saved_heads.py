"""Saved heads (issue #10, item 1): a head folder received from someone else never runs code on load.

Every head kind is saved by a real probe on the HAM10000 subset store and applied again by `embedstore predict`,
which must give the run's own test predictions; pickles (the format of older embedstore versions), files that
are no skops archive and skops archives naming types outside the allowlist are refused in one line, unrun.
"""

from __future__ import annotations

import collections
import os
import pickle
import shutil
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import skops.io as sio
from sklearn.preprocessing import FunctionTransformer

from embedstore.heads.saved import TRUSTED
from embedstore.probe import ProbeConfig, run_probe

FAST = {"features": ["mobilenet_v2"], "target": "dx", "groups": "lesion_id", "holdout": 0.25, "folds": 2,
        "n_boot": 20, "tsne_max": 100, "report": False}
META = ["age", "sex", "localization"]
KINDS = {
    "logreg": {"heads": ["logreg"]},
    "svm": {"heads": ["svm"]},
    "knn": {"heads": ["knn"]},
    "mlp": {"heads": ["mlp"], "params": {"mlp": {"hidden": 32, "max_iter": 60}}},
    "lgbm-metadata": {"heads": ["lgbm"], "metadata": META, "params": {"lgbm": {"n_estimators": 20, "pca": 8}}},
    "stack": {"heads": ["stack"], "stack_heads": ["knn"], "stack_joint": ["lgbm"], "metadata": META,
              "params": {"lgbm": {"n_estimators": 20, "pca": 8}}},
    "balanced-decision": {"heads": ["logreg"], "decision": "balanced"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("saved-heads")


def _probe(ham_store, runs: Path, kind: str) -> Path:
    out = runs / kind
    if not out.exists():
        run_probe(ProbeConfig.from_dict({"store": str(ham_store), "out": str(out), **FAST, **KINDS[kind]}))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_every_head_kind_round_trips_through_predict(kind, ham_store, runs, cli, tmp_path):
    run = _probe(ham_store, runs, kind)
    head = run / "head"
    assert (head / "model.skops").is_file() and not (head / "model.joblib").exists()
    assert set(sio.get_untrusted_types(file=head / "model.skops")) <= TRUSTED
    code, out, err = cli("predict", head, ham_store, "--out", tmp_path / "pred.parquet")
    assert code == 0, err
    pred = pd.read_parquet(tmp_path / "pred.parquet").set_index("id")
    ours = pd.read_parquet(run / "predictions.parquet").query("split == 'test'").set_index("id")
    probs = [c for c in ours.columns if c.startswith("p_")]
    assert len(ours) > 50
    # The same numbers, up to float32 rounding (predict does not limit BLAS threads as the probe does).
    np.testing.assert_allclose(pred.loc[ours.index, probs].to_numpy(), ours[probs].to_numpy(), rtol=0, atol=1e-5)
    assert (pred.loc[ours.index, "y_pred"] == ours["y_pred"]).all()


class _Payload:
    """A pickle that runs a shell command when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _received_head(ham_store, runs, tmp_path) -> Path:
    """A copy of a real saved head whose model file the test replaces."""
    head = tmp_path / "received"
    shutil.copytree(_probe(ham_store, runs, "logreg") / "head", head)
    for name in ("model.skops", "model.joblib"):  # (the latter: a head of an older embedstore)
        (head / name).unlink(missing_ok=True)
    return head


def test_a_pickled_head_of_an_older_version_is_refused_unopened(ham_store, runs, cli, tmp_path):
    head = _received_head(ham_store, runs, tmp_path)
    joblib.dump(_Payload(tmp_path / "ran"), head / "model.joblib")
    code, out, err = cli("predict", head, ham_store, "--out", tmp_path / "pred.csv")
    assert code == 2 and err.count("\n") == 1 and "pickle" in err and "older embedstore" in err, err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "pred.csv").exists()
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))  # the payload is live: loading it runs it
    assert (tmp_path / "control").exists()


def test_a_pickle_named_model_skops_is_refused_unopened(ham_store, runs, cli, tmp_path):
    head = _received_head(ham_store, runs, tmp_path)
    joblib.dump(_Payload(tmp_path / "ran"), head / "model.skops")
    code, out, err = cli("predict", head, ham_store, "--out", tmp_path / "pred.csv")
    assert code == 2 and err.count("\n") == 1 and "not a readable saved head" in err, err
    assert not (tmp_path / "ran").exists()


class _Planted(collections.OrderedDict):
    """A type no saved head contains."""


@pytest.mark.parametrize("planted, name", [
    (FunctionTransformer(os.system), "system"),
    (_Planted(a=1), "_Planted"),
])
def test_a_skops_file_naming_an_untrusted_type_is_refused(planted, name, ham_store, runs, cli, tmp_path):
    head = _received_head(ham_store, runs, tmp_path)
    sio.dump(planted, head / "model.skops")
    code, out, err = cli("predict", head, ham_store, "--out", tmp_path / "pred.csv")
    assert code == 2 and err.count("\n") == 1 and "refusing to load" in err and name in err, err
    assert not (tmp_path / "pred.csv").exists()


def test_a_damaged_model_card_is_one_line(ham_store, runs, cli, tmp_path):
    head = tmp_path / "head"
    shutil.copytree(_probe(ham_store, runs, "logreg") / "head", head)
    (head / "model_card.json").write_text('{"features": [')
    code, _, err = cli("predict", head, ham_store, "--out", tmp_path / "pred.csv")
    assert code == 2 and err.count("\n") == 1 and "not valid JSON" in err, err
