"""The GPU benchmark script runs on the CPU with --dry-run (so it cannot rot before a GPU is lent), and its one
piece of non-embedstore arithmetic (the kNN graph) agrees with a reference."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402

CPU = torch.device("cpu")


def test_dry_run_measures_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "bench_gpu.json"
    data = bench_gpu.main(["--dry-run", "--out", str(out)])
    assert data["errors"] == {}
    assert json.loads(out.read_text())["config"]["dry_run"] is True
    assert set(bench_gpu.SECTIONS) <= set(data)

    assert data["forward"]["baseline_images_per_s"] == max(data["forward"]["images_per_s"].values()) > 0
    run = data["e2e"]["runs"][0]
    assert run["images"] == data["e2e"]["rows"] > 0 and run["images_per_s"] > 0
    assert math.isclose(run["ratio_to_forward_only"], run["images_per_s"] / data["forward"]["baseline_images_per_s"])

    decode = data["decode"]
    assert decode["cpu_decode_only_images_per_s"] > 0 and decode["gpu_decode_only_images_per_s"] > 0
    # decode_jpeg + tensor resize is not PIL, but the same picture: features of the two inputs nearly coincide.
    assert decode["pixel_mean_abs_diff"] < 3 and decode["feature_cosine_min"] > 0.98

    for part in ("real", "synthetic"):
        heads = data["heads"][part]
        assert heads["cpu_s"] > 0 and heads["device_s"] > 0 and heads["classes"] >= 2
    synthetic = data["heads"]["synthetic"]
    assert synthetic["argmax_agreement"] > 0.97 and abs(synthetic["auc_diff"]) < 0.005

    knn = data["knn"]
    assert knn["faiss_gpu"] is False  # no GPU here
    assert knn["torch_fp16_rerank_recall"] > 0.99 and knn["faiss_cpu_recall"] > 0.99
    assert knn["torch_fp32_s_extrapolated"] > 0 and knn["faiss_cpu_s_extrapolated"] > 0


@pytest.mark.parametrize("rerank", [False, True])
def test_knn_graph_is_the_exact_graph(rerank):
    X = bench_gpu.clustered_vectors(700, 24, CPU, per_cluster=20)
    graph = bench_gpu.torch_knn_graph(X, 5, chunk=256, rerank=rerank, dtype=torch.float32).numpy()
    S = (X @ X.T).numpy()
    np.fill_diagonal(S, -np.inf)
    truth = np.argsort(-S, axis=1)[:, :5]
    assert not (graph == np.arange(700)[:, None]).any()  # never a row's own neighbour
    assert bench_gpu.recall(graph, truth) == 1.0
    reference = bench_gpu.exact_neighbours(X, torch.arange(0, 700, 7), 5, chunk=64).numpy()
    assert bench_gpu.recall(reference, truth[::7]) == 1.0


def test_prepare_copies_a_seeded_sample_with_its_metadata(tmp_path):
    import pandas as pd

    sample = Path(bench_gpu.SAMPLE)
    (tmp_path / "src").mkdir()
    pd.read_csv(sample / "sample.csv").to_csv(tmp_path / "src" / "HAM10000_metadata.csv", index=False)
    (tmp_path / "src" / "images").symlink_to(sample / "images")
    bench_gpu.main(["--prepare", str(tmp_path / "dest"), "--images", "12", "--data", str(tmp_path / "src")])
    meta = pd.read_csv(tmp_path / "dest" / "HAM10000_metadata.csv")
    assert len(meta) == 12 and sorted(p.stem for p in (tmp_path / "dest" / "images").glob("*.jpg")) == sorted(meta.image_id)
