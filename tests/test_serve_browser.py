"""`duboko serve` in a real browser: Playwright drives the system's Chromium (Debian `chromium`,
no browser download) against a uvicorn server started here on a free port, over tiny runs
trained here. It draws a stroke on the MNIST canvas and reads the probability table, types a
prompt and watches the streamed text grow, and asks a diffusion run for a grid. Screenshots go to
the test's tmp folder (printed) and, with DUBOKO_SCREENSHOTS=1, to docs/img/serve-*.png."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="duboko serve needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="duboko serve needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("playwright", reason="the browser test needs playwright (the dev extra)")

from test_serve_api import Server, train_tiny_runs  # noqa: E402

from duboko.serve.app import create_app  # noqa: E402

DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


NO_CHROMIUM = "no system Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        # Also a warning: pytest's summary lists warnings even without -rs, so the skip is never silent.
        warnings.warn(f"tests/test_serve_browser.py skipped: {NO_CHROMIUM}", pytest.PytestWarning)
        pytest.skip(NO_CHROMIUM)
    return path


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory):
    root = train_tiny_runs(tmp_path_factory.mktemp("browser") / "runs", ["cnn", "gpt", "ddpm"])
    with Server(create_app([root])) as running:
        yield running


@pytest.fixture(scope="module")
def page(chromium, server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)  # for evaluate()
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        page.wait_for_selector("#run-list button")
        page.errors = errors
        yield page
        browser.close()


def shoot(page, tmp_path: Path, name: str) -> Path:
    out = tmp_path / f"serve-{name}.png"
    page.screenshot(path=str(out), full_page=True)
    print(f"screenshot: {out}")
    if os.environ.get("DUBOKO_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, DOCS_IMG / out.name)
    return out


def test_runs_page_lists_the_runs(page, tmp_path):
    names = page.locator("#run-list button").evaluate_all("bs => bs.map(b => b.dataset.name)")
    assert names == ["cnn", "ddpm", "gpt"]
    rows = page.locator("#overview tbody tr").all_inner_texts()
    assert len(rows) == 3 and "mnist-cnn" in rows[0] and "test_accuracy" in rows[0] and "val_bpc" in rows[2]
    assert shoot(page, tmp_path, "runs").stat().st_size > 10_000
    page.click('#run-list button[data-name="gpt"]')
    page.wait_for_selector("#metrics td")
    assert "val_loss" in page.inner_text("#metrics")
    assert page.is_hidden("#pick") and page.evaluate("document.getElementById('config').textContent").count("n_embd")


def test_drawing_a_stroke_gives_a_probability_table(page, tmp_path):
    page.click('#run-list button[data-name="cnn"]')
    page.wait_for_selector("#panel-classifier:not([hidden])")
    box = page.locator("#draw").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.2
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 13):  # a "1": one vertical stroke
        page.mouse.move(x + i * 0.5, y + i * box["height"] * 0.05)
    page.mouse.up()
    page.wait_for_function("document.querySelectorAll('#probs tbody tr').length === 10")
    top_class = page.inner_text("#probs tbody tr.top td:first-child")
    assert top_class in list("0123456789")
    cells = page.locator("#probs tbody tr td:nth-child(2)").all_inner_texts()
    percents = [float(c.rstrip("%")) for c in cells]
    assert percents == sorted(percents, reverse=True) and 99 <= sum(percents) <= 101
    assert page.get_attribute("#seen", "src").startswith("data:image/png;base64,")
    assert page.inner_text("#seen-size") == "3×16×16"
    shoot(page, tmp_path, "classifier")
    assert not page.errors


def test_typed_prompt_streams_growing_text(page, tmp_path):
    page.click('#run-list button[data-name="gpt"]')
    page.wait_for_selector("#panel-language-model:not([hidden])")
    page.fill("#lm-prompt", "ROMEO:")
    page.fill("#lm-max", "400")
    page.fill("#lm-seed", "1")
    # Record the text's length at every change: streamed text grows in many steps.
    page.evaluate("""() => {
        window.lengths = [];
        const out = document.getElementById('lm-out');
        new MutationObserver(() => window.lengths.push(out.textContent.length))
            .observe(out, {childList: true, characterData: true, subtree: true});
    }""")
    page.click("#lm-go")
    page.wait_for_function("document.getElementById('lm-stats').textContent.includes('tokens/s')", timeout=60_000)
    lengths = page.evaluate("window.lengths")
    grew = [b for a, b in zip(lengths, lengths[1:]) if b > a]
    assert len(grew) >= 10, lengths  # not one block at the end
    text = page.text_content("#lm-out")
    assert text.startswith("ROMEO:") and len(text) > 200
    assert "400 tokens" in page.text_content("#lm-stats")
    page.wait_for_function("document.querySelectorAll('#next tbody tr').length === 10")
    assert not page.is_hidden("#attention-box")
    page.wait_for_function("document.getElementById('att-head').options.length > 0")
    shoot(page, tmp_path, "language-model")
    assert not page.errors


def test_diffusion_grid_appears(page, tmp_path):
    page.click('#run-list button[data-name="ddpm"]')
    page.wait_for_selector("#panel-diffusion:not([hidden])")
    assert page.is_hidden("#dm-prompt-box") and not page.is_hidden("#dm-label-box")
    page.fill("#dm-steps", "10")
    page.fill("#dm-n", "16")
    page.click("#dm-go")
    page.wait_for_selector("#dm-grid:not([hidden])", timeout=60_000)
    assert page.get_attribute("#dm-grid", "src").startswith("data:image/png;base64,")
    width = page.evaluate("document.getElementById('dm-grid').naturalWidth")
    assert width == 3 * (8 * 30 + 2)  # 8 per row, 28 px + 2 px padding, scaled 3x
    assert page.get_attribute("#dm-frame", "max") == "7"  # 8 denoising frames
    page.fill("#dm-frame", "0")
    page.dispatch_event("#dm-frame", "input")
    assert "x_t at t =" in page.inner_text("#dm-frame-t")
    page.fill("#dm-frame", "7")
    page.dispatch_event("#dm-frame", "input")
    shoot(page, tmp_path, "diffusion")
    assert not page.errors
