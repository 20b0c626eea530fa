"""Real inputs for the report tests, built once per session, and a headless-Chromium page checker.

Run folders come from the real engines on the ``ham_store`` fixture (real
HAM10000 images, real offline MobileNetV2 / EfficientNet-Lite0 features):
``embedstore.probe.run_probe`` and ``embedstore.match.run.run_match``. Studies come
from ``embedstore.tune.tune`` (the probe's own tuning) and from plain Optuna for
the states a tuning run rarely leaves (failed trials). No test lives here.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

FAST = {"folds": 3, "n_boot": 200, "report": False}


def _components(X: np.ndarray, n: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=n, svd_solver="randomized", random_state=0).fit_transform(X)


def _labelled(X: np.ndarray, table):
    """The rows with a dx label (the probe leaves unlabelled rows out the same way)."""
    keep = table["dx"].notna().to_numpy()
    return X[keep], table[keep].reset_index(drop=True)


@functools.lru_cache(maxsize=None)
def probe_run(store: Path, root: Path, features: str, positive: str | None = None, head: str = "logreg") -> Path:
    """A real probe run folder: ``head`` (logistic regression with C=1, or a stack of logistic regressions)
    on ``features`` (comma-separated entries are compared, ``a+b`` is one entry) with 3 lesion-grouped folds."""
    from embedstore.probe import ProbeConfig, run_probe

    out = root / f"probe-{features.replace(',', '-')}-{positive or 'dx'}-{head}"
    cfg = ProbeConfig.from_dict(dict(
        store=str(store), target="dx", features=features.split(","), groups="lesion_id", heads=[head],
        params={"logreg": {"C": 1.0}}, positive=positive, out=str(out), **FAST,
    ))
    run_probe(cfg)
    return out


@functools.lru_cache(maxsize=None)
def sklearn_probe_run(store: Path, root: Path, features: str, positive: str | None = None) -> Path:
    """A probe run folder in the documented format (docs/ARCHITECTURE.md, format 1), written here from a
    scikit-learn logistic regression over 3 lesion-grouped folds of the first 64 principal components
    of the store's real features.

    Cheaper than ``run_probe`` (one model, bootstraps of 100), so a binary probe and a second encoder
    for comparisons cost a few seconds each. The record and metrics are written as the typed run
    record writes them (:class:`embedstore.runs.ProbeRecord`, :class:`embedstore.runs.Metrics`).
    """
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.manifold import TSNE
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from embedstore.metrics import accuracy, balanced_accuracy, bootstrap_ci, roc_auc
    from embedstore.runs import Estimate, Metrics, ProbeRecord
    from embedstore.splits import group_kfold
    from embedstore.store import FeatureStore

    fs = FeatureStore.open(store)
    X, table = _labelled(*fs.load(features))
    Z = _components(X, 64)
    labels = table["dx"].astype(str).to_numpy()
    if positive is not None:
        labels = np.where(labels == positive, positive, "rest")
        classes = ["rest", positive]
    else:
        classes = sorted(set(labels))
    y = np.array([classes.index(v) for v in labels])
    groups = table["lesion_id"].astype(str).to_numpy()
    proba = np.zeros((len(y), len(classes)))
    fold_of = np.zeros(len(y), dtype=int)
    metrics = {"balanced_accuracy": lambda y, p: balanced_accuracy(y, p.argmax(1)), "roc_auc": roc_auc,
               "accuracy": lambda y, p: accuracy(y, p.argmax(1))}
    fold_rows = []
    for k, (train, test) in enumerate(group_kfold(y, groups, n_splits=3, seed=0)):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500))
        proba[test] = model.fit(Z[train], y[train]).predict_proba(Z[test])
        fold_of[test] = k
        fold_rows.append({"fold": k, "n_train": len(train), "n_test": len(test),
                          **{m: f(y[test], proba[test]) for m, f in metrics.items()}})
    out = root / f"sk-probe-{features}-{positive or 'dx'}"
    out.mkdir(parents=True, exist_ok=True)
    run = ProbeRecord(
        created="2026-01-01T00:00:00+00:00", store=str(store), features=[fs.resolve(features)], feature_names=[features],
        head="logreg", target="dx", groups="lesion_id", classes=classes,
        positive_class=positive, seed=0, models=[f"{features} × logreg"],
    )
    (out / "run.json").write_text(json.dumps(run.to_dict()))
    cis = {m: Estimate.of(bootstrap_ci(f, y, proba, groups=groups, n_boot=100, seed=0)) for m, f in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(Metrics(
        headline=list(metrics), metrics=cis, n=len(y), n_groups=len(set(groups)), model=f"{features} × logreg",
    ).to_dict()))
    pd.DataFrame(fold_rows).to_csv(out / "folds.csv", index=False)
    predictions = pd.DataFrame({"id": table["id"], "fold": fold_of, "split": "oof",
                                "y_true": [classes[i] for i in y], "y_pred": [classes[i] for i in proba.argmax(1)]})
    for i, c in enumerate(classes):
        predictions[f"p_{c}"] = proba[:, i]
    predictions.to_parquet(out / "predictions.parquet", index=False)
    xy = TSNE(n_components=2, init="pca", perplexity=30.0, random_state=0).fit_transform(Z)
    pd.DataFrame({"id": table["id"], "x": xy[:, 0], "y": xy[:, 1], "label": labels}).to_parquet(
        out / "embedding_2d.parquet", index=False)
    return out


@functools.lru_cache(maxsize=None)
def match_run(store: Path, root: Path) -> Path:
    """A real match run folder: cosine threshold on frozen MobileNetV2 features, 5 lesion folds."""
    from embedstore.match.config import MatchConfig
    from embedstore.match.run import run_match

    out = root / "match-threshold"
    config = MatchConfig(store=str(store), features=["mobilenet_v2"], groups="lesion_id", n_boot=200, report=False,
                         out=str(out))
    return run_match(config).path


@functools.lru_cache(maxsize=None)
def tuned_study(store: Path, root: Path, n_trials: int = 12) -> tuple[str, str]:
    """(storage URL, study name) of a real study: the probe's Optuna tuning of logistic regression."""
    from embedstore.heads.linear import LogRegHead
    from embedstore.splits import group_kfold
    from embedstore.store import FeatureStore
    from embedstore.tune import tune

    X, table = _labelled(*FeatureStore.open(store).load("mobilenet_v2"))
    X = _components(X, 16)  # keeps each trial's fits well under a second
    classes, y = np.unique(table["dx"].astype(str), return_inverse=True)
    folds = group_kfold(y, table["lesion_id"].astype(str).to_numpy(), n_splits=3, seed=0)
    storage = f"sqlite:///{root / 'studies.db'}"

    def balanced_accuracy(y_true, proba, y_pred):
        return balanced_accuracy_score(y_true, y_pred)

    name = "ham:dx:logreg"
    tune(LogRegHead(norm="l2", max_iter=200), "logreg", X, y, folds, balanced_accuracy,
         n_trials=n_trials, storage=storage, study_name=name, seed=0)
    return storage, name


@functools.lru_cache(maxsize=None)
def states_study(store: Path, root: Path) -> tuple[str, str]:
    """A small real study (minimised log loss of logistic regression over 3 lesion folds of real features)
    with completed, pruned and failed trials: trial 3 gets an invalid C and fails in scikit-learn,
    trials 5 and 7 are pruned after their first fold, so every state is present whatever the sampler does.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from embedstore.splits import group_kfold
    from embedstore.store import FeatureStore

    X, table = _labelled(*FeatureStore.open(store).load("mobilenet_v2"))
    X = _components(X, 8)
    classes, y = np.unique(table["dx"].astype(str), return_inverse=True)
    folds = group_kfold(y, table["lesion_id"].astype(str).to_numpy(), n_splits=3, seed=0)
    storage = f"sqlite:///{root / 'studies.db'}"

    def objective(trial: optuna.Trial) -> float:
        C = trial.suggest_float("C", 1e-3, 10, log=True)
        weight = trial.suggest_categorical("class_weight", ["balanced", None])
        losses = []
        for k, (train, test) in enumerate(folds):
            model = LogisticRegression(C=-C if trial.number == 3 else C, class_weight=weight, max_iter=300)
            model.fit(X[train], y[train])
            losses.append(log_loss(y[test], model.predict_proba(X[test]), labels=np.arange(len(classes))))
            trial.report(float(np.mean(losses)), k)
            if trial.number in (5, 7):
                raise optuna.TrialPruned()
        trial.set_user_attr("folds", [{"fold": k, "log_loss": v} for k, v in enumerate(losses)])
        return float(np.mean(losses))

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the failing trial is on purpose
    study = optuna.create_study(study_name="states", storage=storage, direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=0), load_if_exists=True)
    study.optimize(objective, n_trials=9, catch=(ValueError,))
    return storage, "states"


# --------------------------------------------------------------------------------------------
# Figures as drawn: what of a matplotlib figure's layout a reader would see as broken.


def drawn_texts(fig) -> list:
    """The texts a draw of ``fig`` puts on the canvas: every visible non-empty text, of the tick labels
    only those of ticks inside their axis' view (matplotlib keeps the others but does not draw them)."""
    from matplotlib.text import Text

    ticks, drawn = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            span = (high - low) or 1.0
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                ticks.update({id(tick.label1), id(tick.label2)})
                inside = low - 1e-9 * span <= tick.get_loc() <= high + 1e-9 * span
                drawn += [label for label in (tick.label1, tick.label2) if inside and label.get_visible()]
    drawn += [t for t in fig.findobj(Text) if id(t) not in ticks and t.get_visible()]
    return [t for t in drawn if t.get_text().strip()]


def layout_problems(fig) -> list[str]:
    """Each text of ``fig`` (titles, labels, tick labels, legend entries) that is not wholly inside the
    canvas, and each legend that covers (or comes within 2 pixels of) an x tick label, an x axis label
    or a title.

    Measured on the layout of the figure's last draw, which is what its PNG shows: call it after
    ``style.to_png(fig)`` (drawing again would lay the figure out again, and differently).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    renderer, canvas = FigureCanvasAgg(fig).get_renderer(), fig.bbox
    problems, drawn = [], drawn_texts(fig)
    for text in drawn:
        box = text.get_window_extent(renderer)
        if box.x0 < canvas.x0 - 1 or box.y0 < canvas.y0 - 1 or box.x1 > canvas.x1 + 1 or box.y1 > canvas.y1 + 1:
            problems.append(f"{text.get_text()!r} is cut by the canvas edge")
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        area = Bbox.from_extents(box.x0 - 2, box.y0 - 2, box.x1 + 2, box.y1 + 2)  # touching reads as colliding
        for ax in fig.axes:
            below = [label for label in drawn if label in (*ax.get_xticklabels(), ax.xaxis.label, ax.title)]
            problems += [f"the legend covers {label.get_text()!r}" for label in below
                         if label.get_window_extent(renderer).overlaps(area)]
    return problems


def checking_layout(found: dict[str, list[str]]):
    """A stand-in for ``style.to_png`` that renders the figure, then records its :func:`layout_problems`
    in ``found`` under the figure's title (numbered in drawing order)."""
    from embedstore.report import style

    render = style.to_png

    def to_png(fig) -> bytes:
        png = render(fig)
        title = next((t for t in (fig.get_suptitle(), *(ax.get_title() for ax in fig.axes)) if t), "?")
        found[f"{len(found)}: {title}"] = layout_problems(fig)
        return png

    return to_png


# --------------------------------------------------------------------------------------------
# Headless Chromium over the DevTools protocol (--remote-debugging-pipe: fds 3 and 4 of the
# browser, NUL-separated JSON), so no websocket library and no port are needed.

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class RenderedImage:
    alt: str
    loaded: bool  # the browser decoded it (naturalWidth > 0)
    width: int
    height: int
    screenshot: Image.Image

    @property
    def blank(self) -> bool:
        """True when the on-screen pixels are (almost) one flat colour."""
        pixels = np.asarray(self.screenshot.convert("L"), dtype=float)
        return pixels.size == 0 or float(pixels.std()) < 3.0


@dataclass
class PageCheck:
    images: list[RenderedImage] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page tried to load
    overflows: list[str] = field(default_factory=list)  # elements cut or sticking out of the page's card
    page: Image.Image | None = None  # the whole page


class _DevTools:
    def __init__(self, write_fd: int, read_fd: int):
        self.write_fd, self.read_fd = write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        if any(e.get("method") == method for e in self.events):
            return
        deadline = time.monotonic() + timeout
        while True:
            event = self._read(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def screenshot(self, session: str, x: float, y: float, w: float, h: float) -> Image.Image:
        data = self.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": x, "y": y, "width": w, "height": h, "scale": 1},
        }, session=session)["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


_IMAGES_JS = """JSON.stringify(Array.from(document.images).map(img => {
  const r = img.getBoundingClientRect();
  return {alt: img.alt, loaded: img.complete && img.naturalWidth > 0, w: img.naturalWidth, h: img.naturalHeight,
          x: r.left + window.scrollX, y: r.top + window.scrollY, cw: r.width, ch: r.height};
}))"""


# The card is <main> (the white column of a report): its content box is where everything must fit.
# A table may be wider only inside a .scroll-x box (a table whose columns the data decides).
_OVERFLOWS_JS = """JSON.stringify((() => {
  const problems = [];
  const describe = el => el.tagName.toLowerCase() + ' "' + el.textContent.trim().slice(0, 50) + '"';
  const contentBox = el => {
    const r = el.getBoundingClientRect(), s = getComputedStyle(el);
    return {left: r.left + parseFloat(s.paddingLeft), right: r.right - parseFloat(s.paddingRight)};
  };
  const card = document.querySelector("main") || document.body;
  const inner = contentBox(card);
  const sticksOut = el => {
    const r = el.getBoundingClientRect();
    return r.left < inner.left - 1 || r.right > inner.right + 1;
  };
  for (const table of card.querySelectorAll("table")) {
    const box = table.closest(".scroll-x") || table;
    if (sticksOut(box) || box.scrollWidth > card.clientWidth)
      problems.push(describe(table) + " is wider than its card");
    if (box === table) for (const cell of table.querySelectorAll("td, th"))
      if (cell.scrollWidth > cell.clientWidth + 1) problems.push(describe(cell) + " is cut");
  }
  for (const img of card.querySelectorAll("img"))
    if (sticksOut(img)) problems.push('img "' + img.alt.slice(0, 50) + '" sticks out of its card');
  for (const text of card.querySelectorAll("h1, h2, h3, figcaption, p"))
    if (text.scrollWidth > text.clientWidth + 1 || sticksOut(text)) problems.push(describe(text) + " is clipped");
  return problems;
})())"""


def check_pages(pages: list[Path], chromium: str, width: int = 1200) -> list[PageCheck]:
    """Load each page in one headless Chromium: every image's on-screen pixels, console errors, requests,
    and every table, figure or heading that does not fit the page's card."""
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    def wire_pipes() -> None:  # in the child: the browser reads commands on fd 3, answers on fd 4
        a, b = os.dup(to_browser_r), os.dup(from_browser_w)
        os.dup2(a, 3)
        os.dup2(b, 4)
        for fd in (3, 4):  # dup2 onto itself (a == 3) keeps close-on-exec: clear it explicitly
            os.set_inheritable(fd, True)

    profile = tempfile.mkdtemp(prefix="embedstore-chromium-")
    stderr = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        preexec_fn=wire_pipes, close_fds=False,
    )
    os.close(to_browser_r)
    os.close(from_browser_w)
    tools = _DevTools(to_browser_w, from_browser_r)
    try:
        try:
            target = tools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        except (OSError, RuntimeError, TimeoutError) as exc:
            process.kill()
            process.wait()
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace")[-800:]
            raise RuntimeError(f"chromium did not start ({exc}); its stderr ends: {tail}") from exc
        session = tools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.call(f"{domain}.enable", session=session)
        tools.call("Emulation.setDeviceMetricsOverride",
                   {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        return [_check(tools, session, page, width) for page in pages]
    finally:
        if process.poll() is None:
            try:
                tools.call("Browser.close", timeout=10)
            except (RuntimeError, TimeoutError, OSError):
                pass
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        os.close(to_browser_w)
        os.close(from_browser_r)
        stderr.close()
        shutil.rmtree(profile, ignore_errors=True)


def _check(tools: _DevTools, session: str, page: Path, width: int) -> PageCheck:
    tools.events.clear()
    tools.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
    tools.wait_for("Page.loadEventFired")

    def evaluate(js: str):
        return tools.call("Runtime.evaluate", {"expression": js, "returnByValue": True}, session=session)["result"]["value"]

    check = PageCheck()
    for info in json.loads(evaluate(_IMAGES_JS)):
        shot = (tools.screenshot(session, info["x"], info["y"], info["cw"], info["ch"])
                if info["cw"] >= 1 and info["ch"] >= 1 else Image.new("RGB", (1, 1), "white"))
        check.images.append(RenderedImage(info["alt"], info["loaded"], int(info["cw"]), int(info["ch"]), shot))
    check.overflows = json.loads(evaluate(_OVERFLOWS_JS))
    height = min(int(evaluate("document.documentElement.scrollHeight")), 16000)
    check.page = tools.screenshot(session, 0, 0, width, height)
    for event in tools.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            check.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            check.console_errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            check.console_errors.append(params["entry"].get("text", "error"))
        elif method == "Network.requestWillBeSent":
            check.requests.append(params["request"]["url"])
    return check
