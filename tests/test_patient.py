"""Patient context (--patient-features) and top-15 sensitivity, on real HAM10000 features.

HAM10000 has no patient ids. The context's arithmetic is checked with its lesion ids as the grouping column (several
images each, as a patient's lesions), the metric with the body site (many images each, so the top 15 of a "patient"
is a real cut)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from embedstore.metrics import top_k_sensitivity_by_patient
from embedstore.probe import patient as patient_module
from embedstore.probe.data import feature_frame
from embedstore.store import FeatureStore


def test_each_head_reads_the_context_of_its_own_feature_sets():
    context = patient_module.context_columns(["a", "b"], ["age"])
    assert patient_module.columns_for(context, ["b"]) == ["patient_images", "patient_distance.b", "patient_rank.b",
                                                          "patient_z.age"]


def test_missing_patient_ids_are_patients_of_their_own():
    ids = patient_module.patient_ids(["p1", None, float("nan"), "p1"])
    assert ids[0] == ids[3] == "p1" and len({ids[1], ids[2], "p1"}) == 3


def test_context_equals_a_direct_computation_patient_by_patient(ham_store, monkeypatch):
    monkeypatch.setattr(patient_module, "BLOCK_ROWS", 97)  # several blocks, cut inside patients
    store = FeatureStore.open(ham_store)
    keys = {"mobilenet_v2": store.resolve("mobilenet_v2")}
    ids = store.load("mobilenet_v2", columns=["id"])[1]["id"].tolist()
    frame, table, columns, context = feature_frame(store, keys, ["age", "sex"], ids, "lesion_id")
    assert context == ["patient_images", "patient_distance.mobilenet_v2", "patient_rank.mobilenet_v2", "patient_z.age"]
    X = frame[columns["mobilenet_v2"]].to_numpy(np.float64)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    checked = 0
    for _, rows in table.groupby("lesion_id").indices.items():
        got = frame.iloc[rows]
        assert (got["patient_images"] == len(rows)).all()
        if len(rows) == 1:
            assert got[context[1:3]].isna().all().all()
            continue
        for k, row in enumerate(rows):
            others = unit[np.delete(rows, k)].mean(axis=0)
            expected = 1 - unit[row] @ others / np.linalg.norm(others)
            assert got["patient_distance.mobilenet_v2"].iloc[k] == pytest.approx(expected, abs=1e-9)
        distance = got["patient_distance.mobilenet_v2"].to_numpy()
        assert got["patient_rank.mobilenet_v2"].to_numpy() == pytest.approx(
            pd.Series(distance).rank().to_numpy() / len(rows))
        age = table["age"].iloc[rows].astype(float)
        if age.std(ddof=0) > 0:
            assert got["patient_z.age"].to_numpy() == pytest.approx(((age - age.mean()) / age.std(ddof=0)).to_numpy())
        checked += 1
    assert checked >= 50


def test_top15_sensitivity_counts_each_patients_positives_among_their_top_15():
    patients = np.r_[["a"] * 20, ["b"] * 3, ["c"] * 4]
    score = np.r_[np.linspace(1, 0, 20), [0.9, 0.5, 0.1], [0.4, 0.3, 0.2, 0.1]]
    y = np.zeros(27, dtype=int)
    y[[2, 16]] = 1  # patient a: ranks 3 and 17: one of two in the top 15
    y[22] = 1  # patient b: rank 3 of 3
    per = top_k_sensitivity_by_patient(y, score, patients, k=15)
    assert per.tolist() == [0.5, 1.0]  # patient c has no positive: not counted
    # Three images tied for the last two places share them: the positive among them counts 2/3.
    tied = top_k_sensitivity_by_patient([1, 0, 0, 1], [0.9, 0.9, 0.9, 1.0], ["a"] * 4, k=3)
    assert tied.tolist() == pytest.approx([(1 + 2 / 3) / 2])
    assert top_k_sensitivity_by_patient([0, 1, 0, 1], [0.9, 0.9, 0.9, 1.0], ["a"] * 4, k=3) == pytest.approx(tied)


def test_probe_with_patient_context_reports_top15_and_predict_rebuilds_it(cli, ham_store, tmp_path):
    out = tmp_path / "run"
    # No --metadata: the context columns alone, all numeric, still reach LightGBM as named columns.
    code, printed, err = cli("probe", ham_store, "-f", "mobilenet_v2", "-t", "dx", "--positive", "mel", "-g",
                             "lesion_id", "--head", "lgbm", "--patient-features", "localization",
                             "--folds", "3", "--n-boot", "50", "--no-report", "-o", out)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    top15 = metrics["metrics"]["top15_sensitivity"]
    assert "top15_sensitivity" in metrics["headline"] and 0 <= top15["ci_low"] <= top15["value"] <= top15["ci_high"] <= 1
    predictions = pd.read_parquet(out / "predictions.parquet")
    positives = predictions["y_true"] == "mel"
    table = FeatureStore.open(ham_store).manifest.set_index("id").loc[predictions["id"]]
    per_site = top_k_sensitivity_by_patient(positives.to_numpy(), predictions["p_mel"].to_numpy(),
                                            table["localization"].to_numpy())
    assert top15["value"] == pytest.approx(per_site.mean()) and per_site.min() < 1  # a real cut
    card = json.loads((out / "head" / "model_card.json").read_text())
    assert card["patient_features"] == "localization"
    assert card["patient_context"] == ["patient_images", "patient_distance.mobilenet_v2", "patient_rank.mobilenet_v2"]
    code, _, err = cli("predict", out / "head", ham_store, "-o", tmp_path / "p.csv")
    assert code == 0, err
    applied = pd.read_csv(tmp_path / "p.csv")
    assert len(applied) == FeatureStore.open(ham_store).info("mobilenet_v2").n_done and applied["p_mel"].between(0, 1).all()


def test_patient_features_need_a_head_that_reads_them(cli, ham_store, tmp_path):
    code, _, err = cli("probe", ham_store, "-f", "mobilenet_v2", "-t", "dx", "--patient-features", "lesion_id",
                       "-o", tmp_path / "r")
    assert code == 2 and "--patient-features" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("probe", ham_store, "-f", "mobilenet_v2", "-t", "dx", "--head", "stack",
                       "--patient-features", "lesion_id", "-o", tmp_path / "r")  # logistic bases only: unread
    assert code == 2 and "--stack-joint lgbm" in err
    code, _, err = cli("probe", ham_store, "-f", "mobilenet_v2", "-t", "dx", "--head", "lgbm",
                       "--patient-features", "patient", "-o", tmp_path / "r")
    assert code == 2 and "patient column 'patient'" in err
