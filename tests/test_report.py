"""`embedstore report` on real runs and studies: contents, exports, errors, atomic writes, the CLI."""

from __future__ import annotations

import json
import math
import re
import shutil
import sqlite3
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from embedstore.atomic import MARKER
from embedstore.errors import EmbedstoreError
from embedstore.report import write_comparison, write_report
from embedstore.report.match_report import SHEET_PAIRS, worst_pairs
from embedstore.runs import Estimate
from embedstore.report import match_report, style
from embedstore.report.study_figures import slice_figure
from test_report_support import (
    checking_layout,
    drawn_texts,
    layout_problems,
    match_run,
    probe_run,
    sklearn_probe_run,
    states_study,
    tuned_study,
)

COMPARED = "mobilenet_v2,efficientnet_lite0"  # a probe comparing two feature sets (logreg on each)
STACKED = "mobilenet_v2+efficientnet_lite0"  # one stack over both feature sets, beside its two bases


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "report-inputs"
    root.mkdir(exist_ok=True)
    return root


def _copy(run: Path, tmp_path: Path) -> Path:
    """A private copy of a shared run folder, so a test can write its report into it."""
    return Path(shutil.copytree(run, tmp_path / run.name))


def _figures_embedded(html: Path) -> None:
    """Every figure of the Markdown twin exists and is embedded in the HTML; nothing loads from elsewhere."""
    text = html.read_text()
    md = html.with_suffix(".md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert linked, "the report has no figure"
    for rel in linked:
        assert (html.parent / rel).stat().st_size > 1000, rel
    assert text.count('src="data:image/png;base64,') == len(linked)
    assert "<script" not in text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "the report loads something from the network"


# ------------------------------------------------------------------------------------- studies


def test_study_report_shows_history_importances_best_trial_and_folds(ham_store, inputs, tmp_path):
    storage, name = tuned_study(ham_store, inputs)
    study = optuna.load_study(study_name=name, storage=storage)
    html = write_report(storage, out=tmp_path, study=name)
    _figures_embedded(html)
    figures = {p.stem for p in (tmp_path / "figures").iterdir()}
    assert {"history", "importances", "parallel", "slices", "durations"} <= figures
    md = html.with_suffix(".md").read_text()
    best = study.best_trial
    assert f"## Best trial (#{best.number})" in md
    # The per-fold table repeats each fold score the probe's tuning recorded for the best trial.
    for k in range(3):
        value = best.user_attrs[f"fold_{k}"]
        assert re.search(rf"^\| {k} \| {re.escape(f'{value:.4f}'.rstrip('0').rstrip('.'))} ", md, re.M), (k, value)
    n_complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert re.search(rf"^\| complete \| {n_complete} \|", md, re.M)


def test_study_report_beside_sqlite_file_covers_every_study(ham_store, inputs):
    storage, _ = tuned_study(ham_store, inputs)
    states_study(ham_store, inputs)
    html = write_report(Path(storage.removeprefix("sqlite:///")))
    assert html == inputs / "studies-report" / "report.html"
    md = html.with_suffix(".md").read_text()
    assert "## Overview" in md and "## Study: ham:dx:logreg" in md and "## Study: states" in md
    _figures_embedded(html)


def test_study_names_are_comma_separated(ham_store, inputs, tmp_path):
    storage, name = tuned_study(ham_store, inputs)
    states_study(ham_store, inputs)
    md = write_report(storage, out=tmp_path, study=f"{name}, states").with_suffix(".md").read_text()
    assert md.startswith("# Optuna studies (2)")
    assert "## Study: ham:dx:logreg" in md and "## Study: states" in md
    with pytest.raises(EmbedstoreError, match=r"no study named 'nope' in .*it holds: "):
        write_report(storage, out=tmp_path, study=f"{name},nope")


def test_slice_plot_ticks_a_category_no_trial_took(monkeypatch):
    """A categorical hyperparameter's every choice has its tick, None included, even one no trial took."""
    study = optuna.create_study()
    for C in (0.01, 0.1, 1.0):
        study.enqueue_trial({"C": C, "class_weight": "balanced"})
    study.optimize(lambda t: t.suggest_float("C", 1e-3, 10, log=True) + len(str(t.suggest_categorical(
        "class_weight", ["balanced", None]))), n_trials=3)
    figures = []
    monkeypatch.setattr(style, "to_png", lambda fig, draw=style.to_png: figures.append(fig) or draw(fig))
    slice_figure(study.trials, ["class_weight", "C"], study.trials[0].distributions, "objective")
    assert layout_problems(figures[0]) == []
    ticks = figures[0].axes[0].get_xticklabels()
    assert [t.get_text() for t in drawn_texts(figures[0]) if t in ticks] == ["balanced", "None"]


def test_study_with_failed_and_pruned_trials(ham_store, inputs, tmp_path):
    storage, name = states_study(ham_store, inputs)
    study = optuna.load_study(study_name=name, storage=storage)
    md = write_report(storage, out=tmp_path, study=name).with_suffix(".md").read_text()
    states = {s: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    assert states[optuna.trial.TrialState.FAIL] == 1 and states[optuna.trial.TrialState.PRUNED] == 2
    for state in ("complete", "pruned", "fail"):
        count = states[optuna.trial.TrialState[state.upper()]]
        assert re.search(rf"^\| {state} \| {count} \|", md, re.M)
    # The per-fold dicts the best trial recorded become its per-fold table.
    best = study.best_trial
    assert re.search(r"^\| fold \| log loss", md, re.M)
    assert f"{best.user_attrs['folds'][0]['log_loss']:.4f}".rstrip("0") in md


def test_study_too_small_for_importances_says_so(tmp_path):
    storage = f"sqlite:///{tmp_path / 'one.db'}"
    study = optuna.create_study(study_name="one", storage=storage)
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.3) ** 2, n_trials=1)
    html = write_report(storage, out=tmp_path / "out")
    md = html.with_suffix(".md").read_text()
    assert "importances need at least 2 completed trials; this study has 1" in md
    assert not (tmp_path / "out" / "figures" / "importances.png").exists()
    assert (tmp_path / "out" / "figures" / "history.png").exists()


def test_study_errors_are_one_clear_line(ham_store, inputs, tmp_path):
    storage, name = tuned_study(ham_store, inputs)
    with pytest.raises(EmbedstoreError, match=r"no study named 'nope'.*it holds: .*ham:dx:logreg"):
        write_report(storage, out=tmp_path, study="nope")
    empty = tmp_path / "empty.db"
    optuna.storages.RDBStorage(f"sqlite:///{empty}")  # the Optuna schema, no study
    with pytest.raises(EmbedstoreError, match="holds no studies"):
        write_report(empty, out=tmp_path)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE t (x)")
    with pytest.raises(EmbedstoreError, match="not an Optuna storage"):
        write_report(other, out=tmp_path)
    assert [r[0] for r in sqlite3.connect(other).execute("SELECT name FROM sqlite_master")] == ["t"]
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(EmbedstoreError, match="neither a run folder nor an Optuna"):
        write_report(text)
    with pytest.raises(EmbedstoreError, match="does not exist"):
        write_report(tmp_path / "missing")
    with pytest.raises(EmbedstoreError, match="folder without run.json"):
        write_report(tmp_path)


# ---------------------------------------------------------------------------------- probe runs


def test_probe_report_of_a_real_probe_run(ham_store, inputs, tmp_path):
    run = _copy(probe_run(ham_store, inputs, COMPARED), tmp_path)
    html = write_report(run)
    assert html == run / "report.html"
    _figures_embedded(html)
    figures = {p.stem for p in (run / "figures").iterdir()}
    assert {"headline", "confusion", "roc_pr", "calibration", "embedding", "samples"} <= figures
    md = html.with_suffix(".md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    for name in metrics["headline"]:
        est = Estimate.from_dict(metrics["metrics"][name])
        assert f"| {est.value:.3f} | [{est.ci_low:.3f}, {est.ci_high:.3f}] |" in md, name
    folds = pd.read_csv(run / "folds.csv")
    folds = folds[folds["model"] == metrics["model"]]
    first = metrics["headline"][0]
    for value in folds[first]:
        assert f"| {value:.3f} |" in md
    assert "Tuning" not in md  # the run was not tuned: no study pointer
    # Two feature sets compared, no stack: titled by what it is, every model a row, the reported one marked.
    assert "## Models compared" in md and "Ensemble" not in md
    for name, values in metrics["models"].items():
        entry, head = name.split(" × ")
        reported = " (reported)" if name == metrics["model"] else ""
        assert f"| {entry} | {head}{reported} | " in md, name
    # The pooled out-of-fold AUC is said to be no mean of the folds' (and why it can be below all of them).
    assert "pooled out-of-fold scores" in md and "calibrated differently" in md


def test_stack_report_shows_the_ensemble_beside_its_bases(ham_store, inputs, tmp_path):
    run = _copy(probe_run(ham_store, inputs, STACKED, head="stack"), tmp_path)
    md = write_report(run).with_suffix(".md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert "## Ensemble beside its base models" in md and "## Models compared" not in md
    assert len(metrics["models"]) == 3  # the stack and a logreg base on each feature set
    for features in STACKED.split("+"):
        auc = metrics["models"][f"{features} × logreg (in {STACKED} × stack)"]["roc_auc"]["value"]
        base = re.escape(f"| {features} | logreg (in {STACKED} × stack) |")
        assert re.search(rf"^{base}.*{auc:.3f}", md, re.M), features


def test_every_figure_fits_its_canvas(ham_store, inputs, tmp_path, monkeypatch):
    """Titles, labels, tick labels and legends of every figure of every report kind lie inside the
    image, and no legend covers an x tick label, an axis label or a title."""
    problems = {}
    monkeypatch.setattr(style, "to_png", checking_layout(problems))
    for run in (sklearn_probe_run(ham_store, inputs, "mobilenet_v2"), match_run(ham_store, inputs),
                sklearn_probe_run(ham_store, inputs, "efficientnet_lite0", positive="mel")):
        write_report(run, out=tmp_path / run.name)
    storage, _ = tuned_study(ham_store, inputs)
    states_study(ham_store, inputs)
    write_report(storage, out=tmp_path / "studies")
    assert len(problems) >= 20
    assert {figure: found for figure, found in problems.items() if found} == {}


def test_reports_name_files_relative_to_the_report(ham_store, inputs, tmp_path):
    """No absolute path of the author's machine in a report: the store relative to the run folder
    (or by its name), the storage relative to the report folder."""
    far = Path(shutil.copytree(sklearn_probe_run(ham_store, inputs, "mobilenet_v2"), tmp_path / "a" / "b" / "c" / "run"))
    html = write_report(far).read_text()
    assert str(ham_store) not in html and str(tmp_path) not in html
    assert f"store <code>{ham_store.name}</code>" in html  # five folders up and down to the store: its name
    near = Path(shutil.copytree(far, ham_store.parent / "near-run", dirs_exist_ok=True))
    try:
        assert f"store <code>../{ham_store.name}</code>" in write_report(near, out=tmp_path / "near").read_text()
    finally:
        shutil.rmtree(near)
    storage, name = tuned_study(ham_store, inputs)
    study = write_report(storage, out=inputs / "near-report", study=name).read_text()
    assert "storage <code>../studies.db</code>" in study and str(inputs) not in study


def test_binary_probe_report_and_missing_store(ham_store, inputs, tmp_path):
    run = _copy(sklearn_probe_run(ham_store, inputs, "efficientnet_lite0", positive="mel"), tmp_path)
    html = write_report(run)
    md = html.with_suffix(".md").read_text()
    assert "Positive class `mel`" in md and "predicted probability of `mel`" in md
    assert (run / "figures" / "samples.png").exists()
    # The store is gone: the report still renders, with a note instead of the sample grid.
    info = json.loads((run / "run.json").read_text())
    info["store"] = str(tmp_path / "moved-away.zarr")
    (run / "run.json").write_text(json.dumps(info))
    md = write_report(run).with_suffix(".md").read_text()
    assert "No sample grid: the feature store" in md and "is gone" in md
    assert not (run / "figures" / "samples.png").exists()
    assert (run / "figures" / "roc_pr.png").exists()


def test_probe_report_shows_its_tuning_study(ham_store, inputs, tmp_path):
    storage, name = tuned_study(ham_store, inputs)
    best = optuna.load_study(study_name=name, storage=storage).best_trial
    run = _copy(sklearn_probe_run(ham_store, inputs, "mobilenet_v2"), tmp_path)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "study": {"storage": storage, "name": name}}))
    md = write_report(run).with_suffix(".md").read_text()
    assert "## Tuning" in md and f"Best trial #{best.number}:" in md
    assert (run / "figures" / "tuning_history.png").exists()
    gone = f"sqlite:///{tmp_path / 'gone.db'}"
    (run / "run.json").write_text(json.dumps({**info, "study": {"storage": gone, "name": name}}))
    md = write_report(run).with_suffix(".md").read_text()
    assert "the tuning study cannot be read" in md and "does not exist" in md


def test_run_folder_of_another_format_is_refused(ham_store, inputs, tmp_path):
    run = _copy(sklearn_probe_run(ham_store, inputs, "mobilenet_v2"), tmp_path)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "format": 2}))
    with pytest.raises(EmbedstoreError, match="format 2; this embedstore reads format 1"):
        write_report(run)
    assert not (run / "report.html").exists()


def test_rewriting_a_report_replaces_it_whole(ham_store, inputs, tmp_path):
    run = _copy(match_run(ham_store, inputs), tmp_path)
    write_report(run)
    (run / "figures" / "stale.png").write_bytes(b"old")
    write_report(run)
    assert not (run / "figures" / "stale.png").exists()
    hidden = [p for p in run.iterdir() if p.name.startswith(".") and p.name != MARKER]
    assert not hidden, "temporary files left behind"


# ---------------------------------------------------------------------------------- match runs


def test_match_report_of_a_real_match_run(ham_store, inputs, tmp_path):
    run = _copy(match_run(ham_store, inputs), tmp_path)
    html = write_report(run)
    _figures_embedded(html)
    figures = {p.stem for p in (run / "figures").iterdir()}
    assert {"headline", "sweep", "clusters", "pairs"} <= figures
    md = html.with_suffix(".md").read_text()
    f1 = Estimate.from_dict(json.loads((run / "metrics.json").read_text())["metrics"]["pairwise_f1"])
    assert f"| pairwise F1 | {f1.value:.3f} | [{f1.ci_low:.3f}, {f1.ci_high:.3f}] |" in md


def test_pair_sheet_takes_the_worst_pairs_of_each_kind(ham_store, inputs, tmp_path, monkeypatch):
    raw = pd.read_csv(match_run(ham_store, inputs) / "pairs.csv")
    false_matches, missed = worst_pairs(raw)
    assert 0 < len(false_matches) <= SHEET_PAIRS and 0 < len(missed) <= SHEET_PAIRS
    fp = raw[(raw["same_cluster"]) & (~raw["same_group"])]
    fn = raw[(~raw["same_cluster"]) & (raw["same_group"])]
    assert math.isclose(false_matches["similarity"].iloc[0], fp["similarity"].max(), rel_tol=1e-6)
    assert math.isclose(missed["similarity"].iloc[0], fn["similarity"].min(), rel_tol=1e-6)
    assert list(false_matches["similarity"]) == sorted(false_matches["similarity"], reverse=True)
    assert set(false_matches["id_a"]) <= set(fp["id_a"].astype(str))
    assert (false_matches["group_a"] != false_matches["group_b"]).all() and (missed["group_a"] == missed["group_b"]).all()
    # Every image of the sheet is captioned with its image id and its lesion.
    sheets = []
    monkeypatch.setattr(match_report, "draw_sheet", lambda grid, *args, **kw: sheets.append(grid) or b"png")
    write_report(_copy(match_run(ham_store, inputs), tmp_path))
    tiles = [tile for row in sheets[0] for tile in row if tile is not None]
    captions = {(tile.caption[0], tile.caption[1]) for tile in tiles}
    expected = {(row[f"id_{side}"], f"lesion_id {row[f'group_{side}']}")
                for frame in (false_matches, missed) for _, row in frame.iterrows() for side in "ab"}
    assert captions == expected


# --------------------------------------------------------------------------------- comparison


def test_comparison_shows_every_model_marks_the_best_and_exports_latex_and_csv(ham_store, inputs, tmp_path):
    runs = [
        probe_run(ham_store, inputs, COMPARED),
        probe_run(ham_store, inputs, STACKED, head="stack"),
        sklearn_probe_run(ham_store, inputs, "mobilenet_v2"),
        sklearn_probe_run(ham_store, inputs, "efficientnet_lite0"),
    ]
    html = write_comparison(runs, tmp_path / "cmp")
    _figures_embedded(html)
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    latex = (tmp_path / "cmp" / "comparison.tex").read_text()
    assert latex.count("\\toprule") == latex.count("\\midrule") == latex.count("\\bottomrule") == 1
    body = latex.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    # Every model of every run: each model a probe compared, the stack's bases too, one row each.
    documents = [json.loads((r / "metrics.json").read_text()) for r in runs]
    expected = [(run.name, values) for run, doc in zip(runs, documents)
                for values in (doc["models"].values() if doc["models"] else [doc["metrics"]])]
    assert len(expected) == 2 + 3 + 1 + 1 == len(table) == len(body)
    assert table["run"].tolist() == [name for name, _ in expected]
    # The sklearn runs' models read as the first run's: the run folder tells them apart.
    twice = f"logreg ({runs[0].name})"
    base = f"logreg (in {STACKED} × stack)"
    assert table["model"].tolist()[:5] == [twice, twice, "stack", base, base]
    headline = documents[0]["headline"]
    for metric in ("balanced_accuracy", "roc_auc", "accuracy"):
        values = [v[metric]["value"] for _, v in expected]
        assert table[metric].tolist() == pytest.approx(values)
        best = [math.isclose(v, max(values), abs_tol=1e-12) for v in values]  # ties are all marked
        assert table[f"{metric}_best"].tolist() == best
        cells = [row.split(" & ")[2 + headline.index(metric)] for row in body]
        assert [c.startswith("\\textbf{") for c in cells] == best
    # Features and head in columns of their own, LaTeX's special characters escaped.
    assert [row.split(" & ")[0] for row in body] == [f.replace("_", "\\_") for f in table["features"]]
    assert body[2].startswith("mobilenet\\_v2+efficientnet\\_lite0 & stack & ")
    md = html.with_suffix(".md").read_text()
    assert "7 models of 4 probe runs" in md and md.count(f"| {base} |") == 2


# ---------------------------------------------------------------------------------------- CLI


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the real console entry point in-process: exit code, stdout, stderr."""
    from embedstore.cli import main

    argv, sys.argv = sys.argv, ["embedstore", "report", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_reports_and_comparisons_and_explains_bad_input(ham_store, inputs, tmp_path, capsys):
    storage, _ = tuned_study(ham_store, inputs)
    code, _, err = _cli(capsys, storage, "--study", "nope", "-o", str(tmp_path / "x"))
    assert code == 2
    assert err.strip().count("\n") == 0 and "no study named 'nope'" in err
    assert not (tmp_path / "x").exists()
    runs = [str(sklearn_probe_run(ham_store, inputs, f)) for f in ("mobilenet_v2", "efficientnet_lite0")]
    code, out, err = _cli(capsys, "--compare", *runs, "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    assert "compared 2 runs" in out
    assert {"comparison.html", "comparison.md", "comparison.tex", "comparison.csv"} <= {
        p.name for p in (tmp_path / "cmp").iterdir()}
    code, _, err = _cli(capsys, *runs)
    assert code == 2 and "--compare" in err
    code, out, _ = _cli(capsys, storage, "--out", str(tmp_path / "study"))
    assert code == 0 and (tmp_path / "study" / "report.html").is_file()


HOSTILE = "<img src=x onerror=alert(1)> & <script>alert(2)"  # no "/": it names a folder of the run


def test_labels_holding_html_are_text_in_both_reports(ham_store, tmp_path, monkeypatch):
    """A class name from the user's table is escaped in report.md as in report.html: never run as HTML."""
    store = Path(shutil.copytree(ham_store, tmp_path / "hostile.zarr"))
    manifest = pd.read_parquet(store / "manifest.parquet")
    manifest["dx"] = manifest["dx"].replace({"mel": HOSTILE})
    manifest.to_parquet(store / "manifest.parquet", index=False)
    problems = {}
    monkeypatch.setattr(style, "to_png", checking_layout(problems))
    html = write_report(sklearn_probe_run(store, tmp_path, "mobilenet_v2", positive=HOSTILE))
    assert len(problems) >= 5 and not any(problems.values()), problems  # the long name is cut short in figures
    for text in (html.read_text(), html.with_suffix(".md").read_text()):
        assert "<script" not in text and "<img src=x" not in text
        assert "&lt;img src=x onerror=alert(1)&gt; &amp; &lt;script&gt;alert(2)" in text
