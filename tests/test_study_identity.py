"""Optuna studies are reused only by exactly the same problem (issue #10, item 5), on the real HAM10000 subset store.

A study's name carries the fingerprint of everything that decides a trial's value, so each feature set gets its
own studies, other folds get new ones, and the same command reuses its own (running no trial). A name given with
``--study-name`` is checked against that fingerprint.
"""

import json

import optuna
import pytest
import yaml
from threadpoolctl import threadpool_limits

OPTS = ("-t", "dx", "--positive", "mel", "-g", "lesion_id", "--head", "knn", "--inner-folds", "2",
        "--trials", "3", "--n-boot", "20", "--no-report")


@pytest.fixture
def probe(cli, ham_store, tmp_path):
    """``probe(out, *args)``: the probe CLI on the subset store with OPTS, a small t-SNE, studies in tmp_path."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"tsne_max": 60}))
    storage = f"sqlite:///{tmp_path / 'studies.db'}"

    def run(out, *args, expect=0):
        with threadpool_limits(limits=1, user_api="blas"):
            code, stdout, stderr = cli("probe", ham_store, "-c", recipe, *OPTS, "--storage", storage,
                                       *args, "--out", tmp_path / out)
        assert code == expect, stdout + stderr
        return stdout + stderr

    run.storage = storage
    return run


def trials_per_study(storage: str) -> dict[str, int]:
    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}


def test_each_feature_set_of_a_comparison_is_tuned_in_its_own_studies(probe):
    probe("cmp", "-f", "mobilenet_v2,efficientnet_lite0", "--folds", "2")
    studies = trials_per_study(probe.storage)
    for name in ("mobilenet_v2", "efficientnet_lite0"):
        mine = {s: n for s, n in studies.items() if f":{name}:knn:" in s}
        assert sorted(s.rsplit(":", 1)[1] for s in mine) == ["final", "fold0", "fold1"], studies
        assert set(mine.values()) == {3}  # three trials ran for each of them
    assert len(studies) == 6


def test_other_folds_get_new_studies_and_the_same_command_reuses_its_own(probe, tmp_path):
    probe("two", "-f", "mobilenet_v2", "--folds", "2")
    first = trials_per_study(probe.storage)
    assert len(first) == 3 and set(first.values()) == {3}
    probe("again", "-f", "mobilenet_v2", "--folds", "2")
    assert trials_per_study(probe.storage) == first  # the same problem: zero new trials
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text())["metrics"] for run in ("two", "again")]
    assert metrics[0] == metrics[1]
    probe("three", "-f", "mobilenet_v2", "--folds", "3")
    new = {s: n for s, n in trials_per_study(probe.storage).items() if s not in first}
    assert len(new) == 4 and set(new.values()) == {3}  # fold0..2 and final: none reused from the 2-fold run
    names = [json.loads((tmp_path / run / "run.json").read_text())["study"]["name"] for run in ("two", "three")]
    assert names[0] in first and names[1] in new


def test_a_given_study_name_reused_for_another_problem_is_refused(probe):
    probe("named", "-f", "mobilenet_v2", "--folds", "2", "--study-name", "mine")
    names = [f"mine:mobilenet_v2:knn:{scope}" for scope in ("final", "fold0", "fold1")]
    assert sorted(trials_per_study(probe.storage)) == names
    output = probe("other", "-f", "mobilenet_v2", "--folds", "2", "--seed", "1", "--study-name", "mine", expect=2)
    assert "error: study 'mine:mobilenet_v2:knn:fold0'" in output and "tuned for another problem" in output
    assert "Traceback" not in output
    study = optuna.load_study(study_name="mine:mobilenet_v2:knn:final", storage=probe.storage)
    assert study.user_attrs["problem"]["features"] and len(study.user_attrs["fingerprint"]) == 16
