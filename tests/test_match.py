"""`embedstore match` end to end on a real HAM10000 store: the run folder and what it claims."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from embedstore.errors import ConfigError
from embedstore.layout import projection_head_folder, remove_orphans
from embedstore.metrics import pairwise_prf
from embedstore.store import FeatureStore


@pytest.fixture
def store_copy(ham_store, tmp_path):
    """A private copy of the subset store (projection runs write a feature set into it)."""
    path = tmp_path / "ham.zarr"
    shutil.copytree(ham_store, path)
    return path


@pytest.fixture(scope="module")
def threshold_run(ham_store, tmp_path_factory):
    from typer.testing import CliRunner

    from embedstore.cli.app import app

    out = tmp_path_factory.mktemp("runs") / "threshold"
    result = CliRunner().invoke(app, ["match", str(ham_store), "--features", "mobilenet_v2", "--groups", "lesion_id",
                                      "--method", "threshold", "--n-boot", "200", "--no-report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_run_folder_has_every_file_and_the_contract_fields(threshold_run, ham_store):
    out, printed = threshold_run
    for name in ("run.json", "config.yaml", "metrics.json", "folds.csv", "clusters.csv", "pairs.csv", "sweep.csv"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["format"] == 1 and run["kind"] == "match" and run["method"] == "threshold"
    assert run["groups"] == "lesion_id" and run["feature_names"] == ["mobilenet_v2"]
    assert run["features"] == [FeatureStore.open(ham_store).resolve("mobilenet_v2")]
    assert "pairwise_f1" in printed and str(out) in printed
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "threshold" and config["folds"] == 5


def test_reported_metrics_are_those_of_the_held_out_clusters(threshold_run, ham_store):
    out, _ = threshold_run
    clusters = pd.read_csv(out / "clusters.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    prf = pairwise_prf(clusters["group"], clusters["cv_cluster"])
    m = metrics["metrics"]
    assert m["pairwise_f1"]["value"] == pytest.approx(prf["f1"])
    assert m["pairwise_precision"]["value"] == pytest.approx(prf["precision"])
    for name in ("pairwise_f1", "recall@1", "recall@5", "mAP"):
        assert 0 <= m[name]["ci_low"] <= m[name]["value"] <= m[name]["ci_high"] <= 1
    assert m["recall@1"]["value"] <= m["recall@5"]["value"]
    assert metrics["n"] == len(clusters) and metrics["n_groups"] == clusters["group"].nunique()
    # only lesions with 2+ images, each wholly inside one held-out fold, clusters never across folds
    _, table = FeatureStore.open(ham_store).load("mobilenet_v2")
    sizes = table["lesion_id"].value_counts()
    assert set(clusters["group"]) == set(sizes[sizes >= 2].index)
    assert (clusters.groupby("group")["fold"].nunique() == 1).all()
    assert (clusters.groupby("cv_cluster")["fold"].nunique() == 1).all()


def test_each_fold_applies_the_value_chosen_on_its_training_folds(threshold_run):
    out, _ = threshold_run
    folds = pd.read_csv(out / "folds.csv")
    sweep = pd.read_csv(out / "sweep.csv")
    assert len(folds) == 5
    for fold in folds.itertuples():
        curve = sweep[sweep["fold"] == fold.fold]
        assert curve["value"].min() == pytest.approx(0.50) and curve["value"].max() == pytest.approx(0.99)
        assert fold.threshold == pytest.approx(curve.loc[curve["f1"].idxmax(), "value"])
        assert curve.loc[curve["chosen"], "value"].tolist() == [fold.threshold]
    run = json.loads((out / "run.json").read_text())
    assert run["parameter"]["threshold"] == pytest.approx(round(folds["threshold"].mean(), 2))


def test_pairs_list_decided_and_missed_pairs_with_their_scores(threshold_run):
    out, _ = threshold_run
    pairs = pd.read_csv(out / "pairs.csv")
    clusters = pd.read_csv(out / "clusters.csv").set_index("id")
    assert set(pairs["outcome"]) <= {"TP", "FP", "FN"}
    a, b = clusters.loc[pairs["id_a"]], clusters.loc[pairs["id_b"]]
    np.testing.assert_array_equal(pairs["same_cluster"], a["cv_cluster"].to_numpy() == b["cv_cluster"].to_numpy())
    np.testing.assert_array_equal(pairs["same_group"], a["group"].to_numpy() == b["group"].to_numpy())
    n_pos = sum(n * (n - 1) // 2 for n in clusters["group"].value_counts())
    assert pairs["same_group"].sum() == n_pos  # every true pair is listed: found or missed
    fp, fn = pairs[pairs.outcome == "FP"], pairs[pairs.outcome == "FN"]
    threshold = json.loads((out / "run.json").read_text())["parameter"]["threshold"]
    assert pairs["similarity"].between(-1.0001, 1.0001).all()
    assert len(fn) == 0 or fn["similarity"].min() < threshold + 0.05


@pytest.mark.parametrize("method", ["dbscan", "agglomerative"])
def test_other_methods_run_through_the_cli(cli, ham_store, tmp_path, method):
    code, out, err = cli("match", ham_store, "-f", "mobilenet_v2", "-g", "lesion_id", "--method", method, "--folds", "3",
                         "--grid", "0.2,0.4,0.6" if method == "dbscan" else "0.6,0.8",
                         "--n-boot", "50", "--no-report", "--out", tmp_path / method)
    assert code == 0, err
    sweep = pd.read_csv(tmp_path / method / "sweep.csv")
    assert set(sweep["param"]) == {"eps" if method == "dbscan" else "threshold"}


def test_projection_run_writes_a_feature_set_that_match_can_reuse(cli, store_copy, tmp_path):
    config = tmp_path / "match.yaml"
    config.write_text(yaml.safe_dump({"projection": "infonce", "folds": 3, "n_boot": 50, "report": False, "groups": "lesion_id",
                                      "head": {"epochs": 5, "hidden_dim": 128, "out_dim": 32},
                                      "head_grid": [{"temperature": 0.1}, {"temperature": 0.2}]}))
    code, out, err = cli("match", store_copy, "-c", config, "-f", "mobilenet_v2", "--out", tmp_path / "nce")
    assert code == 0, err
    run = json.loads((tmp_path / "nce" / "run.json").read_text())
    store = FeatureStore.open(store_copy)
    info = store.info(run["projected_features"])
    assert info.name == "mobilenet_v2+infonce" and info.dim == 32
    assert info.n_done == store.info("mobilenet_v2").n_done
    assert (tmp_path / "nce" / "head" / "projection.safetensors").is_file()
    sweep = pd.read_csv(tmp_path / "nce" / "sweep.csv")
    assert sweep["candidate"].nunique() == 2 and sweep.groupby("fold")["chosen"].sum().eq(1).all()
    code, _, err = cli("match", store_copy, "-f", "mobilenet_v2+infonce", "-g", "lesion_id", "--folds", "3", "--n-boot", "20",
                       "--no-report", "--out", tmp_path / "again")
    assert code == 0, err


def test_bad_input_gets_one_line(cli, ham_store, tmp_path):
    code, _, err = cli("match", ham_store, "-f", "mobilenet_v2", "--groups", "patient", "--out", tmp_path / "a")
    assert code == 2 and "no column 'patient'" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("match", ham_store, "-f", "mobilenet_v2", "--groups", "id", "--out", tmp_path / "b")
    assert code == 2 and "occurs once" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("match", ham_store, "-f", "mobilenet_v2", "-g", "lesion_id", "--method", "kmeans",
                       "--out", tmp_path / "c")
    assert code == 2 and "--method" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_projected_set_is_replaced_only_once_the_new_one_is_complete(store_copy):
    """put_features writes the new set whole, runs before_commit (the head is saved there), and only then
    removes the set that held the name: a failure before that leaves the old set served, and the next
    call clears the half-written one."""
    store = FeatureStore.open(store_copy)
    X, table = store.load("mobilenet_v2")
    ids = table["id"].tolist()
    old_x, new_x = X[:, :8], X[:, 8:16]
    old = store.put_features("mobilenet_v2+test", old_x, ids, parent="mobilenet_v2", config={"kind": "test", "v": 1})

    def killed(key):
        raise RuntimeError("killed while saving the head")

    with pytest.raises(RuntimeError):
        store.put_features("mobilenet_v2+test", new_x, ids, parent="mobilenet_v2", config={"kind": "test", "v": 2},
                           overwrite=True, before_commit=killed)
    assert store.resolve("mobilenet_v2+test") == old
    np.testing.assert_array_equal(store.load("mobilenet_v2+test")[0], old_x)

    committed = []
    new = store.put_features("mobilenet_v2+test", new_x, ids, parent="mobilenet_v2", config={"kind": "test", "v": 2},
                             overwrite=True, before_commit=committed.append)
    assert committed == [new] and store.resolve("mobilenet_v2+test") == new
    assert [i.key for i in store.feature_sets() if i.name.startswith("mobilenet_v2+test")] == [new]
    np.testing.assert_array_equal(store.load("mobilenet_v2+test")[0], new_x)
    same = store.put_features("mobilenet_v2+test", new_x, ids, parent="mobilenet_v2", config={"kind": "test", "v": 2},
                              overwrite=True)
    assert same == new  # the same features are not written twice
    for key in (old, new):  # the head of the replaced set is an orphan now
        projection_head_folder(store.path, key).mkdir(parents=True)
        (projection_head_folder(store.path, key) / "projection.json").write_text("{}")
    assert remove_orphans(store) == [projection_head_folder(store.path, old)]
    assert projection_head_folder(store.path, new).is_dir()


def test_match_never_replaces_a_folder_it_did_not_write(cli, ham_store, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    code, _, err = cli("match", ham_store, "-f", "mobilenet_v2", "-g", "lesion_id", "--out", notes, "--overwrite")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "did not write" in err
    assert (notes / "todo.txt").read_text() == "mine"


def test_summary_line_and_metrics_are_those_of_the_run_read_back(threshold_run):
    from embedstore.runs import read_run

    out, printed = threshold_run
    run = read_run(out)
    assert run.kind == "match" and run.metrics.model == "threshold" and run.metrics.evaluated_on == "cv"
    summary = printed.strip().splitlines()[-1]
    for name in ("pairwise_f1", "recall@1", "mAP"):
        m = run.metrics.metrics[name]
        assert f"{name} {m.value:.3f} [{m.ci_low:.3f}, {m.ci_high:.3f}]" in summary
    assert f"{run.metrics.metrics['n_clusters'].value} clusters for {run.metrics.n_groups} lesions" in summary


def test_library_run_writes_config_out_and_returns_the_typed_run(ham_store, tmp_path):
    from embedstore.match.config import MatchConfig
    from embedstore.match.run import run_match
    from embedstore.runs import MatchRecord, Run, read_run

    config = MatchConfig.from_dict({"store": str(ham_store), "features": "mobilenet_v2", "groups": "lesion_id",
                                    "folds": 3, "n_boot": 20, "report": False, "out": str(tmp_path / "lib")})
    run = run_match(config)
    assert isinstance(run, Run) and isinstance(run.record, MatchRecord) and run.path == tmp_path / "lib"
    again = read_run(tmp_path / "lib")
    assert again.record == run.record and again.metrics == run.metrics
    assert run.label == "mobilenet_v2 × threshold"
    assert MatchConfig.from_yaml(tmp_path / "lib" / "config.yaml") == config  # the saved config reruns the run
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):  # one overwrite rule
        run_match(config)


def test_out_defaults_to_runs_match(cli, ham_store, tmp_path):
    code, printed, err = cli("match", ham_store, "-f", "mobilenet_v2", "-g", "lesion_id", "--folds", "3",
                             "--n-boot", "20", "--no-report", "-q", cwd=tmp_path)
    assert code == 0, err
    assert (tmp_path / "runs" / "match" / "run.json").is_file() and printed.strip().endswith("-> runs/match")


def test_groups_one_feature_set_and_the_new_option_names_are_required_in_one_line(cli, ham_store, tmp_path):
    code, _, err = cli("match", ham_store, "-f", "mobilenet_v2", "--out", tmp_path / "a")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "match needs --groups: the column naming each image's lesion" in err
    code, _, err = cli("match", ham_store, "-f", "mobilenet_v2,efficientnet_lite0", "-g", "lesion_id",
                       "--out", tmp_path / "b")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "match takes one feature set" in err
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({"groups": "lesion_id", "bootstrap": 50}))
    code, _, err = cli("match", ham_store, "-c", recipe, "-f", "mobilenet_v2", "--out", tmp_path / "c")
    assert code == 2 and "'bootstrap' is now called 'n_boot'" in err
    code, _, err = cli("match", ham_store, "-f", "mobilenet_v2", "-g", "lesion_id", "-p", "infonce",
                       "--out", tmp_path / "d")
    assert code == 2  # -p is probe's --param; match spells --projection out
    assert not any((tmp_path / name).exists() for name in "abcd")
