"""report.html in a real browser: the system's Chromium (Debian `chromium`, driven by Playwright as
benchmarks/report_screenshots.py does) opens a tiny run's report with the network disabled; the
page renders every picture, no request fails, none goes to the network, and the file names no
external address. A control page that does name one shows that the gate counts such requests."""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path

import pytest

pytest.importorskip("playwright", reason="the browser test needs playwright (the dev extra)")

from duboko.cli.main import main  # noqa: E402
from test_evaluate_report import TINY_UNET, assert_self_contained, sets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_CHROMIUM = "no system Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)"


def _script():
    spec = importlib.util.spec_from_file_location("report_screenshots", ROOT / "benchmarks" / "report_screenshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shots():
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        # Also a warning: pytest's summary lists warnings even without -rs, so the skip is never silent.
        warnings.warn(f"tests/test_report_browser.py skipped: {NO_CHROMIUM}", pytest.PytestWarning)
        pytest.skip(NO_CHROMIUM)
    return _script()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser-report") / "ddpm"
    assert main(["train", "mnist-diffusion-class", "--quiet", "--out", str(out), *sets(TINY_UNET)]) == 0
    return out


def test_report_renders_offline_with_no_network_request(shots, tiny_run, tmp_path):
    html = tiny_run / "report.html"  # as `duboko train` wrote it
    text = html.read_text()
    assert_self_contained(text)  # the grep: no http, //, url(), <link>, <script>, file:
    top, family = tmp_path / "report-top.png", tmp_path / "report-family.png"
    seen = shots.open_offline(html, [(top, None), (family, shots.family_selector("diffusion"))], height=900)
    print(f"screenshots: {seen['screenshots']}")
    assert seen["network_requests"] == 0, seen["network_urls"]
    assert seen["failed_requests"] == [] and seen["page_errors"] == []
    assert seen["images_broken"] == 0  # every inline PNG decoded and drawn
    assert seen["page_height"] > 900 and seen["screenshots"] == [str(top), str(family)]
    for png in (top, family):
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000


def test_the_gate_counts_a_page_that_reaches_out(shots, tmp_path):
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="stylesheet" href="https://cdn.example.invalid/x.css">'
                    '</head><body><p>hi</p><img src="http://example.invalid/a.png"></body></html>')
    seen = shots.open_offline(page, [(tmp_path / "leaky.png", None)], height=300)
    assert seen["network_requests"] == 2, seen
    assert sorted(seen["network_urls"]) == ["http://example.invalid/a.png", "https://cdn.example.invalid/x.css"]
    assert len(seen["failed_requests"]) == 2 and seen["images_broken"] == 1
