"""The probe's models: a feature entry × a head (:class:`ModelSpec`), built as estimators that read the probe frame.

A single head is a :class:`embedstore.heads.ColumnsHead` over its entry's columns (plus the metadata for
the heads that read it); a stack gets one such base per feature set and stack head, plus the joint bases
over all its sets. With ``decision: balanced`` the model is wrapped in :class:`BalancedDecision`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from embedstore.heads import HEADS, BalancedDecision, ColumnsHead, StackHead, make_head
from embedstore.heads.base import fit_paths
from embedstore.probe.config import METADATA_HEADS, ProbeConfig
from embedstore.probe.data import ProbeData
from embedstore.probe.patient import columns_for


@dataclass
class ModelSpec:
    """One model of the run: a feature entry and a head (with its stack bases when the head is a stack)."""

    entry: str
    head: str

    @property
    def name(self) -> str:
        return f"{self.entry} × {self.head}"

    @property
    def sets(self) -> list[str]:
        return self.entry.split("+")


def base_params(cfg: ProbeConfig, head: str) -> dict:
    """The parameters ``head`` is built with before tuning: the run's seed and the fixed ``params``."""
    params = {"seed": cfg.seed} if head != "stack" else {}
    if head != "stack" and "device" in HEADS[head]().get_params():
        params["device"] = cfg.device
    params.update(cfg.params.get(head, {}))
    return params


def effective_params(cfg: ProbeConfig, head: str) -> dict:
    """Every parameter ``head`` is built with before tuning, its defaults included, except where it runs
    (``device``): what a tuning study's identity must hold, so that a changed default (a solver's ``tol``)
    makes a new study instead of reusing trials computed under the old one."""
    params = HEADS[head](**base_params(cfg, head)).get_params(deep=False)
    params.pop("device", None)
    return params


def build_model(cfg: ProbeConfig, data: ProbeData, spec: ModelSpec, tuned: dict[str, dict] | None = None):
    """The estimator of ``spec``, reading the probe frame; ``tuned`` overrides parameters per base name.

    With ``decision: balanced`` it is wrapped in :class:`BalancedDecision` (same probabilities,
    balanced-accuracy decision).
    """
    tuned = tuned or {}
    if spec.head != "stack":
        return _decided(cfg, _single(cfg, data, spec.sets, spec.head, tuned.get(spec.head, {})))
    bases = []
    for base_name, base_sets, head in _stack_bases(cfg, spec.sets):
        est = _single(cfg, data, base_sets, head, tuned.get(base_name, {}))
        bases.append((base_name, est.head, est.columns))
    return _decided(cfg, StackHead(bases=bases, n_splits=cfg.inner_folds, seed=cfg.seed, **cfg.params.get("stack", {})))


def tunable_parts(cfg: ProbeConfig, data: ProbeData, spec: ModelSpec) -> list[tuple[str, list[str], ColumnsHead, str]]:
    """(tuned-parameter key, feature sets, estimator, head name) of every part of ``spec`` that has
    hyperparameters to tune.

    Each part is scored with the run's decision rule (wrapped as :func:`build_model` wraps the model).
    """
    parts = [(spec.head, spec.sets, spec.head)] if spec.head != "stack" else _stack_bases(cfg, spec.sets)
    return [(name, sets, _decided(cfg, _single(cfg, data, sets, h, {})), h) for name, sets, h in parts]


def stack_of(model) -> StackHead | None:
    """The (fitted or unfitted) stack inside ``model``, or None when it is no stack."""
    if isinstance(model, BalancedDecision):
        model = getattr(model, "estimator_", model.estimator)
    return model if isinstance(model, StackHead) else None


def fit(model, X: pd.DataFrame, y, groups, rows, folds=None):
    """A fitted clone of ``model`` on ``rows`` (a stack also gets the groups and the outer ``folds``, for its inner
    folds: :meth:`embedstore.heads.StackHead.fit_paths`).

    Every head, a stack's bases too, reads its own columns of all of ``X`` and takes the rows from them
    (:func:`embedstore.heads.base.fit_paths`): no copy of the rows' every column."""
    fit_params = {"groups": groups, "folds": folds} if stack_of(model) is not None else {}
    return fit_paths(model, X, y, [rows], **fit_params)[0][0]


def fit_each(models: list, X: pd.DataFrame, y, row_sets, groups=None, folds=None, progress=None) -> list | None:
    """``models[i]`` fitted on ``row_sets[i]`` for every i, all at once, where one ``fit_paths`` can fit them
    together: a logistic head sharing one pass over its matrix (:meth:`embedstore.heads.LogRegHead.fit_paths`),
    whose models may differ in their C (each fold's own tuned C, say), a LightGBM head fitting its row sets side
    by side, whose models must be the same, or stacks of the same bases, fitted base by base
    (:meth:`embedstore.heads.StackHead.fit_paths`; ``groups`` or the outer ``folds`` for their inner folds,
    ``progress(message)`` after each base). None where they cannot; then each is fitted alone (:func:`fit`)."""
    stacks = [stack_of(model) for model in models]
    if stacks[0] is not None:
        if any(stack is None or _stack_settings(stack) != _stack_settings(stacks[0]) for stack in stacks):
            return None
        return [path[0] for path in fit_paths(models[0], X, y, row_sets, groups=groups, folds=folds, progress=progress)]
    heads = [_head_of(model) for model in models]
    if heads[0] is None or not hasattr(heads[0], "fit_paths"):
        return None
    varying = {"C"} & set(heads[0].get_params())  # a logistic head's models may differ in their C alone
    settings = [{k: v for k, v in head.get_params().items() if k not in varying} for head in heads]
    if any(setting != settings[0] for setting in settings):
        return None
    values = [[head.C] for head in heads] if varying else None
    return [path[0] for path in fit_paths(models[0], X, y, row_sets, values)]


def _stack_settings(stack: StackHead) -> tuple:
    """What makes two stacks the same model: their own parameters and each base's name, head and columns."""
    own = {k: v for k, v in stack.get_params(deep=False).items() if k != "bases"}
    return own, [(name, type(head), head.get_params(), columns) for name, head, columns in stack.bases]


def _head_of(model):
    """The head inside a single model (under its decision rule and column selection); None for a stack."""
    if isinstance(model, BalancedDecision):
        model = model.estimator
    return model.head if isinstance(model, ColumnsHead) else None


def _decided(cfg: ProbeConfig, model):
    return BalancedDecision(model) if cfg.decision == "balanced" else model


def _stack_bases(cfg: ProbeConfig, sets: list[str]) -> list[tuple[str, list[str], str]]:
    """(name, feature sets, head) of each base of a stack over ``sets``."""
    bases = [(f"{name} × {head}", [name], head) for name in sets for head in cfg.stack_heads]
    return bases + [(f"{'+'.join(sets)} × {head}", sets, head) for head in cfg.stack_joint]


def _single(cfg: ProbeConfig, data: ProbeData, sets: list[str], head: str, tuned: dict) -> ColumnsHead:
    columns = [c for name in sets for c in data.columns[name]]
    params = {**base_params(cfg, head), **tuned}
    passthrough = [*cfg.metadata, *columns_for(data.context, sets)]
    if head in METADATA_HEADS and passthrough:
        columns = [*columns, *passthrough]
        params["passthrough"] = tuple(passthrough)
    return ColumnsHead(make_head(head, **params), columns)
