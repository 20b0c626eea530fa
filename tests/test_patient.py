"""Patient context (--patient-features) and top-15 sensitivity, on real HAM10000 features.

HAM10000 has no patient ids; its lesion ids group several images the same way a patient id groups lesions, so
they stand in for patients here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from embedstore.metrics import top_k_sensitivity_by_patient
from embedstore.probe import patient as patient_module
from embedstore.probe.data import feature_frame
from embedstore.store import FeatureStore


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


def test_probe_with_patient_context_reports_top15_and_predict_rebuilds_it(cli, ham_store, tmp_path):
    out = tmp_path / "run"
    code, printed, err = cli("probe", ham_store, "-f", "mobilenet_v2", "-t", "dx", "--positive", "mel", "-g",
                             "lesion_id", "--head", "lgbm", "--metadata", "age,sex", "--patient-features", "lesion_id",
                             "--folds", "3", "--n-boot", "50", "--no-report", "-o", out)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    top15 = metrics["metrics"]["top15_sensitivity"]
    assert "top15_sensitivity" in metrics["headline"] and 0 <= top15["ci_low"] <= top15["value"] <= top15["ci_high"] <= 1
    predictions = pd.read_parquet(out / "predictions.parquet")
    positives = predictions["y_true"] == "mel"
    table = FeatureStore.open(ham_store).manifest.set_index("id").loc[predictions["id"]]
    expected = top_k_sensitivity_by_patient(positives.to_numpy(), predictions["p_mel"].to_numpy(),
                                            table["lesion_id"].to_numpy()).mean()
    assert top15["value"] == pytest.approx(expected)
    card = json.loads((out / "head" / "model_card.json").read_text())
    assert card["patient_features"] == "lesion_id"
    code, _, err = cli("predict", out / "head", ham_store, "-o", tmp_path / "p.csv")
    assert code == 0, err
    applied = pd.read_csv(tmp_path / "p.csv")
    assert len(applied) == FeatureStore.open(ham_store).info("mobilenet_v2").n_done and applied["p_mel"].between(0, 1).all()


def test_patient_features_need_a_head_that_reads_them(cli, ham_store, tmp_path):
    code, _, err = cli("probe", ham_store, "-f", "mobilenet_v2", "-t", "dx", "--patient-features", "lesion_id",
                       "-o", tmp_path / "r")
    assert code == 2 and "--patient-features" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("probe", ham_store, "-f", "mobilenet_v2", "-t", "dx", "--head", "lgbm",
                       "--patient-features", "patient", "-o", tmp_path / "r")
    assert code == 2 and "patient column 'patient'" in err
