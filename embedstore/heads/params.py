"""Fixed head parameters (``-p HEAD.NAME=VALUE``, or ``params:`` in a recipe), checked before any work.

:func:`coerce_params` turns what a user wrote into what the head's
``__init__`` takes: a name the head does not have is refused with the list of
names it has; a value becomes the type of the parameter's default (``C=1`` is
``1.0``, ``n_estimators=50.0`` is ``50``) or is refused in one line; ``none``
and ``null`` mean None and ``true``/``false`` booleans, in any case; values
with a fixed set of choices (``norm``, ``class_weight``) are checked against it,
and numbers against the range the head can fit with (``C`` > 0, ``k`` >= 1,
``subsample`` in (0, 1], ...), so ``logreg.C=-1`` is one line, not a
scikit-learn traceback after fitting started.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from embedstore.errors import ConfigError
from embedstore.heads.base import NORMS

#: Parameters that embedstore sets itself, with the option that does it.
_SET_ELSEWHERE = {
    "passthrough": "--metadata",
    "bases": "--stack-heads / --stack-joint",
    "meta": "the stack's meta_C and meta_class_weight",
    "n_splits": "--inner-folds",
    "seed": "--seed",
    "device": "--device",
}
#: Parameters whose default is None (or that may be None), with the type of their other values.
_OPTIONAL = {"pca": int, "undersample": float}
#: Parameters with a fixed set of values (a class-weight mapping {class code: weight} is also taken).
_CHOICES = {"norm": NORMS, "class_weight": ("balanced", None), "meta_class_weight": ("balanced", None)}



class _Range(NamedTuple):
    """Numbers from ``low`` to ``high``, each end included unless ``*_open``; with ``zero_is_off``, 0 is also
    taken (the code reads 0 as None: no PCA, no undersampling)."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    zero_is_off: bool = False

    def __contains__(self, x) -> bool:
        if x == 0 and self.zero_is_off:
            return True
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return text + (" (or 0 or none: off)" if self.zero_is_off else "")


_POSITIVE = _Range(0, low_open=True)
_FRACTION = _Range(0, 1, low_open=True)
#: Ranges of numeric parameters, by name across all heads (a name means the same in every head that has it),
#: as what fitting with them needs: scikit-learn's or LightGBM's own checks, or what the head's code does.
_RANGES = {
    "C": _POSITIVE,  # LogisticRegression, LinearSVC
    "tol": _POSITIVE,  # logreg's stopping rule: largest absolute gradient
    "meta_C": _POSITIVE,  # the stack's meta-learner (LogRegHead)
    "learning_rate": _POSITIVE,  # MLPClassifier learning_rate_init, LightGBM
    "temperature": _POSITIVE,  # knn votes exp(sim / temperature): 0 is nan, < 0 favours the farthest neighbours
    "alpha": _Range(0),  # MLPClassifier L2 penalty
    "reg_lambda": _Range(0),  # LightGBM lambda_l2
    "k": _Range(1),  # faiss search
    "hidden": _Range(1),  # units of the MLP's hidden layer
    "max_iter": _Range(1),  # MLPClassifier needs >= 1; logreg with 0 returns an unoptimised model
    "n_estimators": _Range(1),  # LightGBM boosting rounds
    "num_leaves": _Range(2),  # LightGBM num_leaves > 1
    "embedding_bins": _Range(2),  # LightGBM max_bin > 1
    "min_child_samples": _Range(0),  # LightGBM min_data_in_leaf >= 0
    "calibration_folds": _Range(2),  # CalibratedClassifierCV cv
    "subsample": _FRACTION,  # LightGBM bagging_fraction
    "colsample_bytree": _FRACTION,  # LightGBM feature_fraction
    "pca": _Range(1, zero_is_off=True),  # components (base.Preprocessor, LGBMHead)
    # base.undersample_indices caps every class at this many times the smallest: < 1 cuts the smallest too, < 0 fails
    "undersample": _Range(1, zero_is_off=True),
}


def head_parameters(head: str) -> dict:
    """The parameters a user may fix for ``head`` (a base head name or ``stack``), with their defaults."""
    from embedstore.heads import HEADS, StackHead

    cls = StackHead if head == "stack" else HEADS[head]
    return {k: v for k, v in cls().get_params(deep=False).items() if k not in _SET_ELSEWHERE}


def coerce_params(head: str, raw) -> dict:
    """``raw`` (name -> value as written) checked against ``head``'s parameters and coerced to their types."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params of {head} must map parameter names to values (e.g. {{C: 0.5}}), not {raw!r}")
    known = head_parameters(head)
    out = {}
    for name, value in raw.items():
        if name in _SET_ELSEWHERE:
            raise ConfigError(f"{head}.{name} is set by {_SET_ELSEWHERE[name]}, not by a parameter")
        if name not in known:
            near = [k for k in known if k.lower() == str(name).lower()]
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{head} has no parameter {name!r}{hint}; its parameters are: {', '.join(known)}")
        what = f"{head}.{name}"
        if name in _CHOICES:
            out[name] = _chosen(what, _CHOICES[name], value)
        else:
            out[name] = _coerce(what, _OPTIONAL.get(name) or type(known[name]), _word(value))
            if name in _RANGES and out[name] is not None and out[name] not in _RANGES[name]:
                shown = value.strip() if isinstance(value, str) else repr(value)
                raise ConfigError(f"{what} must be {_RANGES[name]}, not {shown}")
    return out


def _chosen(what: str, choices: tuple, value):
    """The choice ``value`` spells (words in any case), or a class-weight mapping; ConfigError otherwise."""
    if isinstance(value, str):
        for choice in choices:
            if isinstance(choice, str) and choice == value.strip().lower():
                return choice
    value = _word(value)
    if value in choices:
        return value
    if isinstance(value, Mapping) and what.endswith("class_weight"):
        return dict(value)
    names = ", ".join("none" if c is None else c for c in choices)
    raise ConfigError(f"{what} must be one of {names}, not {value!r}")


def _word(value):
    """``none``/``null`` (any case) -> None, ``true``/``false`` -> bool; other values unchanged."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("none", "null", "~"):
            return None
        if word in ("true", "false"):
            return word == "true"
    return value


def _coerce(what: str, kind: type, value):
    """``value`` as a ``kind``; None where the parameter may be None; ConfigError naming ``what`` otherwise."""
    if value is None and what.rsplit(".", 1)[1] in _OPTIONAL:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{what} must be true or false, not {value!r}")
    if kind in (int, float):
        number = _number(value)
        if number is None:
            raise ConfigError(f"{what} must be a number, not {value!r}")
        if kind is int:
            if number != int(number):
                raise ConfigError(f"{what} must be a whole number, not {value!r}")
            return int(number)
        return float(number)
    if not isinstance(value, kind):
        raise ConfigError(f"{what} must be a {kind.__name__}, not {value!r}")
    return value


def _number(value) -> float | None:
    """``value`` as a finite number, or None when it is none (a word, a bool, nan, inf)."""
    if isinstance(value, bool):
        return None
    try:
        number = value if isinstance(value, int) else float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
