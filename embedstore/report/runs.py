"""Reading run folders (format 1, docs/ARCHITECTURE.md) without re-running anything."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from embedstore.errors import EmbedstoreError

RUN_FORMAT = 1
RUN_KINDS = ("probe", "match")


@dataclass(frozen=True)
class Estimate:
    """A metric's point estimate and its 95% confidence interval (bounds may be missing)."""

    value: float
    ci_low: float = math.nan
    ci_high: float = math.nan

    @classmethod
    def parse(cls, raw: Any) -> "Estimate":
        if isinstance(raw, dict):
            return cls(_num(raw.get("value")), _num(raw.get("ci_low")), _num(raw.get("ci_high")))
        return cls(_num(raw))

    @property
    def has_ci(self) -> bool:
        return not (math.isnan(self.ci_low) or math.isnan(self.ci_high))

    def format(self, digits: int = 3) -> str:
        """``0.812 [0.790, 0.833]``, or just the value when there is no CI."""
        if math.isnan(self.value):
            return "–"
        if isinstance(self.value, float) and self.value.is_integer() and abs(self.value) >= 10:
            text = f"{int(self.value)}"
        else:
            text = f"{self.value:.{digits}f}"
        if self.has_ci:
            text += f" [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"
        return text


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class Run:
    """A probe or match run folder, read lazily; every file but ``run.json`` may be absent."""

    def __init__(self, path: Path):
        self.path = Path(path)
        run_json = self.path / "run.json"
        if not run_json.is_file():
            raise EmbedstoreError(
                f"{self.path} is not a run folder (no run.json): pass a folder written by "
                "`embedstore probe` or `embedstore match`"
            )
        try:
            self.info: dict[str, Any] = json.loads(run_json.read_text())
        except json.JSONDecodeError as exc:
            raise EmbedstoreError(f"{run_json} is not valid JSON ({exc}): the run folder is damaged") from exc
        version = self.info.get("format")
        if version != RUN_FORMAT:
            raise EmbedstoreError(
                f"{self.path} is a run folder of format {version!r}; this embedstore reads format "
                f"{RUN_FORMAT}: rerun it with this version or report it with the version that wrote it"
            )
        if self.kind not in RUN_KINDS:
            raise EmbedstoreError(
                f"{run_json} has kind {self.kind!r}; expected one of {', '.join(RUN_KINDS)}"
            )

    @property
    def kind(self) -> str:
        return str(self.info.get("kind"))

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def features_label(self) -> str:
        names = self.info.get("feature_names") or self.info.get("features") or []
        if isinstance(names, str):
            names = [names]
        return " + ".join(str(n) for n in names) or "?"

    @property
    def model_label(self) -> str:
        """The head of a probe; the method of a match run, with its projection head if it has one."""
        if self.kind == "match":
            projection = self.info.get("projection")
            method = str(self.info.get("method") or "match")
            return f"{method} + {projection} projection" if projection and projection != "none" else method
        return str(self.info.get("head") or self.kind)

    @property
    def label(self) -> str:
        """``features × head`` (probe) or ``features × method`` (match)."""
        return f"{self.features_label} × {self.model_label}"

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.info.get("classes") or []]

    # ------------------------------------------------------------------ files

    @cached_property
    def metrics_doc(self) -> dict[str, Any]:
        path = self.path / "metrics.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EmbedstoreError(f"{path} is not valid JSON ({exc}): the run folder is damaged") from exc

    @cached_property
    def metrics(self) -> dict[str, Estimate]:
        raw = self.metrics_doc.get("metrics") or {}
        return {str(name): Estimate.parse(value) for name, value in raw.items()}

    @cached_property
    def headline(self) -> list[str]:
        names = [str(n) for n in self.metrics_doc.get("headline") or [] if str(n) in self.metrics]
        return names or list(self.metrics)

    @cached_property
    def models(self) -> dict[str, dict[str, Estimate]]:
        raw = self.metrics_doc.get("models") or {}
        return {
            str(model): {str(m): Estimate.parse(v) for m, v in (values or {}).items()}
            for model, values in raw.items()
        }

    def table(self, name: str) -> Optional[pd.DataFrame]:
        """A CSV or parquet file of the run as a DataFrame, or None when absent."""
        path = self.path / name
        if not path.is_file():
            return None
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)

    def study(self) -> Optional[dict[str, str]]:
        study = self.info.get("study")
        return study if isinstance(study, dict) and study.get("storage") else None


def is_run_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "run.json").is_file()
