"""report.html: one self-contained page per run folder (or a comparison page for several).

    write_report(run_dir)                          # run_dir/report.html from the files alone
    write_report(run_dir, model=model, task=task)  # + the top-loss gallery / next-token table
    html = build_report([run_a, run_b])            # a comparison page

Everything is inline: styles in one <style>, pictures as base64 `data:image/png` URIs, so the
page opens offline and names no external address. The page shows the recipe and the resolved
config, the environment (device, precision, threads, ranks, from config.json and metrics.json;
package versions of the process that wrote the page), timings, the training curves from
history.csv, the final metrics, and per family: the confusion matrix and per-class P/R/F1 and
the top-loss gallery (classifiers), the samples per epoch and a next-token table (language
models), the test predictions (seq2seq), the sample grids per epoch and the final one, the guidance sweep
(conditional runs) and the noising strip (diffusion; drawn from the model when an older run
folder lacks guidance_sweep.png or noising.png).

A run folder is input from a file: every file read is bounded in size and count, PNGs are
checked by their signature, and every text goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from duboko.errors import DubokoError
from duboko.evaluate.model_card import dataset_name, scalar_metrics, versions
from duboko.evaluate.plots import figure, plot_confusion
from duboko.io import atomic_write_text, read_csv_rows, read_json

REPORT = "report.html"
MAX_TEXT_BYTES = 64 * 1024  # one sample file, test_predictions.tsv
MAX_PNG_BYTES = 8 * 1024 * 1024
MAX_PICTURES = 40
MAX_SAMPLES = 30
MAX_TSV_ROWS = 200
MAX_RUNS = 20
DIFFUSION_TASKS = ("diffusion", "ldm")
NOISING_PICTURE, SWEEP_PICTURE, FINAL_SAMPLES = "noising.png", "guidance_sweep.png", "samples.png"
MAX_TB_BYTES = 64 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1100px; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #446; } h2 { color: #335; margin-top: 1.6em; } h3 { color: #446; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccd; padding: 2px 8px; text-align: left; }
th { background: #eef; } td.num { text-align: right; font-family: monospace; }
pre { background: #f6f6fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0; }
details { margin: 0.4em 0; } .muted { color: #777; font-size: 0.9em; }
nav a { margin-right: 1em; }
figure { margin: 0.6em 0 1.2em 0; } figcaption { color: #555; font-size: 0.9em; max-width: 900px; }
"""


# -- reading a run folder, bounded --------------------------------------------------------------------
def _read_text(path: Path, limit: int = MAX_TEXT_BYTES) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n… (cut)" if len(data) > limit else "")


def _png_uri(path: Path) -> str | None:
    """A PNG file as a data URI, or None when it is too large or not a PNG."""
    if not path.is_file() or path.stat().st_size > MAX_PNG_BYTES:
        return None
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _drawn(draw) -> str | None:
    """Run `draw(path)` (a function writing a PNG through `plots.figure`) into a temporary
    folder and return the picture as a data URI."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "picture.png"
        draw(path)
        return _png_uri(path) if path.exists() else None


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def load_run_files(run_dir: str | Path) -> dict[str, Any]:
    """config.json, metrics.json and history.csv of a run folder (metrics/history may be absent)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise DubokoError(f"{str(run_dir)!r} is not a run folder: it has no config.json")
    config = read_json(run_dir / "config.json")
    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    if not isinstance(config, dict) or not isinstance(metrics, dict):
        raise DubokoError(f"{run_dir}: config.json and metrics.json must each hold a JSON object")
    history = read_csv_rows(run_dir / "history.csv") if (run_dir / "history.csv").is_file() else []
    return {"dir": run_dir, "config": config, "metrics": metrics, "history": history}


# -- HTML pieces ------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _table(head: list[str] | None, rows: list[list[Any]]) -> str:
    out = ["<table>" + ("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" if head else "")]
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{_e(_fmt(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def _figure(uri: str | None, alt: str, caption: str, width: int = 0) -> str:
    """A picture with its caption under it (the caption is plain text: escaped here)."""
    return f"<figure>{_img(uri, alt, width)}<figcaption>{_e(caption)}</figcaption></figure>"


def _img(uri: str | None, alt: str, width: int = 0) -> str:
    style = f' style="max-width: {width}px"' if width else ""
    return f'<img alt="{_e(alt)}"{style} src="{uri}">' if uri else f'<p class="muted">({_e(alt)}: no picture)</p>'


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


# -- curves ---------------------------------------------------------------------------------------------------
def _curve_metrics(history: list[dict]) -> list[str]:
    """The metric names with train_/val_ columns (loss first), e.g. ["loss", "accuracy"]."""
    names: list[str] = []
    for row in history:
        for key in row:
            for prefix in ("train_", "val_"):
                if key.startswith(prefix) and _number(row[key]) is not None and key[len(prefix):] not in names:
                    names.append(key[len(prefix):])
    names.sort(key=lambda n: (n != "loss", n))
    return names[:6]


def draw_curves(history: list[dict], path: Path, title: str = "") -> None:
    """One panel per metric (train vs validation against the epoch), and the learning rate."""
    metrics = _curve_metrics(history)
    has_lr = any(_number(r.get("lr")) is not None for r in history)
    panels = metrics + (["lr"] if has_lr else [])
    if not panels:
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    with figure(path, rows, cols, size=(4.2 * cols, 3.2 * rows), title=title) as (fig, axes):
        for k in range(rows * cols):
            ax = axes[k // cols][k % cols]
            if k >= len(panels):
                ax.axis("off")
                continue
            name = panels[k]
            keys = [("lr", "-")] if name == "lr" else [(f"train_{name}", "-o"), (f"val_{name}", "--s")]
            for key, style in keys:
                points = [(float(r["epoch"]), _number(r.get(key))) for r in history
                          if _number(r.get(key)) is not None and _number(r.get("epoch")) is not None]
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], style, label=key, ms=4)
            ax.set_xlabel("epoch")
            ax.set_title(name, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)


def step_scalars(run_dir: Path, tags: tuple[str, ...] = ("train/loss", "train/lr")) -> dict[str, list[tuple[int, float]]]:
    """Per-step scalars the engine logged to TensorBoard (every train.log_every steps), read from
    run_dir/tb with TensorBoard's own reader; {} without a tb folder, the reader, or when the
    event files are larger than MAX_TB_BYTES."""
    folder = run_dir / "tb"
    if not folder.is_dir():
        return {}
    files = [f for f in folder.glob("events.out.tfevents.*") if f.is_file()]
    if not files or sum(f.stat().st_size for f in files) > MAX_TB_BYTES:
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    try:
        events.Reload()
    except Exception:  # a truncated or foreign file: the page is drawn without the per-step panel
        return {}
    known = set(events.Tags().get("scalars", []))
    return {tag: [(int(e.step), float(e.value)) for e in events.Scalars(tag)] for tag in tags if tag in known}


def draw_steps(scalars: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Loss (and lr) against the optimizer step."""
    tags = [t for t in ("train/loss", "train/lr") if scalars.get(t)]
    with figure(path, 1, len(tags), size=(4.6 * len(tags), 3.2), title="per step (TensorBoard log)") as (fig, axes):
        for ax, tag in zip(axes[0], tags):
            ax.plot([p[0] for p in scalars[tag]], [p[1] for p in scalars[tag]], "-", ms=3)
            ax.set_xlabel("step")
            ax.set_title(tag, fontsize=10)
            ax.grid(alpha=0.3)


def draw_comparison(runs: list[dict], path: Path) -> None:
    """Validation (else training) loss per epoch of several runs on one axis."""
    with figure(path, size=(7, 4), title="loss per epoch") as (fig, axes):
        ax = axes[0][0]
        for run in runs:
            for key, style in (("val_loss", "-o"), ("train_loss", "--")):
                points = [(float(r["epoch"]), _number(r.get(key))) for r in run["history"]
                          if _number(r.get(key)) is not None and _number(r.get("epoch")) is not None]
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], style, ms=4, label=f"{run['label']} {key}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


# -- sections -------------------------------------------------------------------------------------------------
def _overview(run: dict) -> str:
    config, metrics = run["config"], run["metrics"]
    model = config.get("model", {})
    return _table(None, [
        ["recipe", config.get("recipe", "")],
        ["description", config.get("description", "")],
        ["task", config.get("task", "")],
        ["model", model.get("name", "")],
        ["data set", dataset_name(config)],
        ["parameters", metrics.get("parameters", "")],
        ["run folder", str(run["dir"])],
    ])


def _environment(run: dict) -> str:
    config, metrics = run["config"], run["metrics"]
    train = config.get("train", {})
    rows = [
        ["device (train.device)", train.get("device", "")],
        ["precision (used)", metrics.get("precision", train.get("precision", ""))],
        ["threads (train.num_threads, 0 = torch default)", train.get("num_threads", "")],
        ["ranks (world size)", metrics.get("world_size", 1)],
        ["global batch size", metrics.get("global_batch_size", train.get("batch_size", ""))],
        ["channels_last / compile", f"{train.get('channels_last', False)} / {train.get('compile', False)}"],
    ]
    versions_rows = [[k, v] for k, v in versions().items()]
    return (_table(["setting", "value"], rows)
            + '<p class="muted">Package versions of the process that wrote this page:</p>'
            + _table(["package", "version"], versions_rows))


def _timings(run: dict) -> str:
    metrics, history = run["metrics"], run["history"]
    rows = [[k, metrics[k]] for k in ("train_seconds", "wall_seconds", "epochs", "steps", "skipped_steps") if k in metrics]
    seconds = [_number(r.get("seconds")) for r in history]
    seconds = [s for s in seconds if s is not None]
    if seconds:
        rows.append(["seconds per epoch (mean)", sum(seconds) / len(seconds)])
        steps = _number(metrics.get("steps"))
        train_s = _number(metrics.get("train_seconds"))
        if steps and train_s:
            rows.append(["milliseconds per step", 1000 * train_s / steps])
    return _table(["timing", "value"], rows) if rows else '<p class="muted">(no timings: metrics.json is missing)</p>'


def _classifier(run: dict, model: Any, task: Any) -> str:
    metrics = run["metrics"]
    parts = []
    cm = metrics.get("confusion_matrix")
    report = metrics.get("classification_report")
    if isinstance(report, dict):
        classes = [k for k in report if isinstance(report[k], dict) and k not in ("macro avg", "weighted avg")]
        rows = [[k, report[k].get("precision"), report[k].get("recall"), report[k].get("f1"), report[k].get("support")]
                for k in classes + [k for k in ("macro avg", "weighted avg") if k in report]]
        parts.append("<h3>Per-class precision, recall, F1</h3>" + _table(["class", "precision", "recall", "F1", "support"], rows))
        if isinstance(cm, list) and cm and len(cm) == len(classes) <= 100:
            parts.append("<h3>Confusion matrix</h3>" + _img(_drawn(lambda p: plot_confusion(cm, classes, p)), "confusion matrix", 520))
    if model is not None and task is not None and hasattr(task, "eval_inputs"):
        from duboko.evaluate.interpret import plot_top_losses, top_losses

        top = top_losses(model, task, n=min(25, len(task.splits["test"][0])))
        parts.append("<h3>Top losses (test)</h3><p class=\"muted\">true / predicted, probability of the prediction, loss</p>"
                     + _img(_drawn(lambda p: plot_top_losses(top, p, title="test images with the highest loss")), "top losses"))
    elif (run["dir"] / "top_losses.png").is_file():
        parts.append("<h3>Top losses (test)</h3>" + _img(_png_uri(run["dir"] / "top_losses.png"), "top losses"))
    return "".join(parts)


def _language_model(run: dict, model: Any, task: Any) -> str:
    parts = []
    folder = run["dir"] / "samples"
    files = sorted(folder.glob("*.txt"), key=_natural_key)[:MAX_SAMPLES] if folder.is_dir() else []
    if files:
        parts.append("<h3>Samples per epoch</h3>")
        for f in files:
            opened = " open" if f == files[-1] else ""  # the last (final) sample shown, the others folded
            parts.append(f"<details{opened}><summary>{_e(f.stem)}</summary><pre>{_e(_read_text(f))}</pre></details>")
    tokenizer = getattr(task, "tokenizer", None)
    if model is not None and tokenizer is not None:
        from duboko.evaluate.next_token import next_token_table

        prompt = run["config"].get("data", {}).get("sample_prompt") or "The "
        try:
            table = next_token_table(model, tokenizer, prompt, top=10)
        except DubokoError as exc:
            parts.append(f'<p class="muted">(no next-token table: {_e(exc)})</p>')
        else:
            parts.append(f"<h3>Next token after {_e(repr(prompt))}</h3>"
                         + _table(["token", "id", "probability"], [[repr(t), i, p] for t, i, p in table]))
    return "".join(parts)


def _seq2seq(run: dict) -> str:
    path = run["dir"] / "test_predictions.tsv"
    if not path.is_file():
        return ""
    lines = [line for line in _read_text(path).splitlines() if line.strip()]
    rows = [line.split("\t") for line in lines]
    width = max((len(r) for r in rows), default=0)
    # the task writes a header row (source, reference, prediction, correct)
    head = rows[0] if rows and not any(c.strip().isdigit() for c in rows[0]) and len(rows) > 1 else None
    body = rows[1:] if head else rows
    head = head or [f"column {i + 1}" for i in range(width)]
    note = ""
    if "correct" in head:  # the mistakes first: they are what a learner wants to see
        col = head.index("correct")
        body = sorted(body, key=lambda r: len(r) > col and r[col].strip() == "1")
        note = ", mistakes first"
    shown = body[:MAX_TSV_ROWS]
    return (f"<h3>Test predictions ({len(body)} rows{note}; {len(shown)} shown)</h3>"
            + _table(head, [r + [""] * (width - len(r)) for r in shown]))


def _guidance_of(metrics: dict, config: dict) -> str:
    """", guidance w" of a conditional run's samples ("" for an unconditional one)."""
    if str(config.get("model", {}).get("conditioning", "none")) == "none":
        return ""
    value = metrics.get("sample_guidance", config.get("data", {}).get("guidance"))
    return f", guidance {_fmt(value)}" if value is not None else ""


def _diffusion(run: dict, model: Any, task: Any) -> tuple[str, set[str]]:
    """The final samples, the guidance sweep (conditional runs), the noising strip and the
    sample grids per epoch; the run folder's files, else (for an older run folder) drawn with
    the task when `duboko report` loaded the model. Returns the HTML and the pictures shown."""
    folder, config, metrics = run["dir"], run["config"], run["metrics"]
    data = config.get("data", {})
    conditioning = str(config.get("model", {}).get("conditioning", "none"))
    can_draw = model is not None and task is not None and hasattr(task, "write_guidance_sweep")
    parts: list[str] = []
    if (folder / FINAL_SAMPLES).is_file():
        note = (f"{_fmt(metrics.get('sample_count', ''))} samples scored, the first 100 shown "
                f"({metrics.get('sample_sampler', data.get('sampler', ''))}, "
                f"{_fmt(metrics.get('sample_steps', data.get('sample_steps', '')))} steps{_guidance_of(metrics, config)})")
        if "prompt_accuracy" in metrics:
            note += f"; prompt_accuracy {_fmt(metrics['prompt_accuracy'])}"
        if "fd_mnist" in metrics:
            note += f", fd_mnist {_fmt(metrics['fd_mnist'])} (real images {_fmt(metrics.get('fd_mnist_real', '?'))})"
        parts.append("<h3>Final samples</h3>" + _figure(_png_uri(folder / FINAL_SAMPLES), "final samples", note, 480))
    if conditioning != "none":
        caption = ("Rows: the classifier-free guidance scale w (0: unconditional, 1: conditional only, above 1: pushed "
                   "towards the condition); columns: the ten digits (or a held-out prompt for each); the same starting "
                   "noise down each column, so only w changes.")
        uri = _png_uri(folder / SWEEP_PICTURE)
        if uri is None and can_draw:
            uri = _drawn(lambda p: task.write_guidance_sweep(model, p))
            caption += " (Drawn now from the model: the run folder has no guidance_sweep.png.)"
        parts.append("<h3>Guidance sweep</h3>" + (_figure(uri, "guidance sweep", caption, 900) if uri else
                     '<p class="muted">(no guidance sweep: the run folder has none; `duboko report RUN` without '
                     "--files-only draws it from the model)</p>"))
    caption = ("The forward process x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε on test images with this run's noise schedule "
               f"({data.get('beta_schedule', '?')}): the denoiser learns to undo each column.")
    if config.get("task") == "ldm":
        caption += " The noise is added to the VAE latents; each panel is the noisy latent decoded by the VAE."
    uri = _png_uri(folder / NOISING_PICTURE)
    if uri is None and can_draw:
        uri = _drawn(task.write_noising_strip)
        caption += " (Drawn now: the run folder has no noising.png.)"
    parts.append("<h3>Noising strip</h3>" + (_figure(uri, "noising strip", caption, 820) if uri else
                 '<p class="muted">(no noising strip: the run folder has none; `duboko report RUN` without '
                 "--files-only draws it)</p>"))
    grids = sorted((folder / "samples").glob("epoch_*.png"), key=_natural_key)[:MAX_PICTURES] if (folder / "samples").is_dir() else []
    if grids:
        rows = "the digits 0-9 in each row" if conditioning != "none" else "unconditional"
        parts.append(f"<h3>Sample grids per epoch</h3><p class=\"muted\">{_e(data.get('sampler', ''))}, "
                     f"{_e(data.get('grid_steps', ''))} steps{_e(_guidance_of({}, config))}, the same seed every epoch "
                     f"({rows}); the last epoch open, the others folded.</p>")
        for g in grids:
            body = _img(_png_uri(g), f"samples/{g.name}")
            parts.append(f"<details{' open' if g == grids[-1] else ''}><summary>{_e(g.stem)}</summary>{body}</details>")
    shown = {FINAL_SAMPLES, NOISING_PICTURE, SWEEP_PICTURE} | {f"samples/{g.name}" for g in grids}
    return "".join(parts), shown


def _pictures(run: dict, skip: set[str]) -> str:
    """The task's own PNGs: samples/*.png (diffusion grids per epoch) and the run folder's
    top-level pictures (samples, guidance sweep, noising strip) not already shown."""
    folder = run["dir"]
    found = sorted((folder / "samples").glob("*.png"), key=_natural_key) if (folder / "samples").is_dir() else []
    found = [p for p in found if f"samples/{p.name}" not in skip]
    found += [p for p in sorted(folder.glob("*.png"), key=_natural_key) if p.name not in skip]
    parts = []
    for p in found[:MAX_PICTURES]:
        uri = _png_uri(p)
        if uri:
            parts.append(f"<h3>{_e(p.relative_to(folder))}</h3>" + _img(uri, p.name))
    return "".join(parts)


def run_section(run: dict, model: Any = None, task: Any = None, anchor: str = "run") -> str:
    config, metrics, history = run["config"], run["metrics"], run["history"]
    family = str(config.get("task", ""))
    parts = [f'<section id="{_e(anchor)}"><h1>{_e(run["label"])}</h1>', _overview(run)]
    parts.append("<h2>Final metrics</h2>")
    scalars = scalar_metrics(metrics)
    parts.append(_table(["metric", "value"], [[k, v] for k, v in scalars.items()]) if scalars
                 else '<p class="muted">(no metrics.json: the run did not finish)</p>')
    parts.append("<h2>Training curves</h2>")
    parts.append(_img(_drawn(lambda p: draw_curves(history, p, str(config.get("recipe", "")))), "training curves")
                 if history else '<p class="muted">(no history.csv)</p>')
    steps = step_scalars(run["dir"])
    if len(steps.get("train/loss", [])) >= 2:
        parts.append(_img(_drawn(lambda p: draw_steps(steps, p)), "per-step curves", 760))
    if history:
        columns = list(dict.fromkeys(k for r in history for k in r))
        parts.append("<details><summary>history.csv</summary>"
                     + _table(columns, [[r.get(c, "") for c in columns] for r in history]) + "</details>")
    family_html = ""
    shown: set[str] = set()
    if family in DIFFUSION_TASKS:
        family_html, shown = _diffusion(run, model, task)
    elif family == "image-classification" or "confusion_matrix" in metrics:
        family_html = _classifier(run, model, task)
    elif family == "language-model":
        family_html = _language_model(run, model, task)
    elif family == "seq2seq":
        family_html = _seq2seq(run)
    skip = {"curves.png", "confusion_matrix.png", "top_losses.png"} if family_html or "confusion_matrix" in metrics else {"curves.png"}
    family_html += _pictures(run, skip | shown)
    if family_html:
        parts.append(f"<h2>{_e(family or 'task')}</h2>" + family_html)
    parts.append("<h2>Timings</h2>" + _timings(run))
    parts.append("<h2>Environment</h2>" + _environment(run))
    parts.append("<h2>Resolved config</h2><pre>" + _e(json.dumps(config, indent=2)) + "</pre>")
    return "".join(parts) + "</section>"


def _comparison(runs: list[dict]) -> str:
    names: list[str] = []
    for run in runs:
        names += [k for k in scalar_metrics(run["metrics"]) if k not in names]
    rows = [[k] + [run["metrics"].get(k, "") for run in runs] for k in names]
    links = "".join(f'<a href="#run{i}">{_e(r["label"])}</a>' for i, r in enumerate(runs))
    return ("<section><h1>Comparison</h1><nav>" + links + "</nav>"
            + _table(["metric"] + [r["label"] for r in runs], rows)
            + _img(_drawn(lambda p: draw_comparison(runs, p)), "loss comparison") + "</section>")


def build_report(run_dirs: list[str | Path], models: dict[int, tuple[Any, Any]] | None = None) -> str:
    """The HTML of one run's report or, for several, a comparison page followed by each run.
    `models[i] = (model, task)` adds what needs the trained model for run i (top losses,
    next-token table)."""
    if not run_dirs:
        raise DubokoError("a report needs at least one run folder")
    if len(run_dirs) > MAX_RUNS:
        raise DubokoError(f"at most {MAX_RUNS} run folders in one report, got {len(run_dirs)}")
    models = models or {}
    runs = [load_run_files(d) for d in run_dirs]
    for run in runs:
        run["label"] = f"{run['config'].get('recipe', '?')} ({run['dir'].name})"
    title = runs[0]["label"] if len(runs) == 1 else f"comparison of {len(runs)} runs"
    body = _comparison(runs) if len(runs) > 1 else ""
    body += "".join(run_section(run, *models.get(i, (None, None)), anchor=f"run{i}") for i, run in enumerate(runs))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>duboko report: {_e(title)}</title><style>{STYLE}</style></head><body>"
            f"{body}<p class=\"muted\">Written by duboko; self-contained (no external files).</p></body></html>\n")


def write_report(run_dir: str | Path, model: Any = None, task: Any = None, out: str | Path | None = None) -> Path:
    """Write run_dir/report.html (or `out`) atomically; with `model` and `task` (the trained
    model and its set-up task, as `Trainer.finish` has them) the model-based sections too."""
    path = Path(out) if out is not None else Path(run_dir) / REPORT
    text = build_report([run_dir], {0: (model, task)} if model is not None else None)
    atomic_write_text(path, text)
    return path


def write_comparison(run_dirs: list[str | Path], out: str | Path,
                     models: dict[int, tuple[Any, Any]] | None = None) -> Path:
    path = Path(out)
    atomic_write_text(path, build_report(run_dirs, models))
    return path
