"""The Python API: everything the `duboko` command line does, from `import duboko`.

Each function is a thin layer over what the CLI calls (the one config path `config.resolve`, the
one engine `train.engine.Trainer`, `train.run.load_run` for inference), so the CLI and the API
cannot drift apart. Errors are the same `DubokoError`s with the same messages; nothing prints
unless asked (`verbose=True` or `progress=True`).

    import duboko
    duboko.recipes()                                        # {name: description}
    run = duboko.train("mnist-cnn", out="runs/cnn", epochs=1, batch_size=128)
    run.metrics["test_accuracy"], run.history               # metrics.json, history.csv rows
    run = duboko.load("runs/cnn")                           # verified, safetensors only
    run.predict(["digit.png", pil_image, numpy_array])      # class and probabilities
    run.evaluate()                                          # the dict of `duboko eval --json`
    lm = duboko.load("runs/gpt"); lm.generate("ROMEO:", max_new_tokens=200, seed=1)
    for piece in lm.stream("ROMEO:"): print(piece, end="")
    images = duboko.load("runs/t2i").sample("a handwritten three", n=16)   # (16, 1, 28, 28) in [0, 1]
    model = duboko.create_model("my_net", num_classes=10)   # a plain nn.Module
    duboko.summary(model, input_shape=(3, 48, 48))

Docstrings follow one style: a summary line, what the arguments mean, what comes back, and an
example (run by `tests/test_api.py` with doctest where it is cheap).
"""

from __future__ import annotations

import base64
import html
import io
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import duboko.models  # noqa: F401  (see below)
import duboko.train  # noqa: F401  (see below)
from duboko import config as C
from duboko import registry
from duboko.errors import DubokoError

# `duboko.train` and `duboko.models` are both API functions and subpackages: importing the two
# subpackages here binds them in the package as objects that are both (duboko/__init__.py), so
# that `from duboko import train` gives the same object whether or not the subpackage was
# imported before.

__all__ = ["recipes", "models", "create_model", "summary", "train", "load", "Run", "Summary", "default_run_dir"]

# Inputs from a user are bounded before any work: images larger than this many pixels, or more
# images in one `predict` call, are refused (a notebook cell should not eat all memory).
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_PREDICT_IMAGES = 4096
MAX_SAMPLES = 1024
MAX_NEW_TOKENS = 100_000


# ---------------------------------------------------------------------------------------------
# What is there: recipes and models.


def recipes() -> dict[str, str]:
    """The bundled recipes, as `duboko recipes` lists them.

    Returns:
        {recipe name: one-line description}, sorted by name.

    Example:
        >>> import duboko
        >>> "mnist-cnn" in duboko.recipes()
        True
    """
    return {name: str(C.load_recipe_file(name)[1].get("description", "")) for name in C.recipe_names()}


def models(family: str | None = None) -> dict[str, str]:
    """The registered model variants, as `duboko models` lists them.

    Args:
        family: keep only this family ("cnn", "mlp", ...); None keeps all.

    Returns:
        {model name: "[family] description"}, sorted by name.

    Example:
        >>> import duboko
        >>> duboko.models()["my_net"].startswith("[cnn]")
        True
    """
    found = {}
    for name in registry.model_names():
        spec = registry.get_spec(name)
        if family is None or spec.family == family:
            found[name] = f"[{spec.family}] {spec.description}"
    if family is not None and not found:
        families = sorted({registry.get_spec(n).family for n in registry.model_names()})
        raise DubokoError(f"no model of family {family!r}; known families: {', '.join(families)}")
    return found


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model: a plain `nn.Module` for your own training loop.

    Args:
        name: a model name (see `models()`).
        **overrides: fields of the model's config dataclass, e.g. `num_classes=10`.

    Returns:
        The model (freshly initialised, train mode, on the CPU).

    Example:
        >>> import duboko
        >>> net = duboko.create_model("mlp-mnist", hidden_sizes=[32])
        >>> sum(p.numel() for p in net.parameters())   # (784+1)·32 + (32+1)·10
        25450
    """
    return registry.create_model(name, **overrides)


class Summary:
    """The table `duboko summary` prints, as an object: `str(s)` is the table, a notebook shows
    it as HTML, and the numbers are attributes of the underlying `ModelSummary`
    (`total_params`, `trainable_params`, `mult_adds`, `rows`, ...; `to_dict()`)."""

    def __init__(self, summary: Any, depth: int | None = None):
        self._summary = summary  # duboko.evaluate.summary.ModelSummary
        self.depth = depth

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._summary, name)

    def to_dict(self) -> dict[str, Any]:
        return self._summary.to_dict()

    def __str__(self) -> str:
        return self._summary.format_table(self.depth)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(str(self))}</pre>"


def summary(
    model_or_name: nn.Module | str,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    *,
    depth: int | None = None,
    forward: bool = True,
    **overrides: Any,
) -> Summary:
    """Layer-by-layer summary with the parameter arithmetic (what `duboko summary` prints).

    Args:
        model_or_name: a registered model name, or any `nn.Module`.
        input_shape: the input without the batch dimension, e.g. (3, 48, 48); a list of shapes for
            several inputs. Optional for a registered name (its example input is used); needed for
            a module, whose input duboko cannot know.
        depth: show layers down to this depth only (None: all).
        forward: False counts parameters only, without running the model.
        **overrides: model config fields, with a name only (e.g. `image_size=64`).

    Returns:
        A `Summary`.

    Example:
        >>> import duboko
        >>> s = duboko.summary("mlp-mnist", hidden_sizes=[32])
        >>> s.total_params, s.mult_adds
        (25450, 25408)
    """
    from duboko.evaluate.summary import summarize, summarize_registered

    shapes = _input_shapes(input_shape)
    if isinstance(model_or_name, str):
        return Summary(summarize_registered(model_or_name, shapes, overrides, forward=forward), depth)
    if not isinstance(model_or_name, nn.Module):
        raise DubokoError(f"summary takes a model name or an nn.Module, got {type(model_or_name).__name__}")
    if overrides:
        raise DubokoError(f"config overrides {sorted(overrides)} need a model name, not a built module")
    if not forward:
        return Summary(summarize(model_or_name, None), depth)
    if not shapes:
        raise DubokoError("summary of an nn.Module needs input_shape (without the batch), e.g. input_shape=(3, 48, 48)")
    gen = torch.Generator().manual_seed(0)
    b1 = tuple(torch.randn((1, *s), generator=gen) for s in shapes)
    b2 = tuple(torch.randn((2, *s), generator=gen) for s in shapes)
    return Summary(summarize(model_or_name, b1, b2), depth)


def _input_shapes(input_shape: Any) -> list[list[int]] | None:
    """(3, 48, 48) -> [[3, 48, 48]]; [(3, 8), (5,)] -> [[3, 8], [5]]; None -> None."""
    if input_shape is None:
        return None
    items = list(input_shape)
    shapes = [list(s) for s in items] if items and not isinstance(items[0], int) else [items]
    if not shapes or any(not s or not all(isinstance(d, int) and d >= 1 for d in s) for s in shapes):
        raise DubokoError(f"input_shape expects positive sizes without the batch, like (3, 48, 48); got {input_shape!r}")
    return shapes


# ---------------------------------------------------------------------------------------------
# Training and loading runs.


def default_run_dir(recipe: str) -> Path:
    """runs/RECIPE, or runs/RECIPE-2, -3, ... when a run is already there (the CLI's default)."""
    base = Path("runs") / Path(recipe).stem
    out, n = base, 2
    while (out / "config.json").exists():
        out, n = Path(f"{base}-{n}"), n + 1
    return out


def train(
    recipe: str | Path | Mapping[str, Any],
    out: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
    progress: bool | None = None,
    data_dir: str | None = None,
    init_from: str | Path | Run | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    **fields: Any,
) -> Run:
    """Train a recipe into a run folder (what `duboko train` does, on the same engine).

    Args:
        recipe: a bundled recipe name (see `recipes()`), a .toml file or a config dict; with
            `resume=True`, the run folder to continue (then `out` must be None or the same).
        out: the run folder; None: runs/RECIPE (numbered if it exists), as the CLI.
        resume: continue the run in `recipe` (or `out`) from its last saved step.
        overwrite: replace an existing run in `out`.
        verbose: print the banner, per-epoch lines and report (the CLI's output).
        progress: progress bars: None on a terminal only (when verbose), True always (a notebook
            widget in Jupyter, through `tqdm.auto`), False never.
        data_dir: folder with the data files (sets data.data_dir or data.path).
        init_from: fine-tune: a run folder (or `Run`) whose weights, model and tokenizer the new
            run starts from, e.g. a GPT-2 from `duboko import-hf` (sets train.init_from).
        overrides: dotted config overrides, {"train.lr": 3e-4} or ["train.lr=3e-4"].
        **fields: bare config overrides, e.g. `epochs=1, batch_size=128`.

    Returns:
        The trained `Run`.

    Raises:
        DubokoError: a config that cannot train, naming the config key (`train.lr`, ...).

    Example (not run here: it trains):
        run = duboko.train("digits", out="runs/digits", epochs=2, overrides={"train.lr": 3e-3})
        run.metrics["test_accuracy"]
        tuned = duboko.train("shakespeare-gpt", out="runs/tuned", init_from="runs/gpt2",
                             overrides={"data.path": "my.txt"}, max_steps=200)
    """
    from duboko.train.engine import Trainer
    from duboko.train.run import CONFIG, verify_init_source

    pairs = _override_pairs(overrides, fields)
    if init_from is not None:
        if resume:
            raise DubokoError("init_from starts a new run; a resumed run continues from its own weights (drop one)")
        source = str(init_from.run_dir if isinstance(init_from, Run) else init_from)
        verify_init_source(source)  # before its config.json is parsed
        pairs.append(("train.init_from", source))
    if resume:
        if isinstance(recipe, Mapping) or (out is not None and Path(out) != Path(recipe)):
            raise DubokoError("resume continues the run folder given as `recipe`; leave `out` out or give the same folder")
        run_dir = Path(recipe)
        if not (run_dir / CONFIG).is_file():
            raise DubokoError(f"cannot resume: {run_dir / CONFIG} does not exist")
        cfg = C.resolve(run_dir, pairs, data_dir=data_dir, resume=True)
    else:
        source = dict(recipe) if isinstance(recipe, Mapping) else recipe
        cfg = C.resolve(source, pairs, data_dir=data_dir)
        run_dir = Path(out) if out is not None else default_run_dir(cfg.recipe)
    trainer = Trainer(cfg, run_dir, resume=resume, overwrite=overwrite, quiet=not verbose, progress=progress)
    metrics = trainer.fit()
    return Run(run_dir, device=cfg.train.device, metrics=metrics)


def _override_pairs(overrides: Mapping[str, Any] | Sequence[str] | None, fields: Mapping[str, Any]) -> list:
    """Keyword and dict overrides as the (key, value) pairs of `config.resolve`; strings
    ("train.lr=3e-4") are kept for resolve to parse as the CLI's --set does."""
    pairs: list = []
    if isinstance(overrides, Mapping):
        pairs += [(str(k), v) for k, v in overrides.items()]
    elif isinstance(overrides, str):
        raise DubokoError(f"overrides expects a dict or a list of 'key=value' strings, got the string {overrides!r}")
    elif overrides is not None:
        pairs += list(overrides)
    return pairs + list(fields.items())


def load(run_dir: str | Path, device: str = "auto") -> Run:
    """Open a run folder written by `duboko train` (or `duboko.train`).

    The folder is verified (every file against its SHA-256 in manifest.json) and only safetensors
    and JSON are read, never a pickle. The model is loaded on first use.

    Args:
        run_dir: the run folder.
        device: auto | cpu | cuda | cuda:N | mps.

    Returns:
        A `Run`.

    Raises:
        DubokoError: no such folder, not a run folder, or a file that does not match the manifest.

    Example (needs a run folder):
        run = duboko.load("runs/cnn")
        run.metrics["test_accuracy"], run.config.train.lr
    """
    from duboko.train.run import load_config, verify_manifest

    run_dir = Path(run_dir)
    load_config(run_dir)  # a missing or foreign folder fails here, in one line
    verify_manifest(run_dir)
    return Run(run_dir, device=device)


class Run:
    """A run folder: its config, metrics and history, and what its family can do.

    Every run: `metrics`, `history` (`history_frame()` with pandas), `config`, `evaluate()`.
    Image classifiers: `predict(images)`. Language models: `generate(prompt)`, `stream(prompt)`.
    Diffusion models: `sample(prompt_or_label, n)`. In a notebook the run shows its metrics and
    training curves. `model` and `task` are the loaded model (eval mode) and the task, set up from
    the run folder's assets (loaded, and verified, on first use)."""

    def __init__(self, run_dir: str | Path, device: str = "auto", metrics: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.device_name = device
        self._metrics = metrics
        self._loaded = None  # duboko.train.run.LoadedRun, on first use

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}, recipe={self.config.recipe!r}, task={self.config.task!r})"

    # -- what the folder holds ---------------------------------------------------------------
    @property
    def config(self) -> C.RunConfig:
        """The resolved config (`config.json`, through `config.resolve`)."""
        if self._loaded is not None:
            return self._loaded.config
        from duboko.train.run import load_config

        return load_config(self.run_dir)

    @property
    def metrics(self) -> dict[str, Any]:
        """The final metrics (`metrics.json`): test_accuracy, val_loss, train_seconds, ..."""
        if self._metrics is None:
            from duboko.io import read_json
            from duboko.train.run import METRICS

            path = self.run_dir / METRICS
            if not path.is_file():
                raise DubokoError(f"{path} does not exist: the run has not finished (`duboko.train(..., resume=True)`)")
            self._metrics = read_json(path)
        return dict(self._metrics)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per epoch (`history.csv`): epoch, train_loss, val_loss, lr, seconds, ..."""
        from duboko.train.run import read_history

        return read_history(self.run_dir)

    def history_frame(self) -> Any:
        """`history` as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise DubokoError("history_frame needs pandas (pip install pandas); `run.history` has the same rows as dicts") from None
        return pd.DataFrame(self.history)

    # -- the loaded model --------------------------------------------------------------------
    def _load(self) -> Any:
        if self._loaded is None:
            from duboko.train.run import load_run

            self._loaded = load_run(self.run_dir, self.device_name)
        return self._loaded

    @property
    def model(self) -> nn.Module:
        return self._load().model

    @property
    def task(self) -> Any:
        return self._load().task

    def _need(self, task: str, what: str, *also: str) -> Any:
        loaded = self._load()
        if loaded.config.task not in (task, *also):
            raise DubokoError(f"{self.run_dir} is a {loaded.config.task!r} run; {what} needs a {task!r} run")
        return loaded

    def evaluate(self, write_files: bool = False) -> dict[str, Any]:
        """The validation and test metrics, the same dict as `duboko eval --json`.

        Args:
            write_files: also write the task's pictures and report into the run folder.

        Example (needs a run folder):
            duboko.load("runs/cnn").evaluate()["test_accuracy"]
        """
        from duboko.train.run import evaluate_run

        metrics, _ = evaluate_run(self._load(), write_files=write_files)
        return metrics

    # -- image classification ----------------------------------------------------------------
    def predict(self, images: Any, top: int | None = None) -> list[dict[str, Any]]:
        """Classify images with an image-classification run, preprocessed as `duboko predict`
        does (grey, light digit on dark, 28×28, the run's normalisation).

        Args:
            images: one image or a list: file paths, PIL images, or numpy arrays (H, W) or
                (H, W, 3|4), uint8 in 0..255 or float in [0, 1].
            top: keep the `top` most likely classes in "probabilities" (None: all).

        Returns:
            One dict per image: {"input", "class", "probabilities": {class: p, most likely
            first}, "inverted": whether a dark-on-light image was inverted}.

        Example (needs an image-classification run):
            duboko.load("runs/cnn").predict(["digit.png", np.zeros((28, 28), np.uint8)])[0]["class"]
        """
        loaded = self._load()
        if not hasattr(loaded.task, "predict_files"):
            raise DubokoError(f"run {str(self.run_dir)!r} is a {loaded.config.task} run; `predict` needs an image-classification run")
        single = isinstance(images, (str, Path)) or not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not items or len(items) > MAX_PREDICT_IMAGES:
            raise DubokoError(f"predict takes 1 to {MAX_PREDICT_IMAGES} images, got {len(items)}")
        if top is not None and top < 1:
            raise DubokoError(f"top must be >= 1, got {top}")
        files = [_image_source(item, i) for i, item in enumerate(items)]
        results = loaded.task.predict_files(loaded.model, [f for _, f in files], top or 1_000_000)  # all classes
        return [
            {"input": label, "class": r["class"], "probabilities": dict(r["top"]), "inverted": r["inverted"]}
            for (label, _), r in zip(files, results)
        ]

    # -- language models ---------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        *,
        repetition_penalty: float = 1.0,
    ) -> str:
        """Continue `prompt` with a language-model run (what `duboko generate` prints after the
        prompt). The same seed gives the same text, on any device.

        Args:
            prompt: the text to continue ("" is a newline, as in the CLI).
            max_new_tokens: tokens to sample.
            temperature: softmax temperature; 0 is greedy.
            top_k: sample from the k most likely tokens only (None: off).
            top_p: nucleus sampling, the smallest set with this much probability (None: off).
            seed: seed of a private generator (None: a different text each call).
            repetition_penalty: >1 makes tokens already in the text less likely (1: off).

        Returns:
            The new text, without the prompt.

        Example (needs a trained language-model run):
            duboko.load("runs/gpt").generate("ROMEO:", max_new_tokens=200, temperature=0.8, seed=1)
        """
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                   repetition_penalty=repetition_penalty))

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        *,
        repetition_penalty: float = 1.0,
    ) -> Iterator[str]:
        """`generate`, yielding the text as it is produced, piece by piece (same arguments;
        `"".join(run.stream(...))` equals `run.generate(...)`). Leaving the loop early stops the
        sampling. The arguments are checked when `stream` is called, before any sampling.

        Example (needs a trained language-model run):
            for piece in duboko.load("runs/gpt").stream("ROMEO:", max_new_tokens=100, seed=1):
                print(piece, end="", flush=True)
        """
        loaded = self._need("language-model", "generate")
        _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        tok = loaded.task.tokenizer
        ids = tok.encode(prompt if prompt else "\n")
        if not ids:
            raise DubokoError(f"the prompt {prompt!r} encodes to no tokens")
        settings = {"temperature": temperature, "top_k": top_k or 0, "top_p": 1.0 if top_p is None else top_p,
                    "repetition_penalty": repetition_penalty, "seed": seed}
        return _stream_pieces(loaded.model, tok.decode, ids, max_new_tokens, settings)

    # -- diffusion ---------------------------------------------------------------------------
    def sample(
        self,
        prompt_or_label: str | int | None = None,
        n: int = 16,
        guidance: float = 4.0,
        steps: int | None = None,
        seed: int = 0,
        *,
        sampler: str | None = None,
        eta: float | None = None,
    ) -> torch.Tensor:
        """Draw images with a diffusion run (what `duboko sample` puts in its grid).

        Args:
            prompt_or_label: a prompt ("a handwritten three") for a text-to-image run, a digit for
                a label-conditioned run, None for an unconditional run (a conditioned run then
                draws the digits 0-9 in turn).
            n: number of images.
            guidance: classifier-free guidance scale (1: none; ignored by unconditional runs).
            steps: denoising steps (None: the run's sample_steps).
            seed: seed of the initial noise.
            sampler: "ddim" or "ddpm" (None: the run's).
            eta: DDIM noise, 0 deterministic (None: the run's).

        Returns:
            A CPU tensor (n, 1, 28, 28) with values in [0, 1].

        Example (needs a trained diffusion run):
            images = duboko.load("runs/t2i").sample("a handwritten three", n=16, guidance=4.0)
        """
        loaded = self._need("diffusion", "sample", "ldm")
        task = loaded.task
        if not 1 <= n <= MAX_SAMPLES:
            raise DubokoError(f"n must be in 1..{MAX_SAMPLES}, got {n}")
        if steps is not None and steps < 1:
            raise DubokoError(f"steps must be >= 1, got {steps}")
        if isinstance(prompt_or_label, bool):
            raise DubokoError(f"prompt_or_label expects a prompt, a digit or None, got {prompt_or_label!r}")
        if isinstance(prompt_or_label, str):
            cond: dict[str, Any] = {"prompts": [prompt_or_label] * n}
        elif isinstance(prompt_or_label, int):
            if not 0 <= prompt_or_label <= 9:
                raise DubokoError(f"label must be a digit 0-9, got {prompt_or_label}")
            cond = {"labels": [prompt_or_label] * n}
        elif prompt_or_label is None:
            cond = {"labels": task.balanced_labels(n)} if task.conditioning != "none" else {}
        else:
            raise DubokoError(f"prompt_or_label expects a prompt, a digit or None, got {type(prompt_or_label).__name__}")
        result = task.generate(loaded.model, n, sampler=sampler, steps=steps, guidance=guidance, eta=eta,
                               seed=seed, **cond)
        return ((result.images.float().cpu() + 1) / 2).clamp(0, 1)  # [-1, 1] -> [0, 1], (n, 1, 28, 28)

    # -- notebooks ---------------------------------------------------------------------------
    def _repr_html_(self) -> str:
        cfg = self.config
        rows = ""
        try:
            metrics = self.metrics
        except DubokoError:
            metrics = {}
        for key, value in metrics.items():
            if isinstance(value, (dict, list)):
                continue
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
            rows += f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(shown)}</td></tr>"
        parts = [f"<h4>{html.escape(str(self.run_dir))}: {html.escape(cfg.recipe)} "
                 f"({html.escape(cfg.task)}, {html.escape(str(cfg.model.get('name', '')))})</h4>",
                 f"<table>{rows}</table>" if rows else "<p>(no metrics.json yet)</p>"]
        curves = self.run_dir / "curves.png"
        if curves.is_file():
            data = base64.b64encode(curves.read_bytes()).decode("ascii")
            parts.append(f'<img alt="training curves" src="data:image/png;base64,{data}"/>')
        return "\n".join(parts)


def _stream_pieces(model: nn.Module, decode: Callable[[list[int]], str], ids: list[int], max_new_tokens: int,
                   settings: dict[str, Any]) -> Iterator[str]:
    """The text pieces of `nn.sampling.generate(model, ids, ...)` as they are produced."""
    from duboko.nn.sampling import generate

    decoder = IncrementalDecoder(decode)
    pieces: queue.Queue = queue.Queue(maxsize=64)
    cancelled = threading.Event()

    def on_token(token: int) -> None:
        if cancelled.is_set():
            raise _Cancelled
        piece = decoder.push(token)
        if piece:
            pieces.put(("piece", piece))

    def work() -> None:
        # `nn.sampling.generate` calls back per token; a thread turns the callbacks into this
        # generator's items (as Hugging Face's TextIteratorStreamer does).
        try:
            generate(model, ids, max_new_tokens, on_token=on_token, **settings)
            rest = decoder.flush()
            if rest:
                pieces.put(("piece", rest))
            pieces.put(("end", None))
        except _Cancelled:
            pieces.put(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            pieces.put(("error", exc))

    thread = threading.Thread(target=work, name="duboko-stream", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = pieces.get()
            if kind == "end":
                break
            if kind == "error":
                raise value
            yield value
    finally:
        cancelled.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                pieces.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


class _Cancelled(Exception):
    """Raised inside the sampling thread when the consumer of `Run.stream` stopped."""


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                    repetition_penalty: float) -> None:
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise DubokoError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new_tokens}")
    if temperature < 0:
        raise DubokoError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise DubokoError(f"top_k must be >= 0 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise DubokoError(f"top_p must be in (0, 1] or None, got {top_p}")
    if repetition_penalty <= 0:
        raise DubokoError(f"repetition_penalty must be > 0, got {repetition_penalty}")


class IncrementalDecoder:
    """Token ids in, new text out: `nn.sampling.IncrementalDecoder` (which decodes only the ids
    since the last complete character, not all the text so far) handing out what each token
    added; text is held back while it ends in U+FFFD, half of a multi-byte UTF-8 character."""

    def __init__(self, decode: Callable[[list[int]], str]):
        from duboko.nn.sampling import IncrementalDecoder as TextSoFar

        self._text = TextSoFar(decode)
        self._emitted = 0  # characters of the text already handed out

    def push(self, token: int) -> str:
        text = self._text.push(token)
        if text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        return self._take(text)

    def flush(self) -> str:
        """The held-back text at the end (incomplete characters as U+FFFD)."""
        return self._take(self._text.text)

    def _take(self, text: str) -> str:
        piece = text[self._emitted:]
        self._emitted = len(text)
        return piece


def _image_source(item: Any, index: int) -> tuple[str, Any]:
    """(label, something PIL can open) for a path, a PIL image or a numpy array; in-memory
    images are encoded as lossless PNG so that they take exactly the path of an image file
    through the task's preprocessing (`ImageClassificationTask.load_image_file`)."""
    import numpy as np
    from PIL import Image

    if isinstance(item, (str, Path)):
        return str(item), str(item)
    if isinstance(item, np.ndarray):
        array = item
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise DubokoError(f"image {index}: a numpy image must be (H, W), (H, W, 3) or (H, W, 4), got shape {item.shape}")
        if array.shape[0] * array.shape[1] > MAX_IMAGE_PIXELS or min(array.shape[:2]) < 1:
            raise DubokoError(f"image {index}: {array.shape[0]}x{array.shape[1]} pixels; expected 1 to {MAX_IMAGE_PIXELS}")
        if array.dtype != np.uint8:
            values = np.nan_to_num(array.astype(np.float64))
            if values.size and values.max() <= 1.0:
                values = values * 255.0  # floats in [0, 1], as the task reads float images
            array = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(array))
        label = f"<array {index}>"
    elif isinstance(item, Image.Image):
        if item.width * item.height > MAX_IMAGE_PIXELS:
            raise DubokoError(f"image {index}: {item.width}x{item.height} pixels; expected at most {MAX_IMAGE_PIXELS}")
        if item.mode in ("F", "I", "I;16"):  # PNG has no float mode: through the numpy path
            return f"<image {index}>", _image_source(np.asarray(item, dtype=np.float64), index)[1]
        image, label = item, f"<image {index}>"
    else:
        raise DubokoError(f"image {index}: expected a file path, a PIL image or a numpy array, got {type(item).__name__}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    return label, buffer
