"""The configuration of a match run: :class:`MatchConfig`, what ``config.yaml`` in its run folder holds.

The options every run has (store, features, groups, folds, seed, n_boot, out, overwrite, report)
come from :class:`embedstore.runs.RunConfig`; a match run adds its grouping method, the optional
projection head and the kNN search. It is read with ``MatchConfig.from_yaml(path, **overrides)``
(or ``from_dict``) and checked in :meth:`MatchConfig.validate` before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from embedstore.errors import ConfigError
from embedstore.match.cluster import METHODS, PARAMETERS
from embedstore.match.index import INDEX_KINDS
from embedstore.match.projection import HEAD_GRIDS, LOSSES, ProjectionHead
from embedstore.runs.config import RunConfig

PROJECTIONS = ("none", *LOSSES)


@dataclass(kw_only=True)
class MatchConfig(RunConfig):
    """Everything a match run depends on; rerunning the saved config reproduces the run.

    ``features`` holds exactly one feature set (:attr:`feature_set`); ``groups`` is required: the
    column naming each image's true group (its lesion), which the folds keep whole and the metrics score.
    """

    kind: ClassVar[str] = "match"

    method: str = "threshold"
    projection: str = "none"
    min_group_size: int = 2          # lesions with fewer images are left out (2: the research protocol)
    neighbors: int = 64              # candidate pairs per image from the kNN search
    centre: bool = False             # subtract the training mean before cosine (frozen features)
    grid: list[float] | None = None  # values of the method's parameter to sweep (None: the default grid)
    min_samples: int = 2             # DBSCAN
    index: str = "auto"              # FAISS index kind for searches
    head: dict = field(default_factory=dict)          # ProjectionHead parameters
    head_grid: list[dict] | None = None               # candidates compared inside each fold
    validation_size: float = 0.2     # share of a fold's training lesions that scores head candidates
    write_features: bool = True      # write the final projected features back to the store

    def validate(self) -> None:
        super().validate()
        if len(self.features) != 1:
            raise ConfigError(f"match takes one feature set (--features), got {len(self.features)}: "
                              f"{', '.join(self.features)}")
        if not self.groups:
            raise ConfigError("match needs --groups: the column naming each image's lesion, e.g. lesion_id")
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"--projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        if self.index not in INDEX_KINDS:
            raise ConfigError(f"index must be one of {', '.join(INDEX_KINDS)}, got {self.index!r}")
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
    def feature_set(self) -> str:
        """The one feature set matched (name, key or encoder)."""
        return self.features[0]

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
