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
    UNet denoiser step (none / class)            x (B, C, H, W), timesteps (B,)[, labels (B,)] -> prediction

Two graphs, one file each (`graph_path`: --out X.onnx writes X.<graph>.onnx), where inference
is a loop around two networks:

    seq2seq        encoder       src (B, S) -> memory (B, S, D), memory_pad (B, S) bool
                   decoder_step  token (B, 1), memory, memory_pad, past keys/values (L, B, H, P, Dh)
                                 -> next-token logits (B, V), present keys/values (P + 1)
    text-to-image  text_encoder  prompt tokens (B, L) -> context (B, L, D), context_mask (B, L) bool
                   denoiser      x, timesteps, context, context_mask -> prediction (B, C, H, W)

Their loop runs through ONNX Runtime against PyTorch before anything is written: greedy decoding
must give PyTorch's tokens on real held-out sources (`greedy_decode_onnx`), and a short guided
DDIM text-to-image run PyTorch's images (`OnnxTextDenoiser` inside `diffusion.pipeline.sample`).

Parity: before anything is written, the exported graph runs in ONNX Runtime on random inputs and
on real ones (test images through the task's own preprocessing; text through the run's
tokenizer), at two batch sizes and, for sequence models, two sequence lengths; the largest
absolute difference of any output against the PyTorch model must stay within `tolerance`
(default 1e-4), else nothing is written. A converter that mixes up gate orders or drops a bias
(the GRU bug of older exporters) fails here instead of in an app.

Metadata (ONNX `metadata_props`): the resolved recipe (config.json), the SHA-256 of the run's
weights, class names and preprocessing constants (image size, channels, mean, std) or the
tokenizer, the input/output layout, and the measured parity error; for two-graph families also the
graph's name and its sibling's file, the seq2seq special ids, max length and cache sizes, the
text-to-image prompt tokenizer, null prompt, schedule (every ᾱ_t) and sampling defaults, so the
files alone are enough to decode or to sample.
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
from duboko.io import atomic_write_bytes
from duboko.seeding import generator
from duboko.train.checkpoint import weights_digest
from duboko.train.run import LoadedRun, load_run

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
    # The graph's name in a family of several graphs (seq2seq: encoder, decoder_step), "" alone.
    name: str = ""


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


# ---------------------------------------------------------------------------------------------
# Seq2seq: two graphs, the encoder (once per source) and the decoder step (once per token).
#
#   encoder       src (B, S) int64, right-padded with pad_id -> memory (B, S, d_model) float32,
#                 memory_pad (B, S) bool (True at padding)
#   decoder_step  token (B, 1) int64, memory, memory_pad, past_keys, past_values
#                 (layers, B, heads, P, head_dim) float32 (P = 0 at the first step: BOS)
#                 -> logits (B, vocab) of the next token, present_keys, present_values (P + 1)
#
# The step is `Seq2Seq.decode` with its self-attention key/value cache as explicit tensors (one
# new query sees every cached key: no causal mask inside the step); greedy decoding feeds the
# argmax back and the presents as the next pasts, exactly as `Seq2Seq.greedy_decode` does.

SEQ2SEQ_SRC_LENS = (5, 13)  # the two source lengths S of the parity check (longer when no real source fits)
SEQ2SEQ_PAST_LENS = (0, 6)  # the decoder step's cache length P at each of them (0: the first step)
GREEDY_CHECK_SOURCES = (1, 8)  # real sources decoded greedily by both engines (batch sizes)


class _EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory, pad = self.model.encode(src)  # (B, S, D), (B, S) True at padding
        return memory, pad


class _DecoderStepGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, memory: torch.Tensor, memory_pad: torch.Tensor,
                past_keys: torch.Tensor, past_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        past = list(zip(past_keys.unbind(0), past_values.unbind(0)))  # per layer (B, H, P, Dh) each
        logits, present = self.model.decode(token, memory, memory_pad, past)  # (B, 1, V)
        keys = torch.stack([k for k, _ in present])  # (L, B, H, P + 1, Dh)
        values = torch.stack([v for _, v in present])
        return logits[:, -1], keys, values


def _real_sources(task: Any) -> list[list[int]] | None:
    """Encoded held-out test sources (source + EOS), or None when the run's data is gone (a
    TSV-trained run exported without its TSV)."""
    try:
        task._ensure_data()
    except (DubokoError, OSError):
        return None
    for split in ("test", "val"):
        sources = [s for s, _ in task.encoded.get(split, [])]
        if sources:
            return sources
    return None


def _fit_rows(rows: list[list[int]], batch: int, width: int, pad: int) -> torch.Tensor | None:
    """The first `batch` rows no longer than `width` (cycled), right-padded to exactly `width`."""
    fitting = [r for r in rows if len(r) <= width]
    if not fitting:
        return None
    out = torch.full((batch, width), pad, dtype=torch.long)
    for i in range(batch):
        r = fitting[i % len(fitting)]
        out[i, : len(r)] = torch.tensor(r)
    return out


def _seq2seq_specs(loaded: LoadedRun) -> list[GraphSpec]:
    cfg, task, model = loaded.config, loaded.task, loaded.model
    c = model.config
    g = generator(cfg.train.seed, PARITY_SEED_KEY)
    layers, heads, head_dim = c.num_decoder_layers, c.num_heads, c.d_model // c.num_heads
    sources = _real_sources(task)
    targets = None
    lens = SEQ2SEQ_SRC_LENS
    if sources is not None:
        split = "test" if task.encoded.get("test") else "val"
        targets = [[c.bos_id] + t[:-1] for _, t in task.encoded[split]]  # teacher-forced decoder inputs
        shortest = min(map(len, sources))  # real sources must fit the first length
        lens = (min(max(lens[0], shortest), c.max_len - 1), min(max(lens[1], shortest + 8), c.max_len))

    def src_batch(batch: int, s: int, real: bool) -> torch.Tensor:
        if real and sources is not None:
            fitted = _fit_rows(sources, batch, s, c.pad_id)
            if fitted is not None:
                return fitted
        src = torch.randint(4, c.vocab_size, (batch, s), generator=g)  # (B, S) no specials
        src[:, -1] = c.eos_id
        if batch > 1:
            src[1:, -2:] = c.pad_id  # some right padding beside the full rows
        return src

    def encoder_inputs(batch: int, s: int, real: bool) -> tuple[torch.Tensor, ...]:
        return (src_batch(batch, s, real),)

    @torch.no_grad()
    def step_inputs(batch: int, s: int, real: bool) -> tuple[torch.Tensor, ...]:
        p = min(SEQ2SEQ_PAST_LENS[lens.index(s)] if s in lens else s // 2, c.max_len - 2)
        if real and sources is not None:
            src = src_batch(batch, s, True)
            memory, pad = model.encode(src)
            prefix = torch.full((batch, p + 1), c.pad_id, dtype=torch.long)
            for i in range(batch):  # the real targets' first P + 1 decoder inputs (BOS first)
                t = targets[i % len(targets)][: p + 1]
                prefix[i, : len(t)] = torch.tensor(t)
            if p:
                _, past = model.decode(prefix[:, :p], memory, pad)
                keys, values = torch.stack([k for k, _ in past]), torch.stack([v for _, v in past])
            else:
                keys = values = torch.zeros(layers, batch, heads, 0, head_dim)
            return prefix[:, p:], memory, pad, keys, values
        token = torch.randint(3, c.vocab_size, (batch, 1), generator=g)
        memory = torch.randn(batch, s, c.d_model, generator=g)
        pad = torch.rand(batch, s, generator=g) < 0.3
        pad[:, 0] = False  # every source has a real first token
        shape = (layers, batch, heads, p, head_dim)
        return token, memory, pad, torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    batch = torch.export.Dim("batch", min=1, max=4096)
    src_len = torch.export.Dim("src_len", min=1, max=c.max_len)
    # P + 1 <= max_len - 1: greedy decoding writes at most max_len - 1 tokens after BOS.
    past = torch.export.Dim("past_len", min=0, max=c.max_len - 2)
    tok = task.tokenizer
    meta = {
        "tokenizer": json.dumps(tok.to_dict()),
        "special_ids": json.dumps({"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id}),
        "max_len": str(c.max_len),
        "decoding": json.dumps({
            "num_layers": layers, "num_heads": heads, "head_dim": head_dim, "d_model": c.d_model,
            "max_len": c.max_len, "max_new_tokens": c.max_len - 1, "bos_id": c.bos_id, "eos_id": c.eos_id,
            "pad_id": c.pad_id,
            "greedy": "encoder once; then token = BOS, past = zeros (layers, B, heads, 0, head_dim); per step "
                      "logits, past = decoder_step(token, memory, memory_pad, past); token = argmax(logits) "
                      "(pad once a row has produced EOS); stop when every row has EOS or after max_new_tokens",
        }),
        "source_format": "tokenizer pieces of the source text + EOS, right-padded with pad (id 0); "
                         "at most max_len tokens",
    }
    if cfg.data.source == "numbers":
        meta["direction"] = cfg.data.direction
    enc_meta = {**meta, "inputs": f"src (B, S) int64, 1 <= S <= {c.max_len}; outputs memory (B, S, {c.d_model}) "
                                  "float32, memory_pad (B, S) bool (True at padding)"}
    step_meta = {**meta, "inputs": (
        f"token (B, 1) int64, memory (B, S, {c.d_model}) float32, memory_pad (B, S) bool, past_keys and "
        f"past_values ({layers}, B, {heads}, P, {head_dim}) float32, 0 <= P <= {c.max_len - 2}; outputs logits "
        f"(B, {c.vocab_size}) float32 of the next token, present_keys and present_values (P + 1)")}
    cache = {1: batch, 3: past}
    return [
        GraphSpec("seq2seq-encoder", _EncoderGraph(model), ["src"], ["memory", "memory_pad"],
                  ({0: batch, 1: src_len},), encoder_inputs, lens, enc_meta, name="encoder"),
        GraphSpec("seq2seq-decoder-step", _DecoderStepGraph(model),
                  ["token", "memory", "memory_pad", "past_keys", "past_values"],
                  ["logits", "present_keys", "present_values"],
                  ({0: batch}, {0: batch, 1: src_len}, {0: batch, 1: src_len}, cache, cache), step_inputs,
                  lens, step_meta, name="decoder_step"),
    ]


def greedy_decode_onnx(encoder: Any, decoder_step: Any, src: torch.Tensor, decoding: dict[str, Any],
                       max_new_tokens: int | None = None) -> list[list[int]]:
    """Greedy decoding with the two exported seq2seq graphs in ONNX Runtime, step for step what
    `Seq2Seq.greedy_decode` does: src (B, S) int64 -> token ids per source (without BOS/EOS).
    `decoding` is the graphs' `decoding` metadata (sizes and special ids)."""
    d = decoding
    steps = min(max_new_tokens or d["max_new_tokens"], d["max_new_tokens"])
    memory, memory_pad = encoder.run(None, {"src": src.cpu().numpy()})
    b = src.shape[0]
    token = torch.full((b, 1), d["bos_id"], dtype=torch.long)
    keys = values = torch.zeros(d["num_layers"], b, d["num_heads"], 0, d["head_dim"]).numpy()
    out = torch.zeros(b, 0, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    for _ in range(steps):
        logits, keys, values = decoder_step.run(None, {"token": token.numpy(), "memory": memory, "memory_pad": memory_pad,
                                                       "past_keys": keys, "past_values": values})
        token = torch.from_numpy(logits).argmax(-1, keepdim=True)  # (B, 1)
        token = token.masked_fill(done[:, None], d["pad_id"])
        out = torch.cat((out, token), dim=1)
        done |= token[:, 0] == d["eos_id"]
        if done.all():
            break
    rows = []
    for row in out.tolist():
        ids = []
        for t in row:
            if t in (d["eos_id"], d["pad_id"]):
                break
            ids.append(t)
        rows.append(ids)
    return rows


@torch.no_grad()
def _seq2seq_greedy_check(loaded: LoadedRun, specs: list[GraphSpec], sessions: dict[str, Any],
                          tolerance: float) -> list[dict[str, Any]]:
    """Greedy decoding through ONNX Runtime equals PyTorch's token for token, on real held-out
    sources (random ones when the run's data is gone) at two batch sizes."""
    model, task = loaded.model, loaded.task
    decoding = json.loads(specs[1].metadata["decoding"])
    sources = _real_sources(task)
    rows = []
    for b in GREEDY_CHECK_SOURCES:
        if sources is not None:
            chunk = [sources[i % len(sources)] for i in range(b)]
            src = torch.full((b, max(map(len, chunk))), model.config.pad_id, dtype=torch.long)
            for i, s in enumerate(chunk):
                src[i, : len(s)] = torch.tensor(s)
        else:
            src = specs[0].make_inputs(b, SEQ2SEQ_SRC_LENS[0], False)[0]
        expected = model.greedy_decode(src)
        got = greedy_decode_onnx(sessions["encoder"], sessions["decoder_step"], src, decoding)
        same = sum(e == g for e, g in zip(expected, got))
        rows.append({"check": "greedy_decode", "inputs": "real" if sources is not None else "random", "batch": b,
                     "sequences": b, "identical": same, "tokens": sum(map(len, expected))})
        if same != b:
            i = next(i for i, (e, g) in enumerate(zip(expected, got)) if e != g)
            raise DubokoError(
                f"greedy decoding differs between ONNX Runtime and PyTorch for {b - same} of {b} sources "
                f"(first: {task.tokenizer.decode(got[i])!r} vs {task.tokenizer.decode(expected[i])!r}); nothing written")
    return rows


# ---------------------------------------------------------------------------------------------
# Text-to-image: two graphs, the prompt encoder (once per prompt batch) and the denoiser step
# (once per sampling step), as `diffusion.pipeline.sample` runs them.
#
#   text_encoder  tokens (B, L) int64 (BOS = 1 first, pad = 0) -> context (B, L, text_dim) float32,
#                 context_mask (B, L) bool (True at padding)
#   denoiser      x (B, C, H, W), timesteps (B,) int64, context, context_mask -> prediction (B, C, H, W)
#
# The DDIM loop, classifier-free guidance and the schedule stay with the caller; the schedule's
# ᾱ_t (all T of them) is in the denoiser's metadata, so the two files are all a sampler needs.

TEXT_PROMPT_LENS = (12, 30)  # the two prompt lengths L of the parity check
PIPELINE_STEPS = 4  # DDIM steps of the export's text-to-image check
PIPELINE_TOLERANCE_FACTOR = 10  # images after the DDIM loop: within 10 × tolerance (errors add up)


class _TextEncoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context, mask = self.model.encode_text(tokens)  # (B, L, D), (B, L) True at padding
        return context, mask


class _TextDenoiserGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor) -> torch.Tensor:
        return self.model(x, timesteps, None, context=context, context_mask=context_mask)  # (B, C, H, W)


def _real_prompts(tokenizer: Any) -> list[list[int]]:
    """Every training and held-out caption of every digit, as prompt token ids (BOS first)."""
    from duboko.data import captions

    texts = [captions.caption(d, t) for t in captions.HELD_OUT_TEMPLATES + captions.TRAIN_TEMPLATES for d in range(10)]
    return [tokenizer.encode(t) for t in texts]


def _text_unet_specs(loaded: LoadedRun) -> list[GraphSpec]:
    cfg, task, model = loaded.config, loaded.task, loaded.model
    c = model.config
    g = generator(cfg.train.seed, PARITY_SEED_KEY)
    T = int(task.schedule.num_train_timesteps)
    prompts = _real_prompts(task.tokenizer)
    real_x0 = task.eval_x0(task._load()["val_x"][:max(PARITY_BATCHES)].cpu())
    max_len = int(c.max_prompt_len)
    lens = tuple(min(n, max_len) for n in TEXT_PROMPT_LENS)

    def tokens(batch: int, length: int, real: bool) -> torch.Tensor:
        if real:
            fitted = _fit_rows(prompts, batch, length, 0)
            if fitted is not None:
                return fitted
        out = torch.randint(2, c.vocab_size, (batch, length), generator=g)
        out[:, 0] = 1  # BOS
        if batch > 1:
            out[1:, length // 2:] = 0  # right padding beside the full rows
        return out

    def encoder_inputs(batch: int, length: int, real: bool) -> tuple[torch.Tensor, ...]:
        return (tokens(batch, length, real),)

    @torch.no_grad()
    def denoiser_inputs(batch: int, length: int, real: bool) -> tuple[torch.Tensor, ...]:
        t = torch.randint(0, T, (batch,), generator=g)
        shape = (batch, c.in_channels, c.image_size, c.image_size)
        if real and len(real_x0) >= batch:
            # Real noisy digits (Ho et al. 2020, eq. 4) and real encoded prompts.
            x = task.scheduler.add_noise(real_x0[:batch], torch.randn(shape, generator=g), t)
            context, mask = model.encode_text(tokens(batch, length, True))
        else:
            x = torch.randn(shape, generator=g)
            context = torch.randn(batch, length, c.text_dim, generator=g)
            mask = torch.rand(batch, length, generator=g) < 0.3
            mask[:, 0] = False  # BOS is never padding
        return x.float(), t, context, mask

    batch = torch.export.Dim("batch", min=1, max=4096)
    prompt_len = torch.export.Dim("prompt_len", min=1, max=max_len)
    d = cfg.data
    sched = task.scheduler
    tokenizer = json.dumps(task.tokenizer.to_dict())
    meta_enc = {"tokenizer": tokenizer, "null_prompt": json.dumps([1]), "inputs": (
        f"tokens (B, L) int64, 1 <= L <= {max_len}: the prompt tokenizer's ids (BOS = 1 first, then one id per "
        f"character of the lower-cased prompt), right-padded with 0; outputs context (B, L, {c.text_dim}) float32, "
        "context_mask (B, L) bool (True at padding)")}
    meta_den = {"tokenizer": tokenizer, "null_prompt": json.dumps([1]), "inputs": (
        f"x (B, {c.in_channels}, {c.image_size}, {c.image_size}) float32 noisy images in [-1, 1] scale, timesteps "
        f"(B,) int64 in [0, {T}), context (B, L, {c.text_dim}) float32 and context_mask (B, L) bool from "
        f"text_encoder; output the predicted {d.prediction_type} (B, C, H, W)"),
        "schedule": json.dumps({
            "num_train_timesteps": T, "beta_schedule": d.beta_schedule, "prediction_type": d.prediction_type,
            "clip_sample": sched.config.clip_sample, "clip_sample_range": sched.config.clip_sample_range,
            "timestep_spacing": sched.config.timestep_spacing,
            "alphas_cumprod": [float(a) for a in sched.alphas_cumprod],
        }),
        "sampling": json.dumps({
            "sampler": d.sampler, "steps": d.sample_steps, "guidance": d.guidance, "eta": d.eta,
            "use_clipped_model_output": True, "output_range": 1.0,
            "guidance_rule": "prediction = uncond + guidance * (cond - uncond), one batch [prompts; null prompts "
                             "padded to the prompts' width] (Ho & Salimans 2022)",
        })}
    return [
        GraphSpec("text-encoder", _TextEncoderGraph(model), ["tokens"], ["context", "context_mask"],
                  ({0: batch, 1: prompt_len},), encoder_inputs, lens, meta_enc, name="text_encoder"),
        GraphSpec("unet-text-denoiser", _TextDenoiserGraph(model), ["x", "timesteps", "context", "context_mask"],
                  ["prediction"], ({0: batch}, {0: batch}, {0: batch, 1: prompt_len}, {0: batch, 1: prompt_len}),
                  denoiser_inputs, lens, meta_den, name="denoiser"),
    ]


class OnnxTextDenoiser(nn.Module):
    """The two exported text-to-image graphs behind the interface `diffusion.pipeline.sample`
    calls (`config`, `null_condition`, `encode_text`, forward with `context`), so the PyTorch
    sampling loop runs on ONNX Runtime."""

    def __init__(self, text_encoder: Any, denoiser: Any, config: Any):
        super().__init__()
        self.text_session, self.denoiser_session, self.config = text_encoder, denoiser, config

    def null_condition(self, batch_size: int, device: Any = None) -> torch.Tensor:
        return torch.ones(batch_size, 1, dtype=torch.long)  # the empty prompt: BOS alone

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context, mask = run_session(self.text_session, ["tokens"], (tokens,))
        return context, mask

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None = None, *,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            context, context_mask = self.encode_text(cond if cond is not None else self.null_condition(x.shape[0]))
        return run_session(self.denoiser_session, ["x", "timesteps", "context", "context_mask"],
                           (x.float(), timesteps.long(), context, context_mask))[0]


@torch.no_grad()
def _text_to_image_check(loaded: LoadedRun, specs: list[GraphSpec], sessions: dict[str, Any],
                         tolerance: float) -> list[dict[str, Any]]:
    """A short guided DDIM text-to-image run through ONNX Runtime against the PyTorch pipeline
    (same prompts, same noise): the images must agree within PIPELINE_TOLERANCE_FACTOR × tolerance."""
    from duboko.data import captions
    from duboko.diffusion.pipeline import sample
    from duboko.diffusion.schedulers import DDIMScheduler

    task, model = loaded.task, loaded.model
    guidance = float(loaded.config.data.guidance)
    ort_model = OnnxTextDenoiser(sessions["text_encoder"], sessions["denoiser"], model.config)
    rows = []
    for b in PARITY_BATCHES:
        prompts = [captions.caption(d % 10, captions.HELD_OUT_TEMPLATES[d % len(captions.HELD_OUT_TEMPLATES)])
                   for d in range(3, 3 + b)]
        cond = task.tokenizer.batch(prompts)
        images = []
        for m in (model, ort_model):
            g = generator(loaded.config.train.seed, PARITY_SEED_KEY, b)
            images.append(sample(m, DDIMScheduler(task.schedule), b, cond=cond, guidance=guidance,
                                 num_steps=PIPELINE_STEPS, generator=g, device="cpu").images)
        err = float((images[0] - images[1]).abs().max())
        rows.append({"check": "text_to_image_ddim", "inputs": "real", "batch": b, "steps": PIPELINE_STEPS,
                     "guidance": guidance, "max_abs_error": err})
        if not err <= PIPELINE_TOLERANCE_FACTOR * tolerance:
            raise DubokoError(
                f"a {PIPELINE_STEPS}-step DDIM text-to-image run differs between ONNX Runtime and PyTorch: max abs "
                f"error {err:.3g} > {PIPELINE_TOLERANCE_FACTOR * tolerance:g} (batch {b}); nothing written")
    return rows


# A family of several graphs has a check of the whole inference loop besides each graph's
# parity: (loaded, specs, sessions by graph name, tolerance) -> report rows, DubokoError when off.
PipelineCheck = Callable[[LoadedRun, list[GraphSpec], dict[str, Any], float], list[dict[str, Any]]]


@dataclass
class ExportPlan:
    """What one run exports: its graphs (one file each) and, for several, the loop check."""

    specs: list[GraphSpec]
    pipeline_check: PipelineCheck | None = None


def export_plan(loaded: LoadedRun) -> ExportPlan:
    """The exportable graphs of a loaded run, or one line saying why there are none."""
    task = loaded.config.task
    if task == "image-classification":
        return ExportPlan([_image_spec(loaded)])
    if task == "language-model":
        return ExportPlan([_lm_spec(loaded)])
    if task == "seq2seq":
        return ExportPlan(_seq2seq_specs(loaded), _seq2seq_greedy_check)
    if task == "diffusion":
        if loaded.model.config.conditioning == "text":
            return ExportPlan(_text_unet_specs(loaded), _text_to_image_check)
        return ExportPlan([_unet_spec(loaded)])
    raise DubokoError(
        f"ONNX export supports image-classification, language-model, seq2seq and diffusion runs; this run's task "
        f"is {task!r}"
    )


def graph_spec(loaded: LoadedRun) -> GraphSpec:
    """The one exportable graph of a single-graph run (`bench inference`), or one line."""
    plan = export_plan(loaded)
    if len(plan.specs) != 1:
        names = ", ".join(s.name for s in plan.specs)
        raise DubokoError(f"a {loaded.config.task} run exports {len(plan.specs)} graphs ({names}), not one; "
                          "use `duboko export` for them")
    return plan.specs[0]


def graph_path(out: str | Path, name: str) -> Path:
    """Where graph `name` of a several-graph export goes: `--out X.onnx` -> X.<name>.onnx (so the
    default RUN/model.onnx gives RUN/model.encoder.onnx and RUN/model.decoder_step.onnx)."""
    out = Path(out)
    if not name:
        return out
    stem = out.name[: -len(".onnx")] if out.name.endswith(".onnx") else out.name
    return out.with_name(f"{stem}.{name}.onnx")


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
                # (masks are bool outputs: compared as 0/1, so a flipped entry counts as 1)
                err = max(float((e.float() - g.float()).abs().max()) for e, g in zip(expected, got))
                row = {"inputs": "real" if real else "random", "batch": b, "seq_len": t, "max_abs_error": err}
                if spec.name:
                    row["graph"] = spec.name
                rows.append(row)
    return rows


@dataclass
class ExportedFile:
    """One written graph of an export."""

    path: Path
    graph: str  # its name in a several-graph family ("" for a single graph)
    family: str
    bytes: int
    max_abs_error: float


@dataclass
class ExportReport:
    path: Path  # the (first) written file
    family: str
    checks: list[dict[str, Any]]
    tolerance: float
    max_abs_error: float
    bytes: int  # all written files together
    quantized: Path | None = None
    int8_agreement: float | None = None  # share of real inputs whose argmax int8 == fp32
    files: list[ExportedFile] = field(default_factory=list)
    # The whole inference loop through ONNX Runtime vs PyTorch (greedy decoding, a DDIM run).
    pipeline_checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "family": self.family, "tolerance": self.tolerance,
                "max_abs_error": self.max_abs_error, "bytes": self.bytes, "checks": self.checks,
                "quantized": str(self.quantized) if self.quantized else None, "int8_agreement": self.int8_agreement,
                "files": [{"path": str(f.path), "graph": f.graph, "family": f.family, "bytes": f.bytes,
                           "max_abs_error": f.max_abs_error} for f in self.files],
                "pipeline_checks": self.pipeline_checks}


def _with_metadata(model_proto: Any, loaded: LoadedRun, spec: GraphSpec, extra: dict[str, str]) -> Any:
    props = {
        "duboko_format": "1",
        "recipe": json.dumps(loaded.config.to_dict()),
        "task": loaded.config.task,
        "model": str(loaded.config.model["name"]),
        "family": spec.family,
        "weights_sha256": weights_digest(loaded.run_dir),
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


def _parity_error(spec: GraphSpec, checks: list[dict[str, Any]], tolerance: float) -> DubokoError:
    worst = max(c["max_abs_error"] for c in checks)
    bad = next(c for c in checks if not c["max_abs_error"] <= tolerance)
    graph = f"{spec.name} graph, " if spec.name else ""
    return DubokoError(
        f"ONNX Runtime and PyTorch disagree: max abs error {worst:.3g} > tolerance {tolerance:g} "
        f"({graph}{bad['inputs']} inputs, batch {bad['batch']}"
        + (f", seq_len {bad['seq_len']}" if bad["seq_len"] else "") + "); nothing written"
    )


def export_loaded(loaded: LoadedRun, out: str | Path, *, tolerance: float = DEFAULT_TOLERANCE,
                  opset: int = DEFAULT_OPSET, quantize: str | None = None) -> ExportReport:
    """Export a loaded run to `out` (parity-checked); with quantize="int8" the written file is
    the int8 graph (dynamic quantisation of the checked fp32 one) and the report says how often
    its top-1 agrees with fp32 on real inputs. A family of several graphs (seq2seq, text-to-image)
    writes one file per graph (`graph_path`), each parity-checked, and its inference loop is run
    through ONNX Runtime against PyTorch before anything is written."""
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
    plan = export_plan(loaded)
    if quantize and len(plan.specs) > 1:
        raise DubokoError(f"--quantize int8 covers single-graph families; a {loaded.config.task} run exports "
                          f"{len(plan.specs)} graphs ({', '.join(s.name for s in plan.specs)}): export it without --quantize")
    protos, sessions, all_checks, per_graph = [], {}, [], []
    for spec in plan.specs:
        t0 = max(spec.seq_lens[-1], 2) if spec.seq_lens != (0,) else 0
        example = spec.make_inputs(2, t0, False)  # batch 2 (and T > 1): 0/1 would be specialised
        proto = _quiet_export(spec, example, opset).model_proto
        sess = session(proto.SerializeToString())
        checks = parity(spec, sess)
        worst = max(c["max_abs_error"] for c in checks)
        if not worst <= tolerance:  # also refuses NaN
            raise _parity_error(spec, checks, tolerance)
        protos.append(proto)
        sessions[spec.name] = sess
        all_checks += checks
        per_graph.append(worst)
    worst = max(per_graph)
    pipeline_rows = plan.pipeline_check(loaded, plan.specs, sessions, tolerance) if plan.pipeline_check else []
    paths = [graph_path(out, spec.name) for spec in plan.specs]
    graphs = {spec.name: path.name for spec, path in zip(plan.specs, paths)}
    blobs = []
    agreement = None
    for spec, proto, graph_worst in zip(plan.specs, protos, per_graph):
        checks = [c for c in all_checks if c.get("graph", "") == spec.name]
        extra = {"parity_max_abs_error": f"{graph_worst:.3g}", "parity_tolerance": f"{tolerance:g}",
                 "parity_checks": json.dumps(checks), "precision": "fp32"}
        if spec.name:
            extra.update({"graph": spec.name, "graphs": json.dumps(graphs),
                          "pipeline_checks": json.dumps(pipeline_rows)})
        data = _with_metadata(proto, loaded, spec, extra).SerializeToString()
        if len(data) > MAX_ONNX_BYTES:
            raise DubokoError(f"the graph is {len(data)} bytes, over the 2 GiB a single ONNX file holds")
        if quantize == "int8":
            from duboko.export.quantize import quantize_int8_bytes

            q = quantize_int8_bytes(data)
            agreement = top1_agreement(spec, sessions[spec.name], session(q))
            import onnx

            qproto = onnx.load_from_string(q)
            extra.update({"precision": "int8", "int8_top1_agreement": f"{agreement:.4f}"})
            data = _with_metadata(qproto, loaded, spec, extra).SerializeToString()
        blobs.append(data)
    # Every check has passed: only now is anything written (each file atomically).
    files = []
    for spec, path, data, graph_worst in zip(plan.specs, paths, blobs, per_graph):
        atomic_write_bytes(path, data)
        files.append(ExportedFile(path, spec.name, spec.family, len(data), graph_worst))
    family = plan.specs[0].family if len(plan.specs) == 1 else "+".join(s.family for s in plan.specs)
    return ExportReport(paths[0], family, all_checks, tolerance, worst, sum(len(b) for b in blobs),
                        paths[0] if quantize else None, agreement, files, pipeline_rows)


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
        want = weights_digest(loaded.run_dir)
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
