"""A saved head that cannot run code: skops files with an explicit list of trusted types, never pickle.

A fitted head is written as ``model.skops`` (skops: a zip of JSON and numpy
arrays that names the type of every object it holds). Loading first asks skops
for the types the file names beyond those skops itself trusts (numpy, scipy,
most of scikit-learn) and refuses the file, naming them, unless every one is
in :data:`TRUSTED`: embedstore's own heads and the scikit-learn and LightGBM
parts inside them. Only then is it built, so a head folder received from
someone else can hold wrong numbers, but never a payload that runs. LightGBM's
booster travels as its own text model, which LightGBM parses.

Heads written by older versions of embedstore as ``model.joblib`` (pickle,
which runs whatever the file says while it loads) are refused without being
opened.
"""

from __future__ import annotations

from pathlib import Path

from sklearn.base import is_classifier

from embedstore.errors import ConfigError, first_line

MODEL_FILE = "model.skops"
LEGACY_FILE = "model.joblib"

#: Types a saved head may name beyond skops' own trusted ones: embedstore's heads and what they contain.
TRUSTED = frozenset({
    "embedstore.heads.columns.ColumnsHead",
    "embedstore.probe.ColumnsHead",  # where heads saved before embedstore.heads.columns name it
    "embedstore.heads.base.Preprocessor",
    "embedstore.heads.decision.BalancedDecision",
    "embedstore.heads.knn.KNNHead",
    "embedstore.heads.lgbm.LGBMHead",
    "embedstore.heads.linear.LogRegHead",
    "embedstore.heads.linear.SVMHead",
    "embedstore.heads.mlp.MLPHead",
    "embedstore.heads.stack.StackHead",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "lightgbm.sklearn.LGBMClassifier",
    "lightgbm.basic.Booster",
    "collections.OrderedDict",
})


def save_head(model, folder: str | Path) -> Path:
    """Write the fitted ``model`` to ``folder/model.skops``; returns the file's path."""
    import skops.io as sio  # imported when used: skops pulls in torch, which the CLI's start-up avoids

    path = Path(folder) / MODEL_FILE
    sio.dump(model, path)
    return path


def load_head(folder: str | Path):
    """The head saved in ``folder``; raises ConfigError, before building anything, for a pickle of an older
    embedstore, an unreadable file or one naming a type outside :data:`TRUSTED`."""
    import skops.io as sio

    folder = Path(folder)
    path = folder / MODEL_FILE
    if not path.is_file():
        if (folder / LEGACY_FILE).exists():
            raise ConfigError(
                f"{folder} holds a head saved in pickle format ({LEGACY_FILE}) by an older embedstore, which can run "
                f"code when loaded, so it is not opened: re-run the probe to save the head as {MODEL_FILE}"
            )
        raise ConfigError(f"{folder} has no {MODEL_FILE}: pass the head/ folder of a probe run")
    try:
        untrusted = sio.get_untrusted_types(file=path)
        foreign = sorted(set(untrusted) - TRUSTED)
        if foreign:
            raise ConfigError(
                f"{path} holds type(s) a saved head never contains ({', '.join(foreign[:5])}); refusing to load it: "
                "only heads written by `embedstore probe` are loaded"
            )
        model = sio.load(path, trusted=sorted(untrusted))
    except ConfigError:
        raise
    except Exception as exc:  # a damaged or hostile file may fail in the zip, JSON or schema reader
        reason = first_line(exc, None)
        raise ConfigError(f"{path} is not a readable saved head ({reason}); re-run the probe") from None
    if not (is_classifier(model) and hasattr(model, "predict_proba")):
        raise ConfigError(f"{path} holds a {type(model).__name__}, not a fitted head; re-run the probe")
    return model
