"""The probe: classical heads on a store's cached features, evaluated on group folds, written as a run folder.

- :mod:`~embedstore.probe.config`: :class:`ProbeConfig`, every option, validated before any work;
- :mod:`~embedstore.probe.data`: the aligned input (features, target, groups, metadata);
- :mod:`~embedstore.probe.models`: a feature entry × head as an estimator (stacks included);
- :mod:`~embedstore.probe.protocol`: :class:`Probe`: split, folds, nested tuning, metrics with CIs;
- :mod:`~embedstore.probe.card`: the saved head's model card;
- :mod:`~embedstore.probe.run`: :func:`run_probe`, which writes the run folder and returns the typed
  :class:`embedstore.runs.Run`;
- :mod:`~embedstore.probe.predict`: :func:`predict`, a saved head applied to a store.
"""

from embedstore.heads.columns import ColumnsHead  # also the name heads saved before heads.columns existed use
from embedstore.probe.config import ProbeConfig
from embedstore.probe.data import ProbeData, load_data
from embedstore.probe.models import ModelSpec, build_model
from embedstore.probe.predict import predict
from embedstore.probe.protocol import ModelResult, Probe
from embedstore.probe.run import run_probe

__all__ = ["ColumnsHead", "ModelResult", "ModelSpec", "Probe", "ProbeConfig", "ProbeData", "build_model", "load_data",
           "predict", "run_probe"]
