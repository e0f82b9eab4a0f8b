"""ONNX export of a run folder, checked against PyTorch in ONNX Runtime before it is written.

    export_run(run_dir, out, tolerance=1e-4, opset=18, quantize=None) -> ExportReport
    OnnxModel(path, loaded)      an ONNX Runtime session of an exported file, bound to its run
    predict_files_onnx(loaded, path, images, top)   `duboko predict --engine onnxruntime`

The graph comes from the torch 2.x exporter (`torch.onnx.export(..., dynamo=True)`: torch.export
traces the model, onnxscript's torchlib translates each aten op) with a dynamic batch dimension
and, for sequence models, a dynamic sequence length.

What one graph is, per family (inference is a single forward pass in each):

    image classifier (MY_NET, ResNet, ViT, MLP)  images (B, C, S, S) float -> logits (B, classes)
    RNN / LSTM / GRU language model              tokens (B, T) int64, h0 (L, B, H) [, c0 (L, B, H)]
                                                 -> logits (B, T, V), hN [, cN]   (zeros: no state)
      (the tanh RNN as the equivalent GRU with saturated gates: torch 2.13 unrolls nn.RNN to the
      example's length, while nn.GRU becomes ONNX's GRU op with a dynamic length)
    GPT (no key/value cache)                     tokens (B, T) int64 -> logits (B, T, V), T <= block_size

Parity: before anything is written, the exported graph runs in ONNX Runtime on random inputs and
on real ones (test images through the task's own preprocessing; text through the run's
tokenizer), at two batch sizes and, for sequence models, two sequence lengths; the largest
absolute difference of any output against the PyTorch model must stay within `tolerance`
(default 1e-4), else nothing is written. A converter that mixes up gate orders or drops a bias
(the GRU bug of older exporters) fails here instead of in an app.

Metadata (ONNX `metadata_props`): the resolved recipe (config.json), the SHA-256 of the run's
weights, class names and preprocessing constants (image size, channels, mean, std) or the
tokenizer, the input/output layout, and the measured parity error.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duboko.errors import DubokoError
from duboko.nn.attention import recording_attention
from duboko.io import atomic_write_bytes, sha256_file
from duboko.seeding import generator
from duboko.train.run import WEIGHTS, LoadedRun, load_run

ONNX_FILE = "model.onnx"  # default place of the exported graph: inside the run folder
DEFAULT_TOLERANCE = 1e-4  # max abs difference of any output, ONNX Runtime vs PyTorch (fp32)
DEFAULT_OPSET = 18  # torchlib's own opset: no version conversion
OPSETS = range(18, 24)  # what the torch 2.13 exporter writes
MAX_ONNX_BYTES = 2 << 30  # one protobuf file holds at most 2 GiB
PARITY_BATCHES = (1, 5)
PARITY_SEED_KEY = 1701  # derive_seed key of the random parity inputs (issue 17)
EXTRA_HINT = "pip install 'duboko[export]' (onnx, onnxscript>=0.7.2, onnxruntime)"
# Real text for the parity check of language models (encoded with the run's tokenizer).
SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n"
)


def require_onnx() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or one line naming the extra to install."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter's translator)
    except ImportError as exc:
        raise DubokoError(f"ONNX export needs the optional packages ({exc.name} is missing): {EXTRA_HINT}") from None
    return onnx, onnxruntime


# ---------------------------------------------------------------------------------------------
# One graph per family: a module whose forward takes and returns tensors only.


class _RNNGraph(nn.Module):
    """An RNN/GRU language model with its state as explicit inputs and outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, h = self.model(tokens, h0)  # (B, T, V), (L, B, H)
        return logits, h


# A tanh RNN, h' = tanh(W_ih x + b_ih + W_hh h + b_hh), is a GRU whose gates are saturated:
# PyTorch's GRU (gate order r, z, n; Cho et al. 2014, eqs. 5-8) computes
#   r = σ(W_ir x + b_ir + W_hr h + b_hr),  z = σ(W_iz x + b_iz + W_hz h + b_hz)
#   n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),  h' = (1 - z) ⊙ n + z ⊙ h
# so with zero r/z weights, b_ir = +S and b_iz = -S (σ(±S) = 1 / 0 exactly in float32 for
# S = 1e4: exp(-1e4) underflows to 0, exp(1e4) overflows to inf), h' = n = the RNN's step, with
# the RNN's weights as the n block. The numbers are the RNN's; only the op differs.
GATE_SATURATION = 1e4


def tanh_rnn_as_gru(rnn: nn.RNN) -> nn.GRU:
    """The GRU that computes exactly what the tanh RNN `rnn` computes (see above)."""
    if rnn.nonlinearity != "tanh":
        raise DubokoError(f"ONNX export of a {rnn.nonlinearity} RNN is not supported (only tanh; a GRU or LSTM exports)")
    if rnn.bidirectional or getattr(rnn, "proj_size", 0):
        raise DubokoError("ONNX export supports one-directional RNNs without projections")
    gru = nn.GRU(rnn.input_size, rnn.hidden_size, rnn.num_layers, bias=True, batch_first=rnn.batch_first,
                 dropout=rnn.dropout)
    size = rnn.hidden_size
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
            b_ih = getattr(rnn, f"bias_ih_l{layer}") if rnn.bias else torch.zeros(size)
            b_hh = getattr(rnn, f"bias_hh_l{layer}") if rnn.bias else torch.zeros(size)
            g_w_ih, g_w_hh = getattr(gru, f"weight_ih_l{layer}"), getattr(gru, f"weight_hh_l{layer}")  # (3H, in), (3H, H)
            g_b_ih, g_b_hh = getattr(gru, f"bias_ih_l{layer}"), getattr(gru, f"bias_hh_l{layer}")  # (3H,)
            for t in (g_w_ih, g_w_hh, g_b_ih, g_b_hh):
                t.zero_()
            g_w_ih[2 * size:].copy_(w_ih)
            g_w_hh[2 * size:].copy_(w_hh)
            g_b_ih[:size] = GATE_SATURATION  # reset gate r = 1
            g_b_ih[size:2 * size] = -GATE_SATURATION  # update gate z = 0
            g_b_ih[2 * size:].copy_(b_ih)
            g_b_hh[2 * size:].copy_(b_hh)
    return gru.to(w_ih.device).train(rnn.training)


class _LSTMGraph(nn.Module):
    """An LSTM language model: the state is (h, c), two inputs and two outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor):
        logits, (h, c) = self.model(tokens, (h0, c0))  # (B, T, V), (L, B, H) each
        return logits, h, c


class _GPTGraph(nn.Module):
    """A GPT without its key/value cache: the whole window in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            # The fused-attention path picks its causal flag with `is_causal and T > 1`, which
            # stays symbolic under a dynamic T and SDPA refuses; the written-out path (softmax of
            # the masked scores, the same numbers) builds the causal mask instead. Eager calls
            # (the parity reference) keep the fused path.
            with recording_attention(self.model):
                return self.model(tokens)[0]  # (B, T, V)
        return self.model(tokens)[0]


@dataclass
class GraphSpec:
    """What `export_run` needs to trace, name and check one family's graph."""

    family: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple[dict[int, Any], ...]
    # (batch, seq_len, real) -> inputs; seq_len is 0 for images
    make_inputs: Callable[[int, int, bool], tuple[torch.Tensor, ...]]
    seq_lens: tuple[int, ...] = (0,)
    metadata: dict[str, str] = field(default_factory=dict)
    # What parity compares against when `module` is an equivalent rewrite (the tanh RNN's GRU).
    reference: nn.Module | None = None


def _image_spec(loaded: LoadedRun) -> GraphSpec:
    cfg, task = loaded.config, loaded.task
    d = cfg.data
    test_images = task.splits["test"][0] if hasattr(task, "splits") else None
    g = generator(cfg.train.seed, PARITY_SEED_KEY)

    def make_inputs(batch: int, _: int, real: bool) -> tuple[torch.Tensor, ...]:
        if real and test_images is not None:
            return (task.eval_inputs(test_images[:batch]).float().contiguous().cpu(),)  # (B, C, S, S)
        return (torch.randn(batch, d.channels, d.image_size, d.image_size, generator=g),)

    batch = torch.export.Dim("batch", min=1, max=4096)
    meta = {
        "class_names": json.dumps(list(getattr(task, "class_names", []))),
        "preprocessing": json.dumps({
            "input": "images (B, C, S, S) float32, grey digit light on dark, resized, then (x - mean) / std",
            "image_size": d.image_size, "channels": d.channels, "mean": d.mean, "std": d.std,
        }),
    }
    return GraphSpec("image-classifier", loaded.model, ["images"], ["logits"], ({0: batch},), make_inputs,
                     metadata=meta)


def _text_ids(tokenizer: Any) -> list[int]:
    """SAMPLE_TEXT through the run's tokenizer (a character vocabulary keeps the characters it has)."""
    try:
        return tokenizer.encode(SAMPLE_TEXT)
    except DubokoError:
        chars = set(getattr(tokenizer, "chars", ()))
        return tokenizer.encode("".join(c for c in SAMPLE_TEXT if c in chars))


def _lm_spec(loaded: LoadedRun) -> GraphSpec:
    cfg, task, model = loaded.config, loaded.task, loaded.model
    vocab = int(cfg.model["vocab_size"])
    g = generator(cfg.train.seed, PARITY_SEED_KEY)
    ids = torch.tensor(_text_ids(task.tokenizer), dtype=torch.long)
    if len(ids) == 0:
        ids = torch.arange(min(vocab, 64))

    def tokens(batch: int, t: int, real: bool) -> torch.Tensor:
        if not real:
            return torch.randint(0, vocab, (batch, t), generator=g)
        reps = -(-(batch * t) // len(ids))  # ceil
        return ids.repeat(reps)[: batch * t].view(batch, t)  # (B, T), the text's windows

    batch = torch.export.Dim("batch", min=1, max=4096)
    meta = {"tokenizer": json.dumps(task.tokenizer.to_dict())}
    name = type(model).__name__
    if name == "GPT":
        block = int(model.config.block_size)
        # T >= 2: the attention block decides "causal mask or not" on T > 1 in Python, which
        # the trace can only settle for a range that excludes 1 (pad a 1-token prompt).
        seq = torch.export.Dim("seq", min=2, max=block)
        meta["inputs"] = f"tokens (B, T) int64, 2 <= T <= {block}; logits (B, T, vocab) float32"
        return GraphSpec("gpt", _GPTGraph(model), ["tokens"], ["logits"], ({0: batch, 1: seq},),
                         lambda b, t, real: (tokens(b, t, real),),
                         seq_lens=(min(7, block), min(block, 19)), metadata=meta)
    if name == "RNNLanguageModel":
        c = model.config
        if c.implementation != "fused":
            raise DubokoError(
                f"model.implementation={c.implementation!r} loops over time in Python and cannot become one "
                "ONNX graph with a dynamic sequence length; train with model.implementation=fused (the same weights "
                "load into either)"
            )
        # AUTO, not a named Dim: measured with torch 2.13, a named one is specialised to the
        # example's length from the second export in a process on.
        seq = torch.export.Dim.AUTO

        def with_state(b: int, t: int, real: bool) -> tuple[torch.Tensor, ...]:
            shape = (c.num_layers, b, c.hidden_size)
            state = [torch.zeros(shape) if real else 0.5 * torch.randn(shape, generator=g)
                     for _ in range(2 if c.cell == "lstm" else 1)]
            return (tokens(b, t, real), *state)

        state_dims = {1: batch}
        meta["inputs"] = (f"tokens (B, T) int64, h0{', c0' if c.cell == 'lstm' else ''} (layers={c.num_layers}, B, "
                          f"hidden={c.hidden_size}) float32, zeros for a fresh start; outputs logits (B, T, vocab), "
                          f"hN{', cN' if c.cell == 'lstm' else ''}")
        if c.cell == "lstm":
            return GraphSpec("lstm", _LSTMGraph(model), ["tokens", "h0", "c0"], ["logits", "hN", "cN"],
                             ({0: batch, 1: seq}, state_dims, state_dims), with_state, (5, 17), meta)
        if c.cell == "rnn":
            import copy

            as_gru = copy.copy(model)  # shares embedding and head; only the recurrent module differs
            as_gru._modules = dict(model._modules)
            as_gru.rnn = tanh_rnn_as_gru(model.rnn)
            meta["graph"] = "the tanh RNN as the equivalent GRU (reset gate 1, update gate 0: saturated biases)"
            return GraphSpec("rnn", _RNNGraph(as_gru), ["tokens", "h0"], ["logits", "hN"],
                             ({0: batch, 1: seq}, state_dims), with_state, (5, 17), meta, reference=_RNNGraph(model))
        return GraphSpec(c.cell, _RNNGraph(model), ["tokens", "h0"], ["logits", "hN"],
                         ({0: batch, 1: seq}, state_dims), with_state, (5, 17), meta)
    raise DubokoError(f"ONNX export knows the GPT and the RNN language models, not {name!r}")


class _UNetGraph(nn.Module):
    """One denoiser step ε_θ(x_t, t[, label]) of a diffusion run: the sampler loop (DDPM/DDIM
    updates, guidance) stays with the caller, which runs this graph once per step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.model(x, timesteps)  # (B, C, H, W)


class _ClassUNetGraph(_UNetGraph):
    """A class-conditioned denoiser step: labels (B,) are the third input."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(x, timesteps, labels)  # (B, C, H, W)


def _unet_spec(loaded: LoadedRun) -> GraphSpec:
    cfg, task, model = loaded.config, loaded.task, loaded.model
    c = model.config
    if c.conditioning not in ("none", "class"):
        raise DubokoError(
            f"ONNX export of the denoiser supports model.conditioning none or class, not {c.conditioning!r} "
            "(the text prompt encoder is not exported yet)"
        )
    g = generator(cfg.train.seed, PARITY_SEED_KEY)
    T = int(task.schedule.num_train_timesteps)
    conditioned = c.conditioning == "class"
    real_x0 = task.eval_x0(task._load()["val_x"][:max(PARITY_BATCHES)].cpu()) if hasattr(task, "_load") else None

    def make_inputs(batch: int, _: int, real: bool) -> tuple[torch.Tensor, ...]:
        t = torch.randint(0, T, (batch,), generator=g)
        shape = (batch, c.in_channels, c.image_size, c.image_size)
        if real and real_x0 is not None and len(real_x0) >= batch:
            # Real noisy digits: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (Ho et al. 2020, eq. 4).
            x = task.scheduler.add_noise(real_x0[:batch], torch.randn(shape, generator=g), t)
        else:
            x = torch.randn(shape, generator=g)
        labels = (torch.randint(0, c.num_classes + 1, (batch,), generator=g),) if conditioned else ()
        return (x.float(), t, *labels)

    batch = torch.export.Dim("batch", min=1, max=4096)
    names = ["x", "timesteps"] + (["labels"] if conditioned else [])
    meta = {"inputs": (f"x (B, {c.in_channels}, {c.image_size}, {c.image_size}) float32 noisy images in [-1, 1] "
                       f"scale, timesteps (B,) int64 in [0, {T})" + (f", labels (B,) int64 in [0, {c.num_classes}] "
                       f"({c.num_classes}: no label, for guidance)" if conditioned else "")
                       + f"; output the predicted {cfg.data.prediction_type} (B, C, H, W)"),
            "schedule": json.dumps({"num_train_timesteps": T, "beta_schedule": cfg.data.beta_schedule,
                                    "prediction_type": cfg.data.prediction_type})}
    graph = _ClassUNetGraph(model) if conditioned else _UNetGraph(model)
    return GraphSpec("unet-denoiser", graph, names, ["prediction"],
                     tuple({0: batch} for _ in names), make_inputs, metadata=meta)


def graph_spec(loaded: LoadedRun) -> GraphSpec:
    """The exportable graph of a loaded run, or one line saying why there is none."""
    task = loaded.config.task
    if task == "image-classification":
        return _image_spec(loaded)
    if task == "language-model":
        return _lm_spec(loaded)
    if task == "diffusion":
        return _unet_spec(loaded)
    raise DubokoError(
        f"ONNX export supports image-classification, language-model and diffusion runs; this run's task is {task!r} "
        "(seq2seq is not exportable yet)"
    )


# ---------------------------------------------------------------------------------------------
# Export, parity, metadata.


def _quiet_export(spec: GraphSpec, example: tuple[torch.Tensor, ...], opset: int) -> Any:
    """torch.onnx.export (dynamo) without its progress chatter; a failure is one line."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(
                spec.module, example, dynamo=True, dynamic_shapes=spec.dynamic_shapes,
                input_names=spec.input_names, output_names=spec.output_names,
                opset_version=opset, verbose=False, optimize=True,
            )
        except Exception as exc:  # the exporter raises many types; the user needs one line
            first = _first_cause(exc)
            raise DubokoError(f"torch.onnx.export failed for this {spec.family} model: {first}") from exc


def session(model_bytes_or_path: bytes | str | Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session (threads 0: ORT's default)."""
    _, ort = require_onnx()
    ort.set_default_logger_severity(3)  # errors reach the user as one DubokoError line, not a log
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    source = model_bytes_or_path if isinstance(model_bytes_or_path, bytes) else str(model_bytes_or_path)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise DubokoError(f"ONNX Runtime cannot load the graph: {str(exc).splitlines()[0]}") from exc


def run_session(sess: Any, names: list[str], inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    feed = {name: x.detach().cpu().contiguous().numpy() for name, x in zip(names, inputs)}
    return [torch.from_numpy(y) for y in sess.run(None, feed)]


def _flat(outputs: Any) -> list[torch.Tensor]:
    return [outputs] if torch.is_tensor(outputs) else list(outputs)


@torch.no_grad()
def parity(spec: GraphSpec, sess: Any) -> list[dict[str, Any]]:
    """Each check (random / real inputs × batch sizes × sequence lengths): its shapes and the
    largest absolute difference of any output between ONNX Runtime and PyTorch."""
    rows = []
    for real in (False, True):
        for b in PARITY_BATCHES:
            for t in spec.seq_lens:
                inputs = spec.make_inputs(b, t, real)
                reference = spec.reference if spec.reference is not None else spec.module
                expected = [y.float().cpu() for y in _flat(reference(*inputs))]
                try:
                    got = run_session(sess, spec.input_names, inputs)
                except Exception as exc:  # ORT's errors are its own types: one line for the user
                    # E.g. a graph specialised to the example's length (torch 2.13 unrolls nn.RNN:
                    # hence the GRU rewrite above) fails at the second length, here.
                    raise DubokoError(
                        f"ONNX Runtime cannot run the exported {spec.family} graph on {'real' if real else 'random'} "
                        f"inputs of batch {b}" + (f", seq_len {t}" if t else "") + f": {_first_cause(exc)}; nothing written"
                    ) from exc
                err = max(float((e - g).abs().max()) for e, g in zip(expected, got))
                rows.append({"inputs": "real" if real else "random", "batch": b, "seq_len": t, "max_abs_error": err})
    return rows


@dataclass
class ExportReport:
    path: Path
    family: str
    checks: list[dict[str, Any]]
    tolerance: float
    max_abs_error: float
    bytes: int
    quantized: Path | None = None
    int8_agreement: float | None = None  # share of real inputs whose argmax int8 == fp32

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "family": self.family, "tolerance": self.tolerance,
                "max_abs_error": self.max_abs_error, "bytes": self.bytes, "checks": self.checks,
                "quantized": str(self.quantized) if self.quantized else None, "int8_agreement": self.int8_agreement}


def _with_metadata(model_proto: Any, loaded: LoadedRun, spec: GraphSpec, extra: dict[str, str]) -> Any:
    props = {
        "duboko_format": "1",
        "recipe": json.dumps(loaded.config.to_dict()),
        "task": loaded.config.task,
        "model": str(loaded.config.model["name"]),
        "family": spec.family,
        "weights_sha256": sha256_file(loaded.run_dir / WEIGHTS),
        "input_names": json.dumps(spec.input_names),
        "output_names": json.dumps(spec.output_names),
        "torch_version": torch.__version__,
        **spec.metadata,
        **extra,
    }
    del model_proto.metadata_props[:]
    for key, value in props.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    return model_proto


def export_loaded(loaded: LoadedRun, out: str | Path, *, tolerance: float = DEFAULT_TOLERANCE,
                  opset: int = DEFAULT_OPSET, quantize: str | None = None) -> ExportReport:
    """Export a loaded run to `out` (parity-checked); with quantize="int8" the written file is
    the int8 graph (dynamic quantisation of the checked fp32 one) and the report says how often
    its top-1 agrees with fp32 on real inputs."""
    require_onnx()
    if opset not in OPSETS:
        raise DubokoError(f"opset {opset} cannot be exported by this torch: expected {OPSETS.start}..{OPSETS.stop - 1}")
    if not (0 < tolerance < float("inf")):  # NaN and inf would switch the parity check off
        raise DubokoError(f"tolerance must be a finite number > 0 (default {DEFAULT_TOLERANCE:g}), got {tolerance!r}")
    if quantize not in (None, "int8"):
        raise DubokoError(f"quantize must be int8 (or none), got {quantize!r}")
    dtypes = {p.dtype for p in loaded.model.parameters()}
    if dtypes - {torch.float32}:
        raise DubokoError(f"ONNX export takes float32 weights; this model has {sorted(map(str, dtypes))}")
    out = Path(out)
    loaded.model.cpu().eval()
    spec = graph_spec(loaded)
    t0 = max(spec.seq_lens[-1], 2) if spec.seq_lens != (0,) else 0
    example = spec.make_inputs(2, t0, False)  # batch 2 (and T > 1): 0/1 would be specialised
    program = _quiet_export(spec, example, opset)
    proto = program.model_proto
    fp32_bytes = proto.SerializeToString()
    sess = session(fp32_bytes)
    checks = parity(spec, sess)
    worst = max(c["max_abs_error"] for c in checks)
    if not worst <= tolerance:  # also refuses NaN
        bad = next(c for c in checks if not c["max_abs_error"] <= tolerance)
        raise DubokoError(
            f"ONNX Runtime and PyTorch disagree: max abs error {worst:.3g} > tolerance {tolerance:g} "
            f"({bad['inputs']} inputs, batch {bad['batch']}"
            + (f", seq_len {bad['seq_len']}" if bad["seq_len"] else "") + "); nothing written"
        )
    extra = {"parity_max_abs_error": f"{worst:.3g}", "parity_tolerance": f"{tolerance:g}",
             "parity_checks": json.dumps(checks), "precision": "fp32"}
    data = _with_metadata(proto, loaded, spec, extra).SerializeToString()
    if len(data) > MAX_ONNX_BYTES:
        raise DubokoError(f"the graph is {len(data)} bytes, over the 2 GiB a single ONNX file holds")
    agreement = None
    if quantize == "int8":
        from duboko.export.quantize import quantize_int8_bytes

        q = quantize_int8_bytes(data)
        agreement = top1_agreement(spec, sess, session(q))
        import onnx

        qproto = onnx.load_from_string(q)
        extra.update({"precision": "int8", "int8_top1_agreement": f"{agreement:.4f}"})
        data = _with_metadata(qproto, loaded, spec, extra).SerializeToString()
    atomic_write_bytes(out, data)
    return ExportReport(out, spec.family, checks, tolerance, worst, len(data),
                        out if quantize else None, agreement)


@torch.no_grad()
def top1_agreement(spec: GraphSpec, fp32: Any, int8: Any) -> float:
    """Share of positions (images, or tokens) where the int8 graph's argmax equals fp32's, on
    the real inputs of the parity check."""
    same = total = 0
    for b in PARITY_BATCHES:
        for t in spec.seq_lens:
            inputs = spec.make_inputs(b, t, True)
            a = run_session(fp32, spec.input_names, inputs)[0].argmax(-1)
            q = run_session(int8, spec.input_names, inputs)[0].argmax(-1)
            same += int((a == q).sum())
            total += a.numel()
    return same / max(total, 1)


def export_run(run_dir: str | Path, out: str | Path | None = None, **options: Any) -> ExportReport:
    """`duboko export RUN --format onnx`: load the run (verified, safetensors), export, check,
    write (default RUN/model.onnx)."""
    require_onnx()
    loaded = load_run(run_dir, device="cpu", setup_task=False)
    setup_for_export(loaded)
    return export_loaded(loaded, out if out is not None else Path(run_dir) / ONNX_FILE, **options)


def setup_for_export(loaded: LoadedRun) -> None:
    """The task's assets, and for images the test split (real parity inputs) without the
    training set."""
    if loaded.config.task == "image-classification":
        loaded.task.setup(loaded.run_dir, splits=("test",))
    else:
        loaded.task.setup(loaded.run_dir)


# ---------------------------------------------------------------------------------------------
# Inference with an exported file.


class OnnxModel:
    """An exported graph in ONNX Runtime, checked to belong to `loaded` (same weights)."""

    def __init__(self, path: str | Path, loaded: LoadedRun, threads: int = 0):
        onnx, _ = require_onnx()
        path = Path(path)
        if not path.is_file():
            raise DubokoError(f"ONNX file {str(path)!r} does not exist; write it with `duboko export {loaded.run_dir} --format onnx`")
        size = path.stat().st_size
        if size > MAX_ONNX_BYTES:
            raise DubokoError(f"{path} is {size} bytes, over the 2 GiB limit of one ONNX file")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise DubokoError(f"{path} is not an ONNX model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
        self.metadata = {p.key: p.value for p in proto.metadata_props}
        want = sha256_file(loaded.run_dir / WEIGHTS)
        if self.metadata.get("weights_sha256") != want:
            raise DubokoError(f"{path} was not exported from the weights of run {str(loaded.run_dir)!r} "
                              "(its weights_sha256 metadata differs); export it again")
        self.input_names = json.loads(self.metadata.get("input_names", "[]"))
        self.session = session(path, threads)
        self.path = path

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The first output (logits) as a CPU float tensor."""
        return run_session(self.session, self.input_names, inputs)[0]


@torch.no_grad()
def predict_files_onnx(loaded: LoadedRun, onnx_path: str | Path | None, paths: list[str], top: int = 3) -> list[dict]:
    """`predict --engine onnxruntime`: the eager path's file loading and preprocessing
    (`load_image_file`, `eval_inputs`), the exported graph instead of the model."""
    if not hasattr(loaded.task, "predict_files"):
        raise DubokoError(f"run {str(loaded.run_dir)!r} is a {loaded.config.task} run; `predict` needs an image-classification run")
    engine = OnnxModel(onnx_path if onnx_path is not None else loaded.run_dir / ONNX_FILE, loaded)

    def graph(x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, classes)
        return engine(x.float().contiguous().cpu())

    return loaded.task.predict_files(graph, paths, top)


def _first_cause(exc: BaseException) -> str:
    """The innermost cause's first line: the exporter wraps the real error in a step banner."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
