"""The model card of a saved head: ``head/model_card.json`` (what :func:`embedstore.probe.predict` checks a store
against) and its readable twin ``head/MODEL_CARD.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from embedstore import __version__
from embedstore.clock import utc_now
from embedstore.errors import EmbedstoreError
from embedstore.heads.saved import MODEL_FILE
from embedstore.probe.patient import columns_for
from embedstore.probe.protocol import ModelResult, Probe
from embedstore.runs.record import Estimate

CARD_FILE, CARD_MARKDOWN = "model_card.json", "MODEL_CARD.md"
CARD_FORMAT = 2  # 2: the head is model.skops (format 1, model.joblib, was a pickle)


def model_card(probe: Probe, result: ModelResult, metrics: Mapping[str, Estimate]) -> dict:
    """The card of ``result``'s final head: its features (with fingerprints), problem, parameters, training rows
    and ``metrics``."""
    cfg, d = probe.cfg, probe.data
    spec = result.spec
    return {
        "format": CARD_FORMAT,
        "model": spec.name,
        "model_file": MODEL_FILE,
        "head": spec.head,
        "features": [{**d.infos[n], "given_as": n} for n in spec.sets],
        "metadata": cfg.metadata,
        "patient_features": cfg.patient_features if cfg.reads_metadata(spec.head) else None,
        "patient_context": columns_for(d.context, spec.sets) if cfg.reads_metadata(spec.head) else [],
        "target": cfg.target,
        "positive_class": cfg.positive,
        "classes": d.classes,
        "decision": cfg.decision,
        "tuned_params": result.tuned,
        "fixed_params": {h: cfg.params[h] for h in cfg.params},
        "trained_on": {"store": str(Path(cfg.store).resolve()), "n_rows": int(len(probe.fit_rows)),
                       "n_groups": None if d.groups is None else int(len(set(d.groups[probe.fit_rows])))},
        "normalize": cfg.normalize,
        "evaluation": probe.transfer.summary() if probe.transfer else
        "held-out test rows" if len(probe.test) else f"{cfg.folds}-fold group cross-validation (OOF)",
        "metrics": {name: est.to_dict() for name, est in metrics.items()},
        "created": utc_now(),
        "embedstore_version": __version__,
    }


def write_card(card: dict, head_dir: Path) -> None:
    """``model_card.json`` and ``MODEL_CARD.md`` of ``card`` in ``head_dir``."""
    (head_dir / CARD_FILE).write_text(json.dumps(card, indent=2))
    (head_dir / CARD_MARKDOWN).write_text(card_markdown(card))


def card_markdown(card: dict) -> str:
    feats = "\n".join(f"- `{f['name']}` (encoder {f['encoder']}, dim {f['dim']}, fingerprint `{f['key']}`)"
                      for f in card["features"])
    rows = "\n".join(
        f"| {name} | {m['value']:.4f} | " + (f"{m['ci_low']:.4f} – {m['ci_high']:.4f} |" if m["ci_low"] is not None else "– |")
        for name, m in card["metrics"].items()
    )
    return (
        f"# Model card: {card['model']}\n\n"
        f"Predicts `{card['target']}` ({', '.join(card['classes'])}) from frozen-encoder features.\n\n"
        f"## Features\n{feats}\n"
        + (f"- metadata columns: {', '.join(card['metadata'])}\n" if card["metadata"] else "")
        + (f"- patient context from column `{card['patient_features']}` (the image among its patient's other images)\n"
           if card.get("patient_features") else "")
        + ("- normalisation: per-store (each store's features re-centred and re-scaled on all of its own rows before "
           "the head; `predict` uses the target store's)\n" if card.get("normalize") == "per-store" else "")
        + f"\nApply with `embedstore predict HEAD_DIR STORE --out FILE`; it refuses features of another fingerprint.\n\n"
        f"## Training\n- rows: {card['trained_on']['n_rows']}, groups: {card['trained_on']['n_groups']}\n"
        + _decision_line(card) +
        f"- tuned parameters: `{json.dumps(card['tuned_params'])}`\n- fixed parameters: `{json.dumps(card['fixed_params'])}`\n"
        f"- trained {card['created']} with embedstore {card['embedstore_version']}\n\n"
        f"## Metrics ({card['evaluation']}, 95% CIs by group bootstrap)\n| metric | value | 95% CI |\n|---|---|---|\n{rows}\n"
    )


def _decision_line(card: dict) -> str:
    if card.get("decision") == "balanced":
        return ("- decision: balanced (the predicted class maximises p(class) / training frequency of the class, "
                "the rule for balanced accuracy; probabilities are the head's own)\n")
    return "- decision: argmax (the most probable class)\n"


def read_card(head_dir: Path) -> dict:
    """The model card of a saved head; EmbedstoreError when ``head_dir`` has none or it is not JSON."""
    card_file = head_dir / CARD_FILE
    if not card_file.is_file():
        raise EmbedstoreError(f"{head_dir} is not a saved head (no {CARD_FILE}); pass a probe run's head/ folder")
    try:
        card = json.loads(card_file.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise EmbedstoreError(f"{card_file} is not valid JSON ({exc}); re-run the probe that wrote it") from None
    if not isinstance(card, dict) or not {"features", "classes", "metadata", "target", "positive_class"} <= set(card):
        raise EmbedstoreError(f"{card_file} is not a model card of embedstore; pass a probe run's head/ folder")
    return card
