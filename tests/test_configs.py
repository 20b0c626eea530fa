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
