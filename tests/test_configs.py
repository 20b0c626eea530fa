"""The recipes in configs/ are valid configurations of the command they are written for."""

from pathlib import Path

import pytest
import yaml

from embedstore.match.config import MatchConfig
from embedstore.probe import ProbeConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_is_a_valid_config(path):
    raw = yaml.safe_load(path.read_text())
    cfg = (MatchConfig if path.stem.startswith("match") else ProbeConfig).from_dict(raw)
    assert str(cfg.store).startswith("stores/")  # the default place of feature stores


def test_there_is_a_recipe_for_each_study_of_the_brief():
    assert {p.stem for p in CONFIGS} >= {"isic2016_binary", "ham10000_7class", "isic2024_pauc", "match_ham10000"}


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.stem.startswith("match")], ids=lambda p: p.stem)
def test_a_probe_recipe_resolved_into_config_yaml_reads_back_the_same(path, tmp_path):
    cfg = ProbeConfig.from_yaml(path, folds=3, heads=None)  # options given win; None ones leave the recipe's
    assert cfg.folds == 3 and cfg.heads == yaml.safe_load(path.read_text()).get("heads", ["logreg"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())  # what a run folder holds
    assert ProbeConfig.from_yaml(tmp_path / "config.yaml") == cfg
