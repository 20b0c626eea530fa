"""The audit's config: :class:`AuditConfig`, what ``embedstore audit`` depends on, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from embedstore.errors import ConfigError
from embedstore.layout import audit_folder
from embedstore.match.index import INDEX_KINDS
from embedstore.runs.config import RunConfig


@dataclass(kw_only=True)
class AuditConfig(RunConfig):
    """Everything a leakage audit depends on; its run folder's ``config.yaml`` reruns it.

    ``threshold`` is the cosine similarity from which two images count as near-duplicates; without one it is
    calibrated on the store's own ``groups``: the lowest similarity above which the pairs of the kNN graph are
    pairs of one group at ``precision``. ``target`` (and ``positive``) make the folds checked those a probe of
    that target on this one feature set makes (stratified by it; a probe with ``--holdout`` or of several feature
    sets with fewer rows folds otherwise); without one, unstratified group folds of every row (match's folds
    differ: they hold only lesions of ``min_group_size`` images). ``split_column`` (and ``split_map``) is the
    official split checked, whose training side the folds divide, as in ``probe``. Every probe and match run
    checks its own folds against the audit, whatever the audit's folds were. ``out`` defaults to
    ``<store>.audit/<features>``, where ``probe`` and ``match`` look for it.
    """

    kind: ClassVar[str] = "audit"

    threshold: float | None = None
    precision: float = 0.99
    neighbors: int = 10
    centre: bool = False
    index: str = "auto"
    target: str | None = None
    positive: str | None = None
    split_column: str | None = None
    split_map: dict = field(default_factory=dict)
    sheet_pairs: int = 50  # pairs of each kind on the report's sheets (the most similar first)

    def __post_init__(self) -> None:
        if not self.out and self.store and len(self.features) == 1:
            self.out = str(audit_folder(self.store) / self.features[0])
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if len(self.features) != 1:
            raise ConfigError(f"audit takes one feature set (--features), got {len(self.features)}: "
                              f"{', '.join(self.features)}")
        if self.merge_near_duplicates:
            raise ConfigError("--merge-near-duplicates applies to probe and match runs, not to an audit")
        if self.threshold is None and not self.groups:
            raise ConfigError("audit needs --groups (e.g. lesion_id) to calibrate the near-duplicate threshold, "
                              "or --threshold")
        if self.threshold is not None and (isinstance(self.threshold, bool) or not -1.0 < float(self.threshold) <= 1.0):
            raise ConfigError(f"--threshold is a cosine similarity in (-1, 1], got {self.threshold!r}")
        if isinstance(self.precision, bool) or not 0.5 <= float(self.precision) < 1.0:
            raise ConfigError(f"--precision is a fraction in [0.5, 1), got {self.precision!r}")
        self.check_whole_numbers("neighbors", "sheet_pairs")
        if self.neighbors < 1 or self.sheet_pairs < 0:
            raise ConfigError("--neighbors must be at least 1 and sheet_pairs 0 or more")
        if self.index not in INDEX_KINDS:
            raise ConfigError(f"index must be one of {', '.join(INDEX_KINDS)}, got {self.index!r}")
        if self.positive is not None and not self.target:
            raise ConfigError("--positive names a class of --target: give --target too")
        if not isinstance(self.split_map, dict) or (self.split_map and not self.split_column):
            raise ConfigError("--split-map maps the values of a split column: give --split-column too")

    @property
    def feature_set(self) -> str:
        return self.features[0]
