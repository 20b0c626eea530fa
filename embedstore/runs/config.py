"""One config model for every run: :class:`RunConfig` holds what probe and match share, each extends it.

A config is read the same way wherever it comes from: ``RunConfig.from_yaml(path, **overrides)``
(a recipe file, then the command line's options, which win when not ``None``) or
``from_dict`` (a notebook); both check every value in :meth:`validate` before any work starts,
and the resolved config is what a run folder's ``config.yaml`` holds (``to_yaml``), so
``embedstore probe -c runs/x/config.yaml`` reruns a run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import yaml

from embedstore.errors import ConfigError, first_line, reject_unknown_options

# Options that were renamed: the old name is refused with the new one named, so an old recipe fails in one clear line.
RENAMED = {"bootstrap": "n_boot"}


@dataclass(kw_only=True)
class RunConfig:
    """The options every run has.

    ``features`` are feature-set names, keys or encoders (a probe compares several, ``a+b`` joins
    sets); ``groups`` is the column no split may cut (None: every image its own group); ``out``
    is the run folder, replaced only with ``overwrite`` and only when embedstore wrote it.
    ``merge_near_duplicates`` is a leakage audit's folder (``embedstore audit``) or a cosine similarity: the
    groups of every pair it flagged (of every pair of the run's first feature set at least that similar, and of
    identical images) are joined before splitting, so a suspected duplicate never lands on two sides.
    """

    kind: ClassVar[str] = "run"
    required: ClassVar[tuple[str, ...]] = ("store", "features")
    list_fields: ClassVar[tuple[str, ...]] = ("features",)
    path_fields: ClassVar[tuple[str, ...]] = ("store", "out", "merge_near_duplicates")  # Path values read as text

    store: str = ""
    features: list[str] = field(default_factory=list)
    groups: str | None = None
    folds: int = 5
    seed: int = 0
    n_boot: int = 1000
    out: str = ""
    overwrite: bool = False
    report: bool = True
    merge_near_duplicates: str | None = None

    def __post_init__(self) -> None:
        if not self.out:
            self.out = f"runs/{self.kind}"

    @classmethod
    def from_yaml(cls, path: str | Path | None, **overrides):
        """The config of a YAML recipe (optional), with the non-None ``overrides`` winning; validated."""
        data = read_yaml(path) if path is not None else {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, raw: dict):
        """A validated config from plain values; comma-separated strings are accepted for list options."""
        raw = dict(raw)
        for old, new in RENAMED.items():
            if old in raw and old not in {f.name for f in fields(cls)}:
                raise ConfigError(f"option {old!r} is now called {new!r}: rename it in the config")
        reject_unknown_options(raw, {f.name for f in fields(cls)}, cls.kind)
        missing = [k for k in cls.required if not raw.get(k)]
        if missing:
            raise ConfigError(f"{cls.kind} needs {', '.join(missing)} (on the command line or in the config file)")
        for key in cls.list_fields:
            if isinstance(raw.get(key), str):
                raw[key] = [s.strip() for s in raw[key].split(",") if s.strip()]
        for key in cls.path_fields:
            if key in raw and raw[key] is not None:
                raw[key] = str(raw[key])
        try:
            config = cls(**raw)
        except TypeError as exc:
            raise ConfigError(f"{cls.kind} options: {first_line(exc)}") from None
        config.validate()
        return config

    def validate(self) -> None:
        """ConfigError (one line) for any value no run could use; subclasses extend it."""
        self.check_whole_numbers("folds", "seed", "n_boot")
        if self.folds < 2:
            raise ConfigError(f"folds must be at least 2, got {self.folds}")
        if self.n_boot < 0:
            raise ConfigError(f"n_boot must be 0 (no intervals) or more, got {self.n_boot}")
        if not isinstance(self.features, list) or not all(isinstance(f, str) and f for f in self.features):
            raise ConfigError(f"features must be feature-set names, got {self.features!r}")
        self._validate_merge()

    def _validate_merge(self) -> None:
        """``merge_near_duplicates``: an audit folder, or a cosine similarity in (-1, 1]."""
        spec = self.merge_near_duplicates
        if spec is None or Path(spec).exists():
            return
        value = merge_threshold(spec)
        if value is None:
            raise ConfigError(f"--merge-near-duplicates {spec}: no such audit folder (embedstore audit writes one), "
                              "and not a cosine similarity")
        if not -1.0 < value <= 1.0:
            raise ConfigError(f"--merge-near-duplicates {spec}: a cosine similarity is in (-1, 1]")

    def check_whole_numbers(self, *names: str) -> None:
        """ConfigError (one line) naming the first option of ``names`` whose value is not a whole number."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def merge_threshold(spec: str | Path) -> float | None:
    """The cosine similarity ``--merge-near-duplicates`` names when given a number rather than an audit folder
    (a folder of that name wins); None for a folder."""
    try:
        value = float(str(spec))
    except ValueError:
        return None
    return None if Path(spec).exists() else value


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML recipe; ConfigError (one line) when the file is missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {first_line(exc, None)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return data
