"""The probe's config: :class:`ProbeConfig`, what a probe run depends on, checked in one place before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from embedstore.devices import device_name
from embedstore.errors import ConfigError
from embedstore.heads import DECISIONS, HEADS, coerce_params
from embedstore.metrics import metric_functions
from embedstore.runs.config import RunConfig
from embedstore.studies import check_storage, is_journal
from embedstore.tune import SAMPLERS

#: Heads that read the metadata columns (and the patient context) beside the features.
METADATA_HEADS = {"lgbm"}
#: How the features of a store are standardised before a head sees them: ``train`` by the head's own scaler, fitted
#: on its training rows (the training store's statistics); ``per-store``: first each store's features are re-centred
#: and re-scaled on the mean and standard deviation of all of that store's rows (no label used), then as ``train``.
NORMALIZATIONS = ("train", "per-store")
#: Where a stack inside the probe's cross-validation takes its inner folds from: ``outer``, the other outer folds
#: (its base fits are shared between the outer folds and the final stack: 16 per base for five folds instead of 24;
#: :mod:`embedstore.heads.stack`), or ``inner``, ``inner_folds`` group folds of its own rows. Tuned bases differ per
#: outer fold, so ``outer`` shares nothing there and fits one more model per base and fold than ``inner`` with 3.
#: The default is ``outer`` for an untuned stack with three outer folds or more (with two, each has one other
#: fold), else ``inner``.
STACK_FOLDS = ("outer", "inner")
#: The options that describe a test store's rows (``--test-store``), by field and command-line name.
TEST_OPTIONS = {"test_target": "--test-target", "test_positive": "--test-positive", "test_groups": "--test-groups",
                "test_split_column": "--test-split-column", "test_split": "--test-split",
                "select_on_store": "--select-on-store", "select_split": "--select-split"}
#: Metric names of every binary problem (all of a multiclass one, plus the positive-class ones).
BINARY_METRIC_NAMES = tuple(metric_functions(2))
MULTICLASS_METRIC_NAMES = tuple(metric_functions(3))


@dataclass(kw_only=True)
class ProbeConfig(RunConfig):
    """Everything a probe run depends on; ``config.yaml`` is this, resolved, and reruns it.

    ``features`` entries are feature sets, or several joined by ``+`` (concatenated, or the bases of a
    stack); several entries and/or ``heads`` are compared, every entry × head evaluated the same way.
    """

    kind: ClassVar[str] = "probe"
    required: ClassVar[tuple[str, ...]] = ("store", "target", "features")
    list_fields: ClassVar[tuple[str, ...]] = ("features", "heads", "stack_heads", "stack_joint", "metadata")
    path_fields: ClassVar[tuple[str, ...]] = (*RunConfig.path_fields, "test_store", "select_on_store")

    target: str
    heads: list[str] = field(default_factory=lambda: ["logreg"])
    stack_heads: list[str] = field(default_factory=lambda: ["logreg"])  # stack bases, one per feature set each
    stack_joint: list[str] = field(default_factory=list)  # stack bases on all feature sets of the entry at once
    metadata: list[str] = field(default_factory=list)
    patient_features: str | None = None  # patient id column: patient-context columns for lgbm, top-15 sensitivity
    positive: str | None = None  # makes a binary "positive vs rest" problem of the target
    inner_folds: int = 3
    stack_folds: str | None = None  # STACK_FOLDS; for a stack, default outer if untuned with 3 folds or more, else inner
    split_column: str | None = None
    split_map: dict = field(default_factory=dict)  # split-column value -> train, test, valid or drop
    holdout: float = 0.0
    trials: int = 0
    metric: str | None = None  # tuning metric; default balanced_accuracy (multiclass) or roc_auc (binary)
    decision: str = "argmax"  # predicted class: "argmax", or "balanced" (argmax of p / training class prior)
    params: dict = field(default_factory=dict)  # fixed head parameters, e.g. {logreg: {C: 1.0}}
    storage: str | None = None  # Optuna storage URL or .journal file; default a sqlite file beside the store
    study_name: str | None = None
    tune_workers: int = 1  # processes computing each study's trials at once (embedstore.tune, embedstore.studies)
    sampler: str = "tpe"  # SAMPLERS: tpe, or random (each trial independent of the others: N workers = one)
    tsne_max: int = 3000
    blas_threads: int | None = None  # threads for BLAS and the 2-D map; default: the BLAS's own (one per core)
    device: str = "auto"  # where the heads that can use a GPU fit (logreg): auto (CUDA when present), cpu, cuda[:N]
    normalize: str = "train"  # NORMALIZATIONS: per-store re-centres and re-scales each store on its own statistics
    # Transfer: fit on this store, score another's rows (all labelled rows, or those whose split column is test_split)
    test_store: str | None = None
    test_target: str | None = None  # default: target
    test_positive: str | None = None  # default: positive
    test_groups: str | None = None  # default: groups (a test store without that column needs --test-groups)
    test_split_column: str | None = None
    test_split: str | None = None  # default "test" (scored_split)
    select_on_store: str | None = None  # choose the final head's hyperparameters on this store's select_split rows
    select_split: str | None = None  # default "valid" (selection_split)

    def scored_split(self) -> str:
        """The value of ``test_split_column`` whose rows of the test store are scored."""
        return self.test_split or "test"

    def selection_split(self) -> str:
        """The value of ``test_split_column`` whose rows of ``select_on_store`` choose the hyperparameters."""
        return self.select_split or "valid"

    def test_group_column(self) -> str | None:
        """The test store's group column: ``--test-groups`` (``none``: each image its own group), else ``groups``."""
        if self.test_groups is None:
            return self.groups
        return None if self.test_groups.strip().lower() == "none" else self.test_groups

    def test_options(self) -> dict:
        """The test-store options given (not their defaults), by field name."""
        return {name: getattr(self, name) for name in TEST_OPTIONS if getattr(self, name) is not None}

    def validate(self) -> None:
        super().validate()
        self._validate_heads()
        self.check_whole_numbers("inner_folds", "trials", "tsne_max", "tune_workers")
        if self.blas_threads is not None:
            self.check_whole_numbers("blas_threads")
        if self.inner_folds < 2:
            raise ConfigError(f"inner_folds must be at least 2, got {self.inner_folds}")
        if self.stack_folds is None and "stack" in self.heads:  # resolved here, so that config.yaml says which
            self.stack_folds = "outer" if self.folds >= 3 and not self.trials else "inner"
        if self.stack_folds not in (*STACK_FOLDS, None):
            raise ConfigError(f"unknown stack_folds {self.stack_folds!r}: choose from {', '.join(STACK_FOLDS)}")
        if "stack" in self.heads and self.stack_folds == "outer" and self.folds < 3:
            raise ConfigError(f"a stack that takes the other outer folds as its inner folds (--stack-folds outer) "
                              f"needs --folds 3 or more, not {self.folds}; or --stack-folds inner")
        if self.trials < 0:
            raise ConfigError("--trials must be 0 (no tuning) or more")
        if self.tsne_max < 2 or (self.blas_threads is not None and self.blas_threads < 1):
            raise ConfigError("tsne_max must be at least 2 and blas_threads at least 1")
        self._validate_tuning()
        if self.decision not in DECISIONS:
            raise ConfigError(f"unknown decision {self.decision!r}: choose from {', '.join(DECISIONS)}")
        device_name(self.device)  # one line now for a device that is not there, not after the first folds
        self._validate_split()
        self._validate_transfer()
        self._validate_metric()
        if isinstance(self.patient_features, str) and self.patient_features.strip().lower() in ("", "none"):
            self.patient_features = None  # `--patient-features none` switches a recipe's off
        if self.patient_features is not None and not isinstance(self.patient_features, str):
            raise ConfigError(f"patient_features names one column (e.g. patient_id), not {self.patient_features!r}")
        for option, given in (("--metadata", self.metadata), ("--patient-features", self.patient_features)):
            if given and not any(self.reads_metadata(head) for head in self.heads):
                raise ConfigError(f"{option} is read by the lgbm head, alone or as a stack's base: add --head lgbm, "
                                  "or --head stack with --stack-joint lgbm")
        if not isinstance(self.params, dict):
            raise ConfigError(f"params must map head names to their parameters (e.g. {{logreg: {{C: 0.5}}}}), "
                              f"not {self.params!r}")
        unknown = sorted(set(self.params) - set(HEADS) - {"stack"}, key=str)
        if unknown:
            raise ConfigError(f"params are keyed by head name; {unknown} is not a head")
        self.params = {head: coerce_params(head, values) for head, values in self.params.items()}

    def _validate_tuning(self) -> None:
        if self.tune_workers < 1:
            raise ConfigError(f"--tune-workers must be 1 or more, not {self.tune_workers}")
        if self.tune_workers > 1 and not self.trials:
            raise ConfigError("--tune-workers computes tuning trials at once: give --trials too (e.g. --trials 50)")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}: choose from {', '.join(SAMPLERS)}")
        if self.storage is not None:
            self.storage = str(self.storage)
            check_storage(self.storage)
            if is_journal(self.storage):  # a journal is a file: where the run was started from must not matter
                self.storage = str(Path(self.storage).expanduser().absolute())

    def reads_metadata(self, head: str) -> bool:
        """Whether a model of ``head`` (a stack: through one of its bases) reads the metadata and patient context."""
        if head == "stack":
            return bool(METADATA_HEADS & {*self.stack_heads, *self.stack_joint})
        return head in METADATA_HEADS

    def _validate_heads(self) -> None:
        for head in [*self.heads, *self.stack_heads, *self.stack_joint]:
            if head not in HEADS and head != "stack":
                raise ConfigError(f"unknown head {head!r}: choose from {', '.join([*HEADS, 'stack'])}")
        if "stack" in [*self.stack_heads, *self.stack_joint]:
            raise ConfigError("stack_heads and stack_joint list the base heads of a stack; they cannot contain 'stack'")

    def _validate_split(self) -> None:
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0 <= self.holdout < 0.5:
            raise ConfigError(f"holdout must be 0 (none) or a fraction between 0 and 0.5, got {self.holdout!r}")
        if self.split_column and self.holdout:
            raise ConfigError("give either a split column or a hold-out fraction, not both")
        if not isinstance(self.split_map, dict):
            raise ConfigError(f"split_map maps split-column values to train, valid, test or drop, not {self.split_map!r}")
        if self.split_map and not self.split_column:
            raise ConfigError("--split-map maps the values of a split column: give --split-column too")

    def _validate_transfer(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"unknown normalize {self.normalize!r}: choose from {', '.join(NORMALIZATIONS)}")
        if not self.test_store:
            if self.test_options():
                flags = ", ".join(TEST_OPTIONS[name] for name in self.test_options())
                raise ConfigError(f"{flags} describe(s) the rows of a test store: give --test-store")
            return
        for option, value in self.test_options().items():  # the store paths are read as text by from_dict
            if option not in self.path_fields and not isinstance(value, str):
                raise ConfigError(f"{option} names a column or a value as text, not {value!r} (quote it in the recipe)")
        if Path(self.test_store).resolve() == Path(self.store).resolve():
            raise ConfigError("--test-store is the store the head is fitted on: give another clinic's store (or "
                              "--split-column / --holdout to score held-out rows of this one)")
        if self.select_on_store and Path(self.select_on_store).resolve() == Path(self.store).resolve():
            raise ConfigError("--select-on-store is the store the head is fitted on: hyperparameters are chosen on "
                              "this store's own folds (or its validation rows) without it")
        if self.holdout:
            raise ConfigError("--test-store scores another store's rows; a --holdout of this store would be a second "
                              "test set: drop one")
        if self.test_positive is not None and self.positive is None:
            raise ConfigError("--test-positive names the test store's positive class of a binary probe: give --positive")
        if self.test_split is not None and not self.test_split_column:
            raise ConfigError("--test-split is a value of the test store's split column: give --test-split-column")
        if self.select_split is not None and not self.select_on_store:
            raise ConfigError("--select-split names rows of --select-on-store: give --select-on-store")
        if self.select_on_store:
            if not self.trials:
                raise ConfigError("--select-on-store chooses tuned hyperparameters: give --trials (e.g. 20)")
            if not self.test_split_column:
                raise ConfigError("--select-on-store takes the --select-split rows of the --test-split-column: give "
                                  "--test-split-column (e.g. split)")
            same_store = Path(self.select_on_store).resolve() == Path(self.test_store).resolve()
            if same_store and self.selection_split() == self.scored_split():
                raise ConfigError(f"--select-split and --test-split are both {self.scored_split()!r} of one store: "
                                  "hyperparameters are never chosen on the rows that are scored")

    def _validate_metric(self) -> None:
        """The tuning metric's name, as far as it is known without the data: a ``positive`` probe is binary; any
        other may be either, and a binary-only metric on a multiclass target is refused by :func:`tune_metric`."""
        if self.metric is None:
            return
        names = BINARY_METRIC_NAMES if self.positive is not None else MULTICLASS_METRIC_NAMES
        if self.metric not in names and not (self.positive is None and self.metric in BINARY_METRIC_NAMES):
            binary_only = [] if self.positive is not None else [n for n in BINARY_METRIC_NAMES if n not in names]
            also = f" (binary targets also: {', '.join(binary_only)})" if binary_only else ""
            raise ConfigError(f"unknown metric {self.metric!r}: choose from {', '.join(names)}{also}")


def tune_metric(cfg: ProbeConfig, n_classes: int):
    """(name, function) of the tuning metric for a problem of ``n_classes``: ``cfg.metric`` or the default
    (ROC AUC for two classes, balanced accuracy for more); a binary-only metric on more classes is refused."""
    name = cfg.metric or ("roc_auc" if n_classes == 2 else "balanced_accuracy")
    fns = metric_functions(n_classes)
    if name not in fns:
        raise ConfigError(f"metric {name!r} needs a binary target (give --positive); {cfg.target!r} has {n_classes} "
                          f"classes: choose from {', '.join(fns)}")
    return name, fns[name]
