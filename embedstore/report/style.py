"""One look for every figure: fonts, palette, grid, and PNG export.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no
pyplot), so reports never touch matplotlib's global backend or state and can
be written from any thread. Colours come from the Okabe-Ito palette, which
stays distinguishable under the common colour-vision deficiencies; continuous
values use ``cividis``, which is perceptually uniform and colour-blind safe.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Iterator

import matplotlib
from matplotlib.figure import Figure

# Okabe & Ito (2008), "Color Universal Design"; yellow last because it is faint on white.
PALETTE = [
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow (last: weak on white)
]
CONTINUOUS_CMAP = "cividis"
SEQUENTIAL_CMAP = "Blues"
CORRECT = "#009E73"  # bluish green: a correct prediction / a true match
WRONG = "#D55E00"  # vermillion: a wrong prediction / a false match
MUTED = "#7f7f7f"
DPI = 120

RC = {
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 10.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e5e5",
    "grid.linewidth": 0.8,
    "axes.axisbelow": True,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "legend.frameon": False,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}


LABEL_CHARS = 24  # longest class name drawn on an axis or in a legend; tables show it whole


def short(text: object, limit: int = LABEL_CHARS) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis, so a long class name cannot push a
    figure's axes off its canvas."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def color(i: int) -> str:
    """The ``i``-th palette colour (cycling)."""
    return PALETTE[i % len(PALETTE)]


@contextmanager
def styled() -> Iterator[None]:
    """Apply the report style while a figure is built."""
    with matplotlib.rc_context(RC):
        yield


def new_figure(width: float = 6.4, height: float = 4.2) -> Figure:
    """A blank figure in the report style (call inside :func:`styled`)."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def to_png(fig: Figure) -> bytes:
    """Render ``fig`` to PNG bytes (no file, no pyplot)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()
