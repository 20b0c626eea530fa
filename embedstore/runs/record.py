"""The typed run record: what a run folder's ``run.json`` and ``metrics.json`` hold.

Frozen dataclasses in the spirit of zarr's ``GroupMetadata``: each knows its own JSON form
(``to_dict``) and reads it back (``from_dict``), so the writer (probe, match, audit) and every reader
(the report, ``--compare``, the CLI summaries) share one definition of a run folder. The files
carry ``format`` (:data:`RUN_FORMAT`); a reader refuses a format it does not know in one line.

- :class:`Estimate`: one metric's value and its 95% interval (bounds ``None`` when not bootstrapped).
- :class:`Metrics`: ``metrics.json``: the run's model's metrics, every compared model's, the headline.
- :class:`ProbeRecord` / :class:`MatchRecord` / :class:`AuditRecord`: ``run.json`` of the three kinds of run
  (:class:`RunRecord` holds the fields they share, :class:`GroupMerge` and :class:`Leakage` among them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

from embedstore import __version__
from embedstore.clock import utc_now
from embedstore.errors import EmbedstoreError

RUN_FORMAT = 1


@dataclass(frozen=True)
class Estimate:
    """A metric's point estimate and its 95% confidence interval (``None`` bounds: no interval)."""

    value: float
    ci_low: float | None = None
    ci_high: float | None = None

    @classmethod
    def from_dict(cls, raw: Any) -> "Estimate":
        """``{"value", "ci_low", "ci_high"}`` (or a bare number) as written by :meth:`to_dict`."""
        if isinstance(raw, Mapping):
            return cls(_number(raw.get("value")), _number(raw.get("ci_low"), None), _number(raw.get("ci_high"), None))
        return cls(_number(raw))

    @classmethod
    def of(cls, ci) -> "Estimate":
        """From a :class:`embedstore.metrics.CI` (value, low, high)."""
        return cls(ci.value, ci.low, ci.high)

    def to_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}

    @property
    def has_ci(self) -> bool:
        return _finite(self.ci_low) and _finite(self.ci_high)

    def format(self, digits: int = 3) -> str:
        """``0.812 [0.790, 0.833]``; just the value without an interval; a count as a whole number; ``–`` for none."""
        if not _finite(self.value):
            return "–"
        if isinstance(self.value, int) or (float(self.value).is_integer() and abs(self.value) >= 10):
            text = f"{int(self.value)}"
        else:
            text = f"{self.value:.{digits}f}"
        if self.has_ci:
            text += f" [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"
        return text


def _number(value: Any, missing: float | None = math.nan) -> float | None:
    if value is None:
        return missing
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            return missing
    return value


def _finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def _estimates(raw: Any) -> Mapping[str, Estimate]:
    return MappingProxyType({str(k): Estimate.from_dict(v) for k, v in (raw or {}).items()})


@dataclass(frozen=True)
class Metrics:
    """``metrics.json``: the figures of a run, every one computed on rows no choice of the run was made on.

    ``metrics`` are those of the run's model (``model``; for match, the grouping method); ``models``
    are every model a probe compared (empty for match); ``headline`` names the metrics that have
    bootstrap intervals, first the one the best model was chosen by; ``evaluated_on`` is ``test``
    (held-out rows), ``oof`` (out-of-fold predictions) or ``cv`` (held-out folds, match).
    """

    headline: tuple[str, ...]
    metrics: Mapping[str, Estimate]
    n: int
    n_groups: int | None = None
    models: Mapping[str, Mapping[str, Estimate]] = field(default_factory=dict)
    model: str | None = None
    evaluated_on: str = "oof"

    def __post_init__(self) -> None:
        object.__setattr__(self, "headline", tuple(self.headline))
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))
        object.__setattr__(self, "models", MappingProxyType({k: MappingProxyType(dict(v)) for k, v in self.models.items()}))

    def to_dict(self) -> dict:
        return {
            "headline": list(self.headline),
            "metrics": {k: e.to_dict() for k, e in self.metrics.items()},
            "models": {m: {k: e.to_dict() for k, e in v.items()} for m, v in self.models.items()},
            "model": self.model, "evaluated_on": self.evaluated_on, "n": self.n, "n_groups": self.n_groups,
        }

    @classmethod
    def from_dict(cls, raw: Mapping) -> "Metrics":
        models = {str(m): _estimates(v) for m, v in (raw.get("models") or {}).items()}
        return cls(headline=tuple(str(h) for h in raw.get("headline") or ()), metrics=_estimates(raw.get("metrics")),
                   n=int(raw.get("n") or 0), n_groups=raw.get("n_groups"), models=models, model=raw.get("model"),
                   evaluated_on=str(raw.get("evaluated_on") or "oof"))


@dataclass(frozen=True)
class StudyRef:
    """Where the Optuna study that chose the run's head lives (``embedstore report STORAGE --study NAME``)."""

    storage: str
    name: str


@dataclass(frozen=True)
class GroupMerge:
    """Groups joined before splitting because an audit flagged a pair of their images as near-duplicates
    (``--merge-near-duplicates AUDIT``): ``pairs`` flagged pairs among the run's rows joined ``groups_merged``
    groups into ``groups_formed``; ``groups_before`` and ``groups_after`` count the run's groups;
    ``pairs_across_split`` pairs lie across the fixed split and were not merged."""

    audit: str
    pairs: int
    pairs_across_split: int
    groups_before: int
    groups_after: int
    groups_merged: int
    groups_formed: int

    def summary(self) -> str:
        """One line for the CLI summary and the report."""
        across = (f"; {self.pairs_across_split} pairs across the train/test split left as they are"
                  if self.pairs_across_split else "")
        return (f"merged near-duplicates ({self.audit}): {self.groups_merged} groups joined into {self.groups_formed} "
                f"by {self.pairs} flagged pairs ({self.groups_before} groups before, {self.groups_after} after){across}")


@dataclass(frozen=True)
class Transfer:
    """A probe scored on another store's rows (``--test-store``): ``n_test`` rows of ``test_store`` whose
    ``split_column`` is ``split`` (every labelled row without one), bootstrapped by ``groups`` (None: by image);
    ``identical_left_out`` rows of the other stores were byte-identical to an image fitted, tuned or selected on and
    were left out (near-duplicates across stores are not looked for: ``embedstore audit`` looks within one store).
    ``normalize`` is how each store's features were standardised. With ``select_on_store``, the final head's hyperparameters were
    chosen on ``n_select`` rows of that store (its ``select_split`` rows), never on the scored ones."""

    test_store: str
    n_test: int
    split_column: str | None = None
    split: str | None = None
    groups: str | None = None
    identical_left_out: int = 0
    normalize: str = "train"
    select_on_store: str | None = None
    select_split: str | None = None
    n_select: int = 0

    def summary(self) -> str:
        """One line for the CLI summary and the report."""
        which = f" ({self.split_column}={self.split})" if self.split_column else ""
        how = ("each store's features standardised on its own rows (--normalize per-store)" if self.normalize == "per-store"
               else "features standardised by the training rows")
        line = f"scored on {self.n_test} rows of {Path(self.test_store).name}{which}; {how}"
        if self.identical_left_out:
            line += f"; {self.identical_left_out} byte-identical to images fitted or tuned on were left out"
        if self.select_on_store:
            line += (f"; hyperparameters chosen on {self.n_select} rows of {Path(self.select_on_store).name} "
                     f"({self.split_column}={self.select_split})")
        return line


@dataclass(frozen=True)
class Leakage:
    """What the leakage audits of the run's feature sets (``embedstore audit``) say about its split: of the
    ``flagged`` pairs among the run's rows, ``straddling`` have their two images in two folds, and
    ``across_split`` on two sides of its fixed split (training and test or validation rows), which no merge of
    groups can join. ``merged`` is the audit the run merged (``--merge-near-duplicates``), if any."""

    audits: tuple[str, ...]
    flagged: int
    straddling: int
    across_split: int = 0
    merged: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "audits", tuple(self.audits))

    def summary(self) -> str:
        """One line for the CLI summary and the report."""
        where = ", ".join(self.audits)
        if not self.straddling and not self.across_split:
            return f"leakage audit ({where}): none of its {self.flagged} flagged pairs straddles this run's split"
        parts = []
        if self.straddling:
            parts.append(f"{self.straddling} straddle its folds")
        if self.across_split:
            parts.append(f"{self.across_split} lie across its train/test split (fix the split column: no merge of "
                         "groups can join them)")
        advice = ""
        unmerged = [a for a in self.audits if a != self.merged]
        if self.straddling and unmerged:
            advice = f"; rerun with --merge-near-duplicates {unmerged[0]}"
        return (f"leakage audit ({where}): of its {self.flagged} flagged near-duplicate pairs in this run, "
                f"{' and '.join(parts)}{advice}")


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """``run.json``: what was run on what; the fields every kind of run has.

    ``features`` are the store keys (fingerprints) of the feature sets read, ``feature_names``
    the names they were given as; ``store`` is the store's absolute path. ``merged_groups`` says how
    ``--merge-near-duplicates`` joined groups before splitting (:class:`GroupMerge`), ``leakage`` how
    many pairs a leakage audit flagged land on two sides of the run's split (:class:`Leakage`).
    """

    kind: ClassVar[str] = ""
    store: str
    features: tuple[str, ...]
    feature_names: tuple[str, ...]
    groups: str | None
    seed: int
    study: StudyRef | None = None
    merged_groups: GroupMerge | None = None
    leakage: Leakage | None = None
    seconds: float | None = None
    created: str = field(default_factory=utc_now)
    embedstore_version: str = __version__

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "feature_names", tuple(self.feature_names))

    def notes(self) -> list[str]:
        """What a summary and a report say after the figures: groups merged by an audit, and what the audits
        of the run's features say about its split."""
        return [part.summary() for part in (self.merged_groups, self.leakage) if part is not None]

    def to_dict(self) -> dict:
        body = asdict(self)
        for name, value in body.items():
            if isinstance(value, tuple):
                body[name] = list(value)
        return {"format": RUN_FORMAT, "kind": self.kind, **body}

    @staticmethod
    def from_dict(raw: Mapping, where: str = "run.json") -> "ProbeRecord | MatchRecord | AuditRecord":
        """The record of ``raw``'s kind; EmbedstoreError (one line) for another format or kind, or missing fields."""
        if raw.get("format") != RUN_FORMAT:
            raise EmbedstoreError(f"{where} is of run format {raw.get('format')!r}; this embedstore reads format "
                                  f"{RUN_FORMAT}: rerun it with this version or report it with the version that wrote it")
        cls = RECORDS.get(raw.get("kind"))
        if cls is None:
            raise EmbedstoreError(f"{where} has kind {raw.get('kind')!r}; expected one of {', '.join(RECORDS)}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        missing = sorted(f.name for f in fields(cls) if f.name not in values and _required(f))
        if missing:
            raise EmbedstoreError(f"{where} lacks {', '.join(missing)}: the run folder is damaged; rerun the run")
        if isinstance(values.get("study"), Mapping):
            values["study"] = StudyRef(str(values["study"]["storage"]), str(values["study"]["name"]))
        for name, typed in (("merged_groups", GroupMerge), ("leakage", Leakage), ("transfer", Transfer)):
            if values.get(name) is not None:
                values[name] = _nested(typed, values[name], f"{where} field {name}")
        return cls(**values)


def _nested(typed: type, raw: Any, where: str):
    """A nested record (``typed``) from its JSON form; EmbedstoreError (one line) when it is damaged."""
    names = {f.name for f in fields(typed)}
    if not isinstance(raw, Mapping) or set(raw) != names:
        raise EmbedstoreError(f"{where} is damaged (expected the fields {', '.join(sorted(names))}): rerun the run")
    return typed(**raw)


def _required(f) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


@dataclass(frozen=True, kw_only=True)
class ProbeRecord(RunRecord):
    """A probe: the head chosen (``head`` on ``feature_names``), the problem, every model compared, the split."""

    kind: ClassVar[str] = "probe"
    head: str
    target: str
    classes: tuple[str, ...]
    positive_class: str | None = None
    models: tuple[str, ...] = ()
    split: Mapping[str, Any] | None = None
    transfer: Transfer | None = None  # scored on another store's rows (--test-store)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "models", tuple(self.models))

    def notes(self) -> list[str]:
        return ([self.transfer.summary()] if self.transfer else []) + super().notes()


@dataclass(frozen=True, kw_only=True)
class MatchRecord(RunRecord):
    """A match run: the grouping method and its chosen parameter, the projection head and the features it wrote."""

    kind: ClassVar[str] = "match"
    method: str
    projection: str = "none"
    parameter: Mapping[str, float] = field(default_factory=dict)
    head: Mapping[str, Any] | None = None
    projected_features: str | None = None


@dataclass(frozen=True, kw_only=True)
class AuditRecord(RunRecord):
    """A leakage audit (``embedstore audit``): the similarity threshold of a near-duplicate and where it came from
    (``calibrated`` on the store's own groups at ``precision``, or ``given``), and the split it checked:
    ``target``'s stratified folds (probe's; none: match's) inside ``split_column``'s training side."""

    kind: ClassVar[str] = "audit"
    threshold: float
    threshold_from: str
    precision: float | None
    neighbors: int
    folds: int
    target: str | None = None
    positive: str | None = None
    split_column: str | None = None


RECORDS: dict[str, type[RunRecord]] = {"probe": ProbeRecord, "match": MatchRecord, "audit": AuditRecord}
