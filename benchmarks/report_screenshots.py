"""Screenshots of `duboko report` pages in the system's Chromium, with the network cut off.

    python benchmarks/report_screenshots.py RUN [RUN ...] --out-dir docs/img
    python benchmarks/report_screenshots.py runs/cnn runs/gpt --name mnist-cnn --name shakespeare-gpt

For each run folder it writes the run's report.html through the library, as `duboko report RUN`
does (the trained model loaded, so the model-based sections are there; `--files-only` skips
that), opens it in headless Chromium (Playwright driving Debian's `chromium`, no browser
download) with the network disabled (the context is offline and every request that is not a
data: or file: URL is aborted and counted), and writes

    OUT_DIR/report-<name>.png          the top of the page (1280 px wide, --height px tall)
    OUT_DIR/report-<name>-family.png   the family's section (confusion matrix, samples, sweep...),
                                       when it starts below the first shot

<name> is the run's recipe unless --name gives one (in the order of the runs). It prints JSON:
each run's files, page height, and how many requests to the network were attempted (must be 0:
the page is self-contained) and how many requests failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

NO_CHROMIUM = "no system Chromium on PATH (Debian: apt-get install chromium)"
LOCAL_SCHEMES = ("data:", "file:", "about:")


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def write_run_report(run: str | Path, files_only: bool = False, device: str = "cpu", out: str | Path | None = None) -> Path:
    """run/report.html (or `out`), exactly as `duboko report RUN` writes it."""
    from duboko.evaluate.report import write_report
    from duboko.train.run import load_run

    model = task = None
    if not files_only:
        loaded = load_run(run, device=device)
        model, task = loaded.model, loaded.task
    return write_report(run, model, task, out=out)


def open_offline(html: str | Path, shots: list[tuple[Path, str | None]], width: int = 1280, height: int = 1400,
                 executable: str | None = None) -> dict:
    """Open `html` (a file) in headless Chromium with the network disabled and take `shots`:
    (png path, None) for the top of the page, (png path, CSS selector) for a shot starting at
    that element (skipped when it is missing or inside the first shot). Returns the page height,
    the requests attempted beyond data:/file: URLs, the failed requests, page errors and the
    shots taken."""
    from playwright.sync_api import sync_playwright

    executable = executable or chromium_path()
    if not executable:
        raise RuntimeError(NO_CHROMIUM)
    network: list[str] = []
    failed: list[str] = []
    errors: list[str] = []
    taken: list[str] = []

    def gate(route) -> None:
        url = route.request.url
        if url.startswith(LOCAL_SCHEMES):
            route.continue_()
        else:
            seen(url)
            route.abort("internetdisconnected")

    def seen(url: str) -> None:
        if not url.startswith(LOCAL_SCHEMES) and url not in network:
            network.append(url)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"], headless=True)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, offline=True)
            context.route("**/*", gate)
            page = context.new_page()
            # Requests that bypass routing (none expected) are still seen here.
            page.on("request", lambda r: seen(r.url))
            page.on("requestfailed", lambda r: failed.append(f"{r.url} ({r.failure})"))
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(Path(html).resolve().as_uri(), wait_until="load")
            page_height = int(page.evaluate("document.documentElement.scrollHeight"))
            images_broken = int(page.evaluate(
                "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length"))
            for png, selector in shots:
                top = 0
                if selector is not None:
                    element = page.query_selector(selector)
                    if element is None:
                        continue
                    top = int(page.evaluate("e => e.getBoundingClientRect().top + window.scrollY", element))
                    if top + 200 < height:  # already in the first shot
                        continue
                clip = {"x": 0, "y": top, "width": width, "height": max(1, min(height, page_height - top))}
                Path(png).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(png), full_page=True, clip=clip)
                taken.append(str(png))
        finally:
            browser.close()
    return {"page_height": page_height, "network_requests": len(network), "network_urls": network[:10],
            "failed_requests": failed[:10], "page_errors": errors[:10], "images_broken": images_broken,
            "screenshots": taken}


def family_selector(task: str) -> str:
    """The family section's heading (`run_section` titles it with the task's name)."""
    return f'xpath=//h2[normalize-space(text())="{task}"]'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("runs", nargs="+", help="run folders")
    ap.add_argument("--out-dir", default="docs/img", help="folder for report-<name>.png (default docs/img)")
    ap.add_argument("--name", action="append", default=[], help="picture name per run, in order (default: its recipe)")
    ap.add_argument("--height", type=int, default=1400, help="height of each shot in px (default 1400)")
    ap.add_argument("--width", type=int, default=1280, help="page width in px (default 1280)")
    ap.add_argument("--files-only", action="store_true", help="do not load the models (report from the files alone)")
    ap.add_argument("--device", default="cpu", help="device for loading the models (default cpu)")
    args = ap.parse_args(argv)
    if args.name and len(args.name) != len(args.runs):
        ap.error(f"--name given {len(args.name)} times for {len(args.runs)} runs")
    if chromium_path() is None:
        print(f"error: {NO_CHROMIUM}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    results = []
    for i, run in enumerate(args.runs):
        config = json.loads((Path(run) / "config.json").read_text())
        name = args.name[i] if args.name else str(config.get("recipe", Path(run).name))
        html = write_run_report(run, args.files_only, args.device)
        shots = [(out_dir / f"report-{name}.png", None), (out_dir / f"report-{name}-family.png", family_selector(config.get("task", "")))]
        seen = open_offline(html, shots, args.width, args.height)
        results.append({"run": str(run), "recipe": config.get("recipe"), "html": str(html), **seen})
    print(json.dumps({"runs": results, "network_requests": sum(r["network_requests"] for r in results)}, indent=2))
    return 0 if all(r["network_requests"] == 0 and not r["failed_requests"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
