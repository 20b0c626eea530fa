"""The resolved configuration of a match run: what ``config.yaml`` in a run folder holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from embedstore.errors import ConfigError, reject_unknown_options
from embedstore.match.cluster import METHODS, PARAMETERS
from embedstore.match.index import INDEX_KINDS
from embedstore.match.projection import HEAD_GRIDS, LOSSES, ProjectionHead

PROJECTIONS = ("none", *LOSSES)


@dataclass
class MatchConfig:
    """Everything a match run depends on; rerunning the saved config reproduces the run."""

    store: str = ""
    features: str = ""
    groups: str = "lesion_id"
    method: str = "threshold"
    projection: str = "none"
    folds: int = 5
    seed: int = 0
    min_group_size: int = 2          # lesions with fewer images are left out (2: the research protocol)
    neighbors: int = 64              # candidate pairs per image from the kNN search
    centre: bool = False             # subtract the training mean before cosine (frozen features)
    grid: list[float] | None = None  # values of the method's parameter to sweep (None: the default grid)
    min_samples: int = 2             # DBSCAN
    index: str = "auto"              # FAISS index kind for searches
    head: dict = field(default_factory=dict)          # ProjectionHead parameters
    head_grid: list[dict] | None = None               # candidates compared inside each fold
    validation_size: float = 0.2     # share of a fold's training lesions that scores head candidates
    bootstrap: int = 1000            # resamples of lesions for the confidence intervals
    write_features: bool = True      # write the final projected features back to the store
    report: bool = True              # render the report at the end when embedstore.report is present

    @classmethod
    def from_yaml(cls, path: str | Path | None, **overrides) -> "MatchConfig":
        """Read a YAML file (optional), let non-None ``overrides`` win, validate."""
        data = {}
        if path is not None:
            path = Path(path)
            if not path.exists():
                raise ConfigError(f"config file {path} does not exist")
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"config file {path} must hold a mapping of option: value")
        data |= {k: v for k, v in overrides.items() if v is not None}
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "MatchConfig":
        reject_unknown_options(data, {f.name for f in fields(cls)}, "match")
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"--projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        if self.index not in INDEX_KINDS:
            raise ConfigError(f"index must be one of {', '.join(INDEX_KINDS)}, got {self.index!r}")
        if self.folds < 2:
            raise ConfigError(f"--folds must be at least 2, got {self.folds}")
        if self.neighbors < 1:
            raise ConfigError(f"neighbors must be at least 1, got {self.neighbors}")
        if not 0.0 < self.validation_size < 0.5:
            raise ConfigError(f"validation_size must be between 0 and 0.5, got {self.validation_size}")
        lo, hi = (0.0, 1.0) if self.method == "dbscan" else (-1.0, 1.0)
        if self.grid is not None and (not self.grid or min(self.grid) <= lo or max(self.grid) > hi):
            raise ConfigError(f"grid for {self.method} must be a non-empty list of values in ({lo}, {hi}]")
        valid = set(ProjectionHead().get_params()) - {"loss"}
        for params in [self.head, *(self.head_grid or [])]:
            bad = sorted(set(params) - valid)
            if bad:
                raise ConfigError(f"unknown projection head option(s) {bad}; known: {', '.join(sorted(valid))}")

    @property
    def param_name(self) -> str:
        return PARAMETERS[self.method][0]

    @property
    def sweep_grid(self) -> list[float]:
        return list(self.grid) if self.grid is not None else [float(v) for v in PARAMETERS[self.method][1]]

    @property
    def head_candidates(self) -> list[dict]:
        if self.projection == "none":
            return [{}]
        return list(self.head_grid) if self.head_grid is not None else HEAD_GRIDS[self.projection]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
