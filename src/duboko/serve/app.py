"""`duboko serve`: a local web studio over run folders (FastAPI).

    app = create_app(["runs/"])           # then: uvicorn.run(app, host="127.0.0.1", port=8765)

One static page (static/index.html, app.js, style.css: no external assets) and a JSON API:

    GET  /api/runs                  the runs found: name, recipe, task, panel, metrics
    GET  /api/run?name=NAME         one run: config, metrics, history.csv rows, what its panel offers
    POST /api/classify              {run, image: PNG data URL, top} -> top-k, and the input the model saw
    POST /api/generate              {run, prompt, temperature, top_k, top_p, max_new_tokens, seed}
                                    -> text/event-stream: `token` events, then `done` (or `error`)
    POST /api/next-token            {run, text, top, temperature} -> next-token table
    POST /api/attention             {run, text} -> the last attention layer's weights (GPT)
    POST /api/translate             {run, text, beam} -> output (seq2seq)
    POST /api/sample                {run, prompt | label, guidance, steps, seed, n, frames}
                                    -> grid PNG and denoising frames (diffusion)

Every refusal is a 4xx with `{"error": "one line"}` naming the allowed range; an unexpected
exception is a 500 with one line, never a traceback page. Runs are found by name (runs.py).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# (`request: Request`, imported inside `create_app`) at run time.
import asyncio
import base64
import io
import json
import math
import threading
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from duboko.errors import DubokoError
from duboko.serve.runs import PANELS, RunIndex, ServeError, Slot


@dataclass
class Limits:
    """Caps on what one request may ask for (the 4xx error gives the allowed range)."""

    max_body_bytes: int = 2 * 1024 * 1024  # request body (a 280×280 canvas PNG is ~10 KB)
    max_image_pixels: int = 1024 * 1024  # width × height of an uploaded image
    max_new_tokens: int = 1000  # tokens per generation
    max_prompt_chars: int = 2000  # prompt / text length
    max_attention_tokens: int = 128  # tokens in an attention map
    max_top: int = 50  # rows of a top-k table
    max_beam: int = 16  # seq2seq beam size
    max_images: int = 64  # diffusion images per request
    max_steps: int = 250  # diffusion denoising steps
    max_frames: int = 20  # denoising trajectory frames
    max_guidance: float = 20.0  # classifier-free guidance scale
    max_waiting: int = 4  # requests queued per model behind the one running
    wait_seconds: float = 120.0  # how long a queued request waits for its model


STATIC_FILES = {  # URL name -> (package file, media type); nothing else is served
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_HEADERS = {  # the page loads only its own files (no external assets, no inline script)
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'",
    "X-Content-Type-Options": "nosniff",
}


def _static(name: str) -> bytes:
    return resources.files("duboko.serve").joinpath("static", name).read_bytes()


# ---------------------------------------------------------------------------------------------
# Request parsing: every field checked, with the allowed range in the message.


async def read_body(request: Any, limits: Limits) -> dict[str, Any]:
    """The JSON object of a request, read up to `max_body_bytes` (413 beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServeError(400, f"bad Content-Length {declared[:40]!r}")
        if int(declared) > limits.max_body_bytes:
            raise ServeError(413, f"request body of {int(declared):,} bytes; at most {limits.max_body_bytes:,} allowed")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise ServeError(413, f"request body over {limits.max_body_bytes:,} bytes (the allowed maximum)")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServeError(400, f"the request body is not JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(body, dict):
        raise ServeError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def get_int(body: dict, key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ServeError(400, f"{key} must be an integer in {low}..{high}, got {json.dumps(value)[:60]}")
    return value


def get_float(body: dict, key: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
    value = body.get(key, default)
    bracket = "(" if open_low else "["
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if open_low else low <= value) or not value <= high:
        raise ServeError(400, f"{key} must be a number in {bracket}{low:g}, {high:g}], got {json.dumps(value)[:60]}")
    return float(value)


def get_text(body: dict, key: str, limits: Limits, default: str | None = None, allow_empty: bool = False) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise ServeError(400, f"{key} must be a string, got {json.dumps(value)[:60]}")
    if len(value) > limits.max_prompt_chars:
        raise ServeError(400, f"{key} has {len(value):,} characters; at most {limits.max_prompt_chars:,} allowed")
    if not value.strip() and not allow_empty:
        raise ServeError(400, f"{key} must not be empty")
    return value


def decode_image(data: Any, limits: Limits) -> io.BytesIO:
    """A PNG/JPEG data URL (or bare base64) -> bytes PIL can open, after checking the size
    from the header (before any pixel is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str) or not data:
        raise ServeError(400, "image must be a data URL (data:image/png;base64,...) or base64 text")
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if not head.endswith(";base64"):
            raise ServeError(400, "image must be a base64 data URL (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise ServeError(400, "image is not valid base64") from None
    buffer = io.BytesIO(raw)
    try:
        with Image.open(buffer) as img:  # lazy: reads the header only
            width, height = img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ServeError(400, f"image is not a readable picture ({str(exc).splitlines()[0][:120]})") from None
    if width * height > limits.max_image_pixels or min(width, height) < 1:
        raise ServeError(400, f"image is {width}x{height} pixels; at most {limits.max_image_pixels:,} pixels allowed")
    buffer.seek(0)
    return buffer


def png_data_url(images01: Any, nrow: int = 8, scale: int = 1, pad: int = 2) -> str:
    """Images in [0, 1], (N, C, H, W) with C 1 or 3, as one PNG grid data URL (pixels, no chart)."""
    import torch
    from PIL import Image

    images01 = images01.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images01.shape
    ncol = max(1, min(nrow, n))
    rows = math.ceil(n / ncol)
    canvas = torch.full((c, rows * (h + pad) + pad, ncol * (w + pad) + pad), 0.35)
    for i in range(n):
        r, col = divmod(i, ncol)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images01[i]
    array = (canvas * 255).round().byte()
    img = Image.fromarray(array[0].numpy(), mode="L") if c == 1 else Image.fromarray(array.permute(1, 2, 0).numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# The work of each panel (plain functions on a loaded run: run in a worker thread).


def classify(loaded: Any, image: io.BytesIO, top: int) -> dict[str, Any]:
    """The run's own preprocessing (`predict`'s path), the probabilities, and the input the
    model saw, un-normalised back to [0, 1]."""
    import tempfile

    import numpy as np
    import torch

    from duboko.data.image_folder import decode_image as decode_folder_image
    from duboko.tasks.image_classification import DATASET_CLASSES

    task, model, cfg = loaded.task, loaded.model, loaded.config.data
    inverted = False
    if cfg.dataset == "folder":
        names = list(cfg.class_names)
        with tempfile.NamedTemporaryFile(suffix=".png") as f:  # decode_image reads a file
            f.write(image.getvalue())
            f.flush()
            pixels = torch.from_numpy(np.array(decode_folder_image(  # a writable copy
                f.name, image_size=cfg.image_size, channels=cfg.channels, max_pixels=cfg.max_pixels)))
    else:
        names = list(DATASET_CLASSES[cfg.dataset])
        pixels, inverted = task.load_image_file(image)  # (28, 28) uint8, light digit on dark
    with torch.no_grad():
        x = task.eval_inputs(pixels[None])  # (1, C, S, S), normalised
        probs = torch.softmax(model(x).float(), dim=1)[0].cpu()
    values, order = probs.topk(min(top, probs.numel()))
    seen = (x.float().cpu() * cfg.std + cfg.mean).clamp(0, 1)  # what the network read, in [0, 1]
    return {
        "top": [{"class": names[int(i)], "index": int(i), "probability": float(v)} for v, i in zip(values, order)],
        "input": png_data_url(seen, nrow=1, scale=max(1, 168 // seen.shape[-1]), pad=0),
        "input_size": list(seen.shape[1:]),
        "inverted": inverted,
    }


def attention_map(loaded: Any, text: str, limits: Limits) -> dict[str, Any]:
    from duboko.evaluate.attention import collect_attention
    from duboko.evaluate.next_token import context_ids

    ids = context_ids(loaded.model, loaded.task.tokenizer, text)
    if len(ids) > limits.max_attention_tokens:
        raise ServeError(400, f"text is {len(ids)} tokens; the attention map shows at most {limits.max_attention_tokens}")
    maps, _ = collect_attention(loaded.model, loaded.task, text)
    last = maps[-1]  # the last layer's self-attention: (H, T, T)
    return {"layer": last.name, "tokens": last.queries,
            "heads": [[[round(float(v), 4) for v in row] for row in head] for head in last.weights]}


def translate(loaded: Any, text: str, beam: int) -> dict[str, Any]:
    task, model = loaded.task, loaded.model
    src = task.encode_source(text)  # (1, S); unknown pieces are a DubokoError
    ids = model.greedy_decode(src)[0] if beam == 1 else model.beam_search(src, beam)[0]
    return {"input": text, "output": task.tokenizer.decode(ids), "beam": beam}


def sample_images(loaded: Any, body: dict, limits: Limits, cancel: threading.Event | None = None) -> dict[str, Any]:
    """The grid and trajectory frames; `cancel` (set when the client has gone) stops the
    denoising loop at its next step."""
    task, model = loaded.task, loaded.model
    data = loaded.config.data
    n = get_int(body, "n", 16, 1, limits.max_images)
    steps = get_int(body, "steps", int(data.sample_steps), 1, limits.max_steps)
    seed = get_int(body, "seed", 0, 0, 2**31 - 1)
    frames = get_int(body, "frames", 8, 0, limits.max_frames)
    guidance = get_float(body, "guidance", float(data.guidance), 0.0, limits.max_guidance)
    label, prompt = body.get("label"), body.get("prompt")
    if task.conditioning == "text":
        if prompt is None:
            raise ServeError(400, "this run is prompt-conditioned: give a prompt, e.g. \"a handwritten seven\"")
        cond = {"prompts": [get_text(body, "prompt", limits, allow_empty=True)] * n}
    elif task.conditioning == "class":
        if label is None:
            cond = {"labels": task.balanced_labels(n)}
        else:
            cond = {"labels": [get_int(body, "label", None, 0, 9)] * n}
    else:
        if label is not None or prompt is not None:
            raise ServeError(400, "this run is unconditional: it takes no label or prompt")
        cond = {}
        guidance = 1.0
    keep = max(1, steps // frames) if frames else 0
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if cancel is not None and cancel.is_set():
            raise _Cancelled

    result = task.generate(model, n, sampler="ddim", steps=steps, guidance=guidance, seed=seed,
                           keep_every=keep, progress=progress, **cond)
    seconds = time.perf_counter() - t0
    nrow = 10 if n >= 10 and cond.get("labels") and label is None else min(8, n)
    to01 = lambda x: (x.float() + 1) / 2  # noqa: E731 ([-1, 1] -> [0, 1])
    kept = result.trajectory  # (t, x_t) every `keep` steps, then (-1, final images)
    if frames and len(kept) > frames:  # evenly spaced, first (noise) and last (images) included
        kept = [kept[round(i * (len(kept) - 1) / (frames - 1))] for i in range(frames)] if frames > 1 else kept[-1:]
    frame_urls = [{"t": int(t), "image": png_data_url(to01(x), nrow=nrow, scale=2)} for t, x in kept]
    return {"grid": png_data_url(to01(result.images), nrow=nrow, scale=3), "frames": frame_urls,
            "n": n, "steps": steps, "guidance": guidance, "seed": seed, "seconds": round(seconds, 3)}


class _Cancelled(Exception):
    """Raised inside the sampling thread once the client has gone."""


class TokenWorker(threading.Thread):
    """Samples with `nn.sampling.generate` (the KV cache / RNN state carried between tokens)
    while holding the run's slot, and hands each decoded piece to the event loop's queue."""

    def __init__(self, slot: Slot, loaded: Any, ids: list[int], settings: dict, limits: Limits,
                 loop: asyncio.AbstractEventLoop, items: asyncio.Queue, cancel: threading.Event):
        super().__init__(name="duboko-serve-generate", daemon=True)
        self.slot, self.loaded, self.ids, self.settings, self.limits = slot, loaded, ids, settings, limits
        self.loop, self.items, self.cancel = loop, items, cancel
        self.tokens = 0
        self.stats = slot.stats

    def put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, (kind, value))
        except RuntimeError:  # the server's loop has closed (shutdown): nobody to tell
            self.cancel.set()

    def on_token(self, streamer: Any, token: int) -> None:
        if self.cancel.is_set():
            raise _Cancelled
        self.tokens += 1
        if self.first is None:
            self.first = time.perf_counter() - self.t0
        streamer(token)  # writes the new text, holding back half of a UTF-8 character

    def run(self) -> None:
        from duboko.nn.sampling import TextStreamer, generate

        try:
            self.slot.acquire(self.limits.wait_seconds)
        except ServeError as exc:
            self.put("error", exc.message)
            return
        try:
            if self.cancel.is_set():
                return
            self.stats["generations"] += 1
            s = self.settings
            streamer = TextStreamer(self.loaded.task.tokenizer.decode, lambda piece: self.put("token", piece))
            self.t0, self.first = time.perf_counter(), None
            generate(self.loaded.model, self.ids, s["max_new_tokens"], temperature=s["temperature"],
                     top_k=s["top_k"], top_p=s["top_p"], seed=s["seed"],
                     on_token=lambda t: self.on_token(streamer, t))
            streamer.flush()
            seconds = time.perf_counter() - self.t0
            self.put("done", {"tokens": self.tokens, "seconds": round(seconds, 4),
                              "first_token_seconds": round(self.first, 4) if self.first is not None else None,
                              "tokens_per_second": round(self.tokens / seconds, 2) if seconds > 0 else None})
        except _Cancelled:
            self.stats["cancelled"] += 1
        except Exception as exc:  # one line to the client; the server goes on
            self.put("error", " ".join(f"{type(exc).__name__}: {exc}".split())[:300])
        finally:
            self.slot.release()


# ---------------------------------------------------------------------------------------------
# The app.


def run_summary(name: str, path: Path) -> dict[str, Any]:
    """What the runs list shows, from config.json and metrics.json (bounded JSON reads)."""
    from duboko.io import read_json

    try:
        config = read_json(path / "config.json")
        metrics = read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    except DubokoError as exc:
        return {"name": name, "error": str(exc).splitlines()[0][:200]}
    model = config.get("model", {}) if isinstance(config, dict) else {}
    task = config.get("task", "") if isinstance(config, dict) else ""
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} \
        if isinstance(metrics, dict) else {}
    return {"name": name, "recipe": config.get("recipe", ""), "task": task, "panel": PANELS.get(task, "none"),
            "model": model.get("name", "") if isinstance(model, dict) else "", "metrics": shown}


def create_app(roots: list[str | Path], *, device: str = "cpu", limits: Limits | None = None) -> Any:
    """The FastAPI app serving the run folders under `roots` (see the module docstring)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()
    index = RunIndex(roots, device=device, max_waiting=limits.max_waiting)
    app = FastAPI(title="duboko serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.index = index
    app.state.limits = limits
    verified: dict[Path, float] = {}  # run folder -> manifest mtime when its check passed

    def error(status: int, message: str) -> JSONResponse:
        line = " ".join(str(message).split())[:500] or "error"
        return JSONResponse({"error": line}, status_code=status)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return error(exc.status, exc.message)

    @app.exception_handler(DubokoError)
    async def _duboko_error(request: Request, exc: DubokoError):
        return error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    async def in_thread(fn, *args):
        return await asyncio.to_thread(fn, *args)

    def loaded_run(name: Any, panel: str) -> tuple[Slot, Any]:
        """The run's slot and its loaded model; a run of another family is refused from its
        config.json's task, before any model is loaded."""
        slot = index.slot(name)
        summary = run_summary(name, slot.run.run_dir)
        if "error" in summary:
            raise ServeError(400, summary["error"])
        task = summary["task"]
        if PANELS.get(task) != panel:
            raise ServeError(400, f"run {name!r} is a {task!r} run; this needs a {panel} run")
        return slot, slot.loaded()

    async def exclusive(slot: Slot, fn, *args):
        """`fn(*args)` in a worker thread, holding the run's slot (one at a time, bounded queue)."""
        await slot.acquire_async(limits.wait_seconds)
        try:
            return await in_thread(fn, *args)
        finally:
            slot.release()

    async def run_panel(body: dict, panel: str, fn, *args):
        slot, loaded = await in_thread(loaded_run, body.get("run"), panel)
        return await exclusive(slot, fn, loaded, *args)

    # -- the page ------------------------------------------------------------------------------
    @app.get("/")
    async def page():
        return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC_FILES:  # a fixed table: no path from the request reaches the disk
            raise ServeError(404, f"no static file {name[:80]!r}")
        file, media = STATIC_FILES[name]
        return Response(_static(file), media_type=media, headers={"X-Content-Type-Options": "nosniff"})

    # -- runs ------------------------------------------------------------------------------------
    @app.get("/api/runs")
    async def list_runs():
        runs = await in_thread(index.scan)
        return {"roots": [str(r) for r in index.roots], "runs": [run_summary(n, p) for n, p in runs.items()],
                "limits": asdict(limits)}

    def run_details(name: str) -> dict[str, Any]:
        from duboko import registry
        from duboko.train.run import load_config, read_history, verify_manifest

        path = index.path(name)
        stamp = (path / "manifest.json").stat().st_mtime
        if verified.get(path) != stamp:  # the check eval makes, before anything is parsed
            verify_manifest(path)
            verified[path] = stamp
        cfg = load_config(path)
        summary = run_summary(name, path)
        try:
            family = registry.get_spec(cfg.model["name"]).family
        except DubokoError:
            family = ""
        data = cfg.data
        return {**summary, "config": cfg.to_dict(),
                "history": read_history(path), "family": family,
                "attention": cfg.task == "language-model" and family == "transformer",
                "conditioning": cfg.model.get("conditioning", "none") if cfg.task in ("diffusion", "ldm") else None,
                "defaults": {"steps": getattr(data, "sample_steps", None), "guidance": getattr(data, "guidance", None)}
                if cfg.task in ("diffusion", "ldm") else {}}

    @app.get("/api/run")
    async def run_info(name: str = ""):
        return await in_thread(run_details, name)

    # -- classifier ------------------------------------------------------------------------------
    @app.post("/api/classify")
    async def classify_endpoint(request: Request):
        body = await read_body(request, limits)
        image = decode_image(body.get("image"), limits)
        top = get_int(body, "top", 10, 1, limits.max_top)
        return await run_panel(body, "classifier", classify, image, top)

    # -- language models -------------------------------------------------------------------------
    @app.post("/api/next-token")
    async def next_token(request: Request):
        from duboko.evaluate.next_token import next_token_table

        body = await read_body(request, limits)
        text = get_text(body, "text", limits)
        top = get_int(body, "top", 10, 1, limits.max_top)
        temperature = get_float(body, "temperature", 1.0, 0.0, 10.0, open_low=True)

        def table(loaded):
            rows = next_token_table(loaded.model, loaded.task.tokenizer, text, top, temperature)
            return {"rows": [{"token": t, "id": i, "probability": p} for t, i, p in rows]}

        return await run_panel(body, "language-model", table)

    @app.post("/api/attention")
    async def attention(request: Request):
        body = await read_body(request, limits)
        text = get_text(body, "text", limits)
        return await run_panel(body, "language-model", attention_map, text, limits)

    @app.post("/api/generate")
    async def generate(request: Request):
        body = await read_body(request, limits)
        prompt = get_text(body, "prompt", limits, default="\n", allow_empty=True)
        settings = {
            "max_new_tokens": get_int(body, "max_new_tokens", 200, 1, limits.max_new_tokens),
            "temperature": get_float(body, "temperature", 0.8, 0.0, 10.0),
            "top_k": get_int(body, "top_k", 0, 0, 1_000_000),
            "top_p": get_float(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
            "seed": get_int(body, "seed", None, 0, 2**31 - 1),
        }
        slot, loaded = await in_thread(loaded_run, body.get("run"), "language-model")
        ids = loaded.task.tokenizer.encode(prompt or "\n")
        if not ids:
            raise ServeError(400, f"the prompt {prompt[:60]!r} encodes to no tokens for this model")
        if slot.waiting >= slot.max_waiting:
            raise ServeError(503, f"this model is busy: {slot.waiting} requests already wait (at most "
                                  f"{slot.max_waiting}); try again shortly")
        return StreamingResponse(stream_tokens(request, slot, loaded, ids, settings), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_tokens(request: Request, slot: Slot, loaded: Any, ids: list[int], settings: dict):
        """Server-sent events: `token` {text} per piece, then `done` {pieces, seconds,
        first_token_seconds}, or `error` {error}. The sampling runs in a worker thread that
        holds the model's slot; a closed connection sets `cancel`, and the worker stops at its
        next token and frees the slot (nothing here needs to be awaited for that)."""
        items: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        worker = TokenWorker(slot, loaded, ids, settings, limits, asyncio.get_running_loop(), items, cancel)
        worker.start()
        try:
            while True:
                kind, value = await items.get()
                if kind == "token":
                    yield f"event: token\ndata: {json.dumps({'text': value})}\n\n"
                    if await request.is_disconnected():
                        break
                elif kind == "done":
                    yield f"event: done\ndata: {json.dumps(value)}\n\n"
                    break
                else:
                    yield f"event: error\ndata: {json.dumps({'error': value})}\n\n"
                    break
        finally:
            cancel.set()

    # -- seq2seq and diffusion -----------------------------------------------------------------
    @app.post("/api/translate")
    async def translate_endpoint(request: Request):
        body = await read_body(request, limits)
        text = get_text(body, "text", limits)
        beam = get_int(body, "beam", 1, 1, limits.max_beam)
        return await run_panel(body, "seq2seq", translate, text, beam)

    @app.post("/api/sample")
    async def sample_endpoint(request: Request):
        body = await read_body(request, limits)
        for key in ("n", "steps", "seed", "frames", "guidance", "label"):  # checked before any model loads
            if key in body and body[key] is not None:
                high = {"n": limits.max_images, "steps": limits.max_steps, "seed": 2**31 - 1,
                        "frames": limits.max_frames, "label": 9}.get(key)
                if key == "guidance":
                    get_float(body, key, 0.0, 0.0, limits.max_guidance)
                else:
                    get_int(body, key, 0, 0 if key in ("seed", "frames", "label") else 1, high)
        slot, loaded = await in_thread(loaded_run, body.get("run"), "diffusion")
        cancel = threading.Event()
        work = asyncio.ensure_future(exclusive(slot, sample_images, loaded, body, limits, cancel))
        while not work.done():  # a closed tab stops the denoising at its next step
            await asyncio.wait({work}, timeout=0.2)
            if not work.done() and await request.is_disconnected():
                cancel.set()
        try:
            return work.result()
        except _Cancelled:
            slot.stats["samples_cancelled"] += 1
            raise ServeError(499, "the client closed the connection; sampling stopped") from None

    return app
