"""The HTML reports, opened in a real headless Chromium, render every figure with no console error,
and every table, figure and heading fits the page's card (measured on the element boxes).

Chromium comes from Debian (``tools/install_system_deps.sh``); without a chromium
binary this test is skipped with that reason. Screenshots of each page are left
in the test's tmp folder (and copied to $EMBEDSTORE_SCREENSHOTS when set) so a
person can look at them.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest

from embedstore.report import write_comparison, write_report
from test_report import COMPARED
from test_report_support import (
    check_pages,
    find_chromium,
    match_run,
    probe_run,
    sklearn_probe_run,
    states_study,
    tuned_study,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "report-inputs"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no chromium binary on PATH: run tools/install_system_deps.sh (Debian's chromium package)")
    return path


def _control_page(tmp_path: Path) -> Path:
    """A page with the faults the check must catch: a corrupt data URI, a network image, a script error,
    a table wider than its card and a heading cut by it."""
    good = (Path(__file__).parent / "data" / "chelsea.jpg").read_bytes()
    data = base64.b64encode(good).decode()
    page = tmp_path / "control.html"
    page.write_text(
        '<!DOCTYPE html><html><body><main style="width: 320px">'
        '<h2 style="overflow: hidden">' + "unbreakable" * 8 + "</h2>"
        '<table><tr><td style="white-space: nowrap">' + "a wide cell " * 12 + "</td></tr></table>"
        f'<img alt="fine" src="data:image/jpeg;base64,{data}" style="max-width: 100%">'
        f'<img alt="corrupt" width="200" height="100" src="data:image/png;base64,{data[:400]}">'
        '<img alt="remote" width="200" height="100" src="https://example.invalid/figure.png">'
        "<script>undefinedFunction()</script></main></body></html>"
    )
    return page


def test_reports_render_every_figure_in_headless_chromium(ham_store, inputs, tmp_path, chromium):
    storage, _ = tuned_study(ham_store, inputs)
    states_study(ham_store, inputs)
    runs = {
        "probe": shutil.copytree(probe_run(ham_store, inputs, COMPARED), tmp_path / "probe"),
        "binary": shutil.copytree(sklearn_probe_run(ham_store, inputs, "efficientnet_lite0", "mel"), tmp_path / "binary"),
        "match": shutil.copytree(match_run(ham_store, inputs), tmp_path / "match"),
    }
    pages = {name: write_report(run) for name, run in runs.items()}
    pages["studies"] = write_report(storage, out=tmp_path / "studies")
    pages["comparison"] = write_comparison(
        [probe_run(ham_store, inputs, COMPARED), *(sklearn_probe_run(ham_store, inputs, f)
                                                         for f in ("mobilenet_v2", "efficientnet_lite0"))],
        tmp_path / "comparison")
    control = _control_page(tmp_path)

    checks = check_pages([*pages.values(), control], chromium)

    shots = Path(os.environ.get("EMBEDSTORE_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    for (name, html), check in zip(pages.items(), checks):
        check.page.save(shots / f"{name}.png")
        figures = re.findall(r"!\[[^\]]*\]\(figures/([^)]+)\.png\)", html.with_suffix(".md").read_text())
        assert len(check.images) == len(figures) > 0, name
        for figure, image in zip(figures, check.images):
            assert image.loaded, f"{name}: figure {figure} did not decode"
            assert image.width >= 300 and image.height >= 100, f"{name}: figure {figure} is {image.width}x{image.height}"
            assert not image.blank, f"{name}: figure {figure} rendered blank"
        assert check.console_errors == [], f"{name}: {check.console_errors}"
        assert check.overflows == [], f"{name}: {check.overflows}"
        assert all(url.startswith(("file:", "data:")) for url in check.requests), f"{name} went to the network"

    # The same check catches a broken page: it is not a check that cannot fail.
    broken = checks[-1]
    assert [image.loaded for image in broken.images] == [True, False, False]
    assert broken.console_errors, "console errors were not captured"
    assert any(url.startswith("https://example.invalid") for url in broken.requests)
    assert sorted(problem.split(" ", 1)[0] for problem in broken.overflows) == ["h2", "table"], broken.overflows
