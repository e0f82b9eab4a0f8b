"""Transformers: a GPT-style decoder-only language model and an encoder-decoder (seq2seq).

Both are built from the blocks in `duboko.nn.attention` (pre-LayerNorm, Xiong et al. 2020).

GPT (Radford et al. 2018/2019): token embedding + positional encoding -> n_layer causal blocks ->
LayerNorm -> linear head (tied to the token embedding by default, Press & Wolf 2017). It follows
the language-model protocol of `duboko.tasks.language_model`:

    forward(idx: (B, T) long, state=None) -> (logits (B, T, vocab), new_state)

where `state` is a `KVCache` (per-layer keys/values plus the position offset and the tokens seen);
`state=None` runs without a cache. Feeding one token at a time with the returned state gives the
same logits as re-running the whole window without a cache (tested), at O(T) instead of O(T²) cost
per new token. Once the window is full (block_size tokens) the positions shift, so the model
re-encodes the last block_size tokens (exactly what an uncached generator cropping its context
does).

Sizes (parameters with tied weights, vocab 65 unless said):
    gpt-tiny      2 layers × 128, 4 heads, context 128         ~0.41 M
    gpt-char      4 layers × 192, 6 heads, context 128          ~1.8 M  (shakespeare-gpt: 4 × 128, 0.82 M)
    gpt-mini      6 layers × 384, 6 heads, context 256         ~10.7 M
    gpt2-small   12 layers × 768, 12 heads, context 1024, vocab 50257   124.4 M (GPT-2 small)

Seq2Seq (Vaswani et al. 2017, fig. 1): a shared token embedding, a `TransformerEncoder` over the
source, a `TransformerDecoder` with causal self-attention and cross-attention to the encoder
output, and an output head tied to the embedding. Trained with teacher forcing; decodes greedily
or with beam search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from duboko.errors import DubokoError
from duboko.nn.attention import (
    KV,
    MLP,
    POSITIONAL,
    LearnedPositionalEncoding,
    TransformerDecoder,
    TransformerEncoder,
)
from duboko.nn.checks import check_at_least_one, check_divisible, check_dropout, check_one_of
from duboko.registry import register_model


def tie_output_head(model: nn.Module, embedding_key: str, head_key: str) -> None:
    """Leave the tied head out of state dicts (safetensors refuses two names for one tensor; the
    file is also smaller) and restore it from the embedding on load."""

    def drop(module, state_dict, prefix, local_metadata):
        state_dict.pop(prefix + head_key, None)

    def fill(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        if prefix + embedding_key in state_dict:
            state_dict.setdefault(prefix + head_key, state_dict[prefix + embedding_key])

    model.register_state_dict_post_hook(drop)
    model.register_load_state_dict_pre_hook(fill)


# ---------------------------------------------------------------------------------------------
# GPT.


class TanhGELUMLP(MLP):
    """The block MLP with GPT-2's GELU, the tanh approximation (Hendrycks & Gimpel 2016, eq. in
    section 2): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))). Imported GPT-2 weights need it: the
    exact GELU differs by up to ~1e-3 per unit, far above a 1e-4 logit parity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))  # (B, T, D)


class DecodeBuffer:
    """Preallocated storage for the fused one-token step: keys and values of every layer for all
    block_size positions, written in place one position per token (instead of a torch.cat that
    copies the whole cache per layer and token), and the tokens seen. A `KVCache` made by the
    fused step holds views of it.

    Positions below `filled` are never written again, so the views of earlier states stay valid;
    a step from a state whose offset is not `filled` (a second continuation of the same state)
    copies that state into a new buffer instead of overwriting the other branch's next position.

    The per-layer views the step needs every token are made here once: at batch 1 a multi-index
    like kv[:, 0, :, :, :p] costs 3-6 µs, as much as one of the tiny matmuls."""

    def __init__(self, kv: torch.Tensor, tokens: torch.Tensor, plan: DecodePlan, filled: int):
        self.kv = kv  # (L, 2, B, H, block_size, Dh): keys [:, 0] and values [:, 1]
        self.tokens = tokens  # (B, block_size) long
        self.plan = plan  # the model's fused-step tensors (GPT._decode_plan), checked when the buffer was made
        self.filled = filled  # positions written
        n_layer, _, b, h, _, dh = kv.shape
        self.layer_kv = list(kv.unbind(0))  # per layer (2, B, H, block_size, Dh)
        self.keys = [t[0] for t in self.layer_kv]  # per layer (B, H, block_size, Dh)
        self.values = [t[1] for t in self.layer_kv]
        # The QKV projection's output, written by F.linear(out=) and read through fixed views (one
        # buffer for all layers: each layer's q is consumed, and its k, v copied, before the next).
        self.qkv = torch.empty(b, 3 * h * dh, dtype=plan.layers[0][1].dtype, device=kv.device)  # (B, 3D)
        split = self.qkv.view(b, 3, h, dh)
        self.q = split[:, 0, :, None]  # (B, H, 1, Dh): the query of the one new position
        self.new_kv = split[:, 1:].transpose(0, 1)  # (2, B, H, Dh): its key and value


@dataclass
class DecodePlan:
    """The tensors the fused step reads, gathered from the modules once per `DecodeBuffer`."""

    layers: list[tuple]  # per layer: ln1 (shape, weight, bias, eps), W_qkv (3D, D), b_qkv, W_out, b_out, ln2, W1, b1, W2, b2, GELU approximation
    tok_emb: torch.Tensor  # (vocab, D)
    pos: torch.Tensor | None  # (block_size, D) learned or sinusoidal positions, None for none
    norm: tuple  # the final LayerNorm's (shape, weight, bias, eps)
    head: torch.Tensor  # (vocab, D) the output head (no bias)
    attention: list[nn.Module]  # the blocks' attention modules, whose record_weights sends a step to the general path


@dataclass
class KVCache:
    """The GPT's generation state: what `forward(idx, state)` returns and takes back."""

    layers: list[KV] = field(default_factory=list)  # per layer (k, v), each (B, H, P, Dh)
    offset: int = 0  # P: positions already in the cache (the next token's position)
    tokens: torch.Tensor | None = None  # (B, P) the cached tokens, to re-encode a full window
    buffer: DecodeBuffer | None = None  # the fused step's storage that `layers` and `tokens` are views of


@dataclass
class GPTConfig:
    vocab_size: int = 65  # tokens; the language-model task sets it from the tokenizer
    block_size: int = 128  # context length: the most positions the model attends over
    n_layer: int = 4  # transformer blocks
    n_head: int = 6  # attention heads per block (n_embd must be divisible by it)
    n_embd: int = 192  # model width d_model
    mlp_ratio: int = 4  # MLP hidden size = mlp_ratio · n_embd
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2 has them)
    tie_weights: bool = True  # share the token embedding with the output head
    positional: str = "learned"  # learned (GPT-2) | sinusoidal | rotary | none
    activation: str = "gelu"  # MLP activation: gelu (exact erf) | gelu_tanh (GPT-2's tanh approximation)


class GPT(nn.Module):
    """Decoder-only transformer language model."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        check_one_of("positional", config.positional, POSITIONAL)
        check_at_least_one(
            vocab_size=config.vocab_size,
            block_size=config.block_size,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
        )
        check_divisible("n_embd", config.n_embd, config.n_head, "n_head")
        check_dropout(config.dropout)
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)  # wte
        self.decoder = TransformerDecoder(
            config.n_layer,
            config.n_embd,
            config.n_head,
            config.mlp_ratio * config.n_embd,
            config.dropout,
            max_len=config.block_size,
            positional=config.positional,
            bias=config.bias,
            cross_attention=False,
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        check_one_of("activation", config.activation, ("gelu", "gelu_tanh"))
        if config.activation == "gelu_tanh":
            for layer in self.decoder.layers:  # same parameters (fc1, fc2), another activation
                layer.mlp = TanhGELUMLP(config.n_embd, config.mlp_ratio * config.n_embd, config.dropout, config.bias)
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections into the residual stream by 1/√(2·n_layer),
        # so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight  # (vocab, n_embd), one tensor
            tie_output_head(self, "tok_emb.weight", "lm_head.weight")

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, state: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """idx (B, T) token ids -> logits (B, T, vocab) and the cache after these tokens."""
        b, t = idx.shape
        bs = self.config.block_size
        if state is not None and state.offset + t > bs:
            # The window is full: positions would exceed block_size, so drop the cache and
            # re-encode the last block_size tokens from position 0.
            window = torch.cat((state.tokens, idx), dim=1)[:, -bs:]
            logits, new_state = self.forward(window, None)
            return logits[:, -t:], new_state
        if state is None and t > bs:
            # Reached from a recipe with data.seq_len > model.block_size: a user mistake.
            raise DubokoError(
                f"sequence length {t} exceeds the model's block_size {bs}; set data.seq_len <= "
                f"model.block_size (or raise block_size)"
            )
        if state is not None and t == 1 and state.layers and self._fast_decode_ok():
            return self._decode_one(idx, state)
        x = self.tok_emb(idx)  # (B, T, n_embd)
        x, present = self.decoder(x, past=state.layers if state is not None else None)
        logits = self.lm_head(x)  # (B, T, vocab)
        seen = idx if state is None or state.tokens is None else torch.cat((state.tokens, idx), dim=1)
        return logits, KVCache(present, (0 if state is None else state.offset) + t, seen)

    # -- the one-token decoding step ---------------------------------------------------------
    # Generation at batch 1 runs one token through the model per step. There the matrices are
    # tiny ((1, 128) @ (128, 384) for shakespeare-gpt, ~8 µs) and the time goes to dispatch: ~25
    # module calls and ~100 small ops per token on the general path. This path computes the same
    # block maths (x + Attn(LN(x)), x + MLP(LN(x)), the final LN and the head) with functional
    # calls on tensors gathered once per generation, one fused QKV matmul per layer, and keys and
    # values written in place into a preallocated buffer (`DecodeBuffer`, one copy per layer per
    # token) instead of concatenated. Tested equal to the general path (logits to 1e-5, the same
    # tokens greedy and seeded). Measured and not kept: torch.compile of this step (slower per token
    # on CPU and ~100 s of warm-up) and attention over the whole masked buffer (1.45x slower than
    # over the filled view); see docs/benchmarks.md.

    def _fast_decode_ok(self) -> bool:
        """The fused step covers inference (eval mode, no autograd: the stacked weights are copies)
        with additive positions (learned / sinusoidal / none) and no recorded attention weights;
        anything else takes the general path. Runs every token: the attention modules come from the
        list `_decode_plan` keeps (refreshed per `DecodeBuffer`), not from module attribute lookups."""
        if self.training or torch.is_grad_enabled() or self.config.positional == "rotary":
            return False
        attention = self.__dict__.get("_plan_attention")
        if attention is None:
            attention = [layer.self_attn for layer in self.decoder.layers]
        return not any(a.record_weights for a in attention)

    def _decode_plan(self) -> DecodePlan:
        """The tensors of the fused step: per layer W^Q, W^K, W^V stacked to (3·D, D), then the
        embeddings', the final LayerNorm's and the head's, read straight from the modules' parameter
        dicts (module attribute lookups cost more than the tiny matmuls here). Rebuilt when a module
        or a weight changes: the key holds each layer module's identity and each tensor's identity,
        address and in-place version counter. Checking the key costs ~40 µs, so it is checked once
        per `DecodeBuffer` (per generation), not per token."""
        layers = list(self.decoder.layers)
        pos = self.decoder.positional
        cached_modules = self.__dict__.get("_plan_modules")
        if cached_modules is None or cached_modules[0] != [id(l) for l in layers]:
            modules = [(l.ln1, l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj, l.self_attn.out_proj, l.ln2,
                        l.mlp.fc1, l.mlp.fc2, "tanh" if isinstance(l.mlp, TanhGELUMLP) else "none") for l in layers]
            cached_modules = ([id(l) for l in layers], modules)
            object.__setattr__(self, "_plan_modules", cached_modules)  # plain attributes: not buffers, never saved
            object.__setattr__(self, "_plan_attention", [l.self_attn for l in layers])
        modules = cached_modules[1]
        if isinstance(pos, LearnedPositionalEncoding):
            pos_table = pos.embedding.weight  # (block_size, D)
        elif pos is not None:
            pos_table = pos.pe  # the sinusoidal table, a buffer
        else:
            pos_table = None
        norm = self.decoder.norm
        tensors = [t for mods in modules for m in mods[:-1] for t in m._parameters.values() if t is not None]
        tensors += [self.tok_emb.weight, self.lm_head.weight, norm.weight, norm.bias]
        if pos_table is not None:
            tensors.append(pos_table)
        key = tuple((id(t), t.data_ptr(), t._version) for t in tensors if t is not None)
        cached = self.__dict__.get("_plan_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        layer_plans = []
        with torch.no_grad():
            for ln1, q, k, v, out, ln2, fc1, fc2, approximate in modules:
                w_qkv = torch.cat((q.weight, k.weight, v.weight), dim=0)  # (3D, D)
                b_qkv = torch.cat((q.bias, k.bias, v.bias)) if q.bias is not None else None
                layer_plans.append(((ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps), w_qkv, b_qkv, out.weight,
                                    out.bias, (ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps), fc1.weight, fc1.bias,
                                    fc2.weight, fc2.bias, approximate))
        plan = DecodePlan(layer_plans, self.tok_emb.weight, pos_table,
                          (norm.normalized_shape, norm.weight, norm.bias, norm.eps), self.lm_head.weight,
                          self.__dict__["_plan_attention"])
        object.__setattr__(self, "_plan_cache", (key, plan))
        return plan

    def _decode_buffer(self, state: KVCache) -> DecodeBuffer:
        """The buffer to write position state.offset into: the state's own when this is the next
        position of its newest branch, else a new one holding a copy of the state."""
        buf, p = state.buffer, state.offset
        if buf is not None and buf.filled == p and (not buf.kv.is_inference() or torch.is_inference_mode_enabled()):
            return buf  # (an inference-mode tensor cannot be written outside inference mode: copy it then)
        k0 = state.layers[0][0]  # (B, H, P, Dh)
        b, h, _, dh = k0.shape
        kv = torch.empty(len(state.layers), 2, b, h, self.config.block_size, dh, dtype=k0.dtype, device=k0.device)
        for i, (k, v) in enumerate(state.layers):
            kv[i, 0, :, :, :p] = k
            kv[i, 1, :, :, :p] = v
        tokens = torch.zeros(b, self.config.block_size, dtype=torch.long, device=k0.device)
        if state.tokens is not None:
            tokens[:, :p] = state.tokens[:, -p:]
        return DecodeBuffer(kv, tokens, self._decode_plan(), p)

    def _decode_one(self, idx: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """idx (B, 1), the cache of P < block_size positions -> logits (B, 1, vocab), new cache.

        The same ops as the general path, one per line of the block maths, each kept bit-for-bit
        (F.linear, not addmm on pre-transposed weights: MKL's kernel for a contiguous (D, 3D) matrix
        sums in another order; in-place adds into the residual, which this step owns). Everything
        else is gone: no module calls, views made once per buffer, the QKV output in a reused buffer."""
        buf = self._decode_buffer(state)
        plan = buf.plan
        p = state.offset
        n = p + 1
        b = idx.shape[0]
        # Token embedding plus the position's encoding; eval mode, so the embedding dropout is the
        # identity (the general path's embed_positions, without its module calls).
        x = torch.embedding(plan.tok_emb, idx[:, 0])  # (B, D), a new tensor: the residual stream, updated in place
        if plan.pos is not None:
            x.add_(plan.pos[p].to(x.dtype))
        # Under autocast F.linear(out=) is refused (and the dtype of its output differs): per-token views then.
        fixed = not torch.is_autocast_enabled(x.device.type)
        keys, values, layer_kv = buf.keys, buf.values, buf.layer_kv
        layers = []
        for i, (ln1, w_qkv, b_qkv, w_out, b_out, ln2, w1, bias1, w2, bias2, approximate) in enumerate(plan.layers):
            h = torch.layer_norm(x, *ln1)  # x + Attn(LN1(x)) ...
            if fixed:
                torch._C._nn.linear(h, w_qkv, b_qkv, out=buf.qkv)  # (B, 3D)
                q, new_kv = buf.q, buf.new_kv  # (B, H, 1, Dh), (2, B, H, Dh) views of it
            else:
                qkv = F.linear(h, w_qkv, b_qkv).view(b, 3, -1, buf.q.shape[-1])
                q, new_kv = qkv[:, 0, :, None], qkv[:, 1:].transpose(0, 1)
            layer_kv[i].select(3, p).copy_(new_kv)  # k and v at position P, one copy (casts to the cache dtype)
            k, v = keys[i].narrow(2, 0, n), values[i].narrow(2, 0, n)  # (B, H, P+1, Dh): the filled positions
            layers.append((k, v))
            a = F.scaled_dot_product_attention(q, k, v)  # one query, every key: no mask. (B, H, 1, Dh)
            x.add_(F.linear(a.reshape(b, -1), w_out, b_out))  # (B, H, 1, Dh) is (B, D) in memory: T = 1
            y = F.gelu(F.linear(torch.layer_norm(x, *ln2), w1, bias1), approximate=approximate)  # (B, 4D)
            x.add_(F.linear(y, w2, bias2))  # ... then x + MLP(LN2(x))
        x = torch.layer_norm(x, *plan.norm)
        logits = F.linear(x, plan.head).unsqueeze(1)  # (B, 1, vocab); the head has no bias
        buf.tokens.select(1, p).copy_(idx.select(1, 0))
        buf.filled = n
        return logits, KVCache(layers, n, buf.tokens.narrow(1, 0, n), buf)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters (tied weights counted once); non_embedding drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        pos = self.decoder.positional
        if non_embedding and pos is not None:
            n -= sum(p.numel() for p in pos.parameters())
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6·N + 12·L·T·d (Kaplan et al. 2020 /
        PaLM appendix B), N the non-embedding parameters. For model FLOPs utilisation (MFU)."""
        c = self.config
        t = seq_len or c.block_size
        return 6.0 * self.num_parameters(non_embedding=True) + 12.0 * c.n_layer * t * c.n_embd


def _token_input(config: GPTConfig, batch_size: int) -> tuple[torch.Tensor]:
    return (torch.randint(0, config.vocab_size, (batch_size, min(config.block_size, 32))),)


# ---------------------------------------------------------------------------------------------
# Encoder-decoder.


@dataclass
class Seq2SeqConfig:
    vocab_size: int = 64  # shared source/target vocabulary; the seq2seq task sets it
    d_model: int = 128  # model width
    num_heads: int = 4  # attention heads (d_model must be divisible by it)
    num_encoder_layers: int = 3  # encoder blocks
    num_decoder_layers: int = 3  # decoder blocks
    dim_feedforward: int = 512  # MLP hidden size
    dropout: float = 0.1  # dropout on embeddings, attention and residual branches
    max_len: int = 64  # longest source or target sequence in tokens (with BOS/EOS)
    positional: str = "sinusoidal"  # sinusoidal (the paper's) | learned | rotary | none
    tie_weights: bool = True  # output head shares the token embedding (section 3.4)
    pad_id: int = 0  # padding token
    bos_id: int = 1  # begin-of-sequence token that starts every decoder input
    eos_id: int = 2  # end-of-sequence token that ends every target


class Seq2Seq(nn.Module):
    """Transformer encoder-decoder. forward(src (B, S), tgt_in (B, T)) -> logits (B, T, vocab)."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        check_divisible("d_model", config.d_model, config.num_heads, "num_heads")
        check_one_of("positional", config.positional, POSITIONAL)
        check_dropout(config.dropout)
        self.config = config
        d = config.d_model
        self.embedding = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_id)
        self.encoder = TransformerEncoder(
            config.num_encoder_layers, d, config.num_heads, config.dim_feedforward,
            config.dropout, config.max_len, config.positional,
        )
        self.decoder = TransformerDecoder(
            config.num_decoder_layers, d, config.num_heads, config.dim_feedforward,
            config.dropout, config.max_len, config.positional, cross_attention=True,
        )
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        nn.init.normal_(self.embedding.weight, std=d**-0.5)
        with torch.no_grad():
            self.embedding.weight[config.pad_id].zero_()
        if config.tie_weights:
            self.head.weight = self.embedding.weight
            tie_output_head(self, "embedding.weight", "head.weight")
        self.embed_scale = math.sqrt(d)  # section 3.4: embeddings are multiplied by √d_model

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens) * self.embed_scale  # (B, T, d_model)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) -> memory (B, S, d_model) and its padding mask (B, S), True at padding."""
        pad = src == self.config.pad_id
        return self.encoder(self.embed(src), pad), pad

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_pad: torch.Tensor,
        past: list[KV] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """tgt (B, T) decoder inputs (after P cached positions) -> logits (B, T, vocab), cache."""
        x, present = self.decoder(
            self.embed(tgt), memory, memory_key_padding_mask=memory_pad, past=past
        )
        return self.head(x), present

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tgt_in is BOS + target[:-1]; logits predict the target (B, T, vocab).
        Right padding needs no target mask: the causal mask keeps real tokens from seeing it."""
        memory, pad = self.encode(src)
        return self.decode(tgt_in, memory, pad)[0]

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, max_new_tokens: int | None = None) -> list[list[int]]:
        """Most likely token at each step, with a key/value cache. Returns token ids per source
        (without BOS/EOS)."""
        c = self.config
        steps = min(max_new_tokens or c.max_len - 1, c.max_len - 1)
        memory, pad = self.encode(src)
        b = src.shape[0]
        token = torch.full((b, 1), c.bos_id, dtype=torch.long, device=src.device)
        past = None
        out = torch.zeros(b, 0, dtype=torch.long, device=src.device)
        done = torch.zeros(b, dtype=torch.bool, device=src.device)
        for _ in range(steps):
            logits, past = self.decode(token, memory, pad, past)
            token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            token = token.masked_fill(done[:, None], c.pad_id)
            out = torch.cat((out, token), dim=1)
            done |= token[:, 0] == c.eos_id
            if done.all():
                break
        return [_strip(row, c.eos_id, c.pad_id) for row in out.tolist()]

    @torch.no_grad()
    def beam_search(
        self,
        src: torch.Tensor,
        beam_size: int = 4,
        max_new_tokens: int | None = None,
        length_penalty: float = 0.0,
    ) -> list[list[int]]:
        """Beam search per source sequence (Sutskever et al. 2014; Wu et al. 2016 length penalty):
        keep the `beam_size` best partial targets by summed log-probability; a finished hypothesis
        (EOS) is scored by logp / ((5 + len) / 6)^length_penalty. beam_size 1 is greedy decoding."""
        c = self.config
        steps = min(max_new_tokens or c.max_len - 1, c.max_len - 1)
        results = []
        for i in range(src.shape[0]):
            memory, pad = self.encode(src[i : i + 1])  # (1, S, d)
            k = beam_size
            seqs = torch.full((1, 1), c.bos_id, dtype=torch.long, device=src.device)  # (beams, t)
            scores = torch.zeros(1, device=src.device)  # (beams,) summed log-probabilities
            past = None
            finished: list[tuple[float, list[int]]] = []
            for step in range(steps):
                n = seqs.shape[0]
                logits, past = self.decode(
                    seqs[:, -1:], memory.expand(n, -1, -1), pad.expand(n, -1), past
                )
                logp = torch.log_softmax(logits[:, -1].float(), dim=-1)  # (beams, V)
                total = (scores[:, None] + logp).flatten()  # (beams·V,)
                top, idx = total.topk(min(2 * k, total.numel()))  # room for EOS candidates
                beam_idx, tok = idx // logp.shape[1], idx % logp.shape[1]
                keep_b, keep_t, keep_s = [], [], []
                for s, bi, ti in zip(top.tolist(), beam_idx.tolist(), tok.tolist()):
                    if ti == c.eos_id:
                        hyp = seqs[bi, 1:].tolist()
                        finished.append((s / (((5 + len(hyp) + 1) / 6) ** length_penalty), hyp))
                    else:
                        keep_b.append(bi), keep_t.append(ti), keep_s.append(s)
                    if len(keep_b) == k:
                        break
                best_done = max((f[0] for f in finished), default=-math.inf)
                if not keep_b or (len(finished) >= k and best_done >= max(keep_s)):
                    break  # no live beam can still beat the best finished one (scores only fall)
                sel = torch.tensor(keep_b, device=src.device)
                seqs = torch.cat((seqs[sel], torch.tensor(keep_t, device=src.device)[:, None]), dim=1)
                scores = torch.tensor(keep_s, device=src.device)
                past = [(kk[sel], vv[sel]) for kk, vv in past]
            if not finished:  # ran out of steps: take the best live beam
                finished.append((scores[0].item(), seqs[0, 1:].tolist()))
            results.append(max(finished, key=lambda f: f[0])[1])
        return results


def _strip(ids: list[int], eos: int, pad: int) -> list[int]:
    out = []
    for t in ids:
        if t in (eos, pad):
            break
        out.append(t)
    return out


def _seq2seq_input(config: Seq2SeqConfig, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.randint(3, config.vocab_size, (batch_size, 8))
    tgt = torch.randint(3, config.vocab_size, (batch_size, 10))
    return src, tgt


# ---------------------------------------------------------------------------------------------
# Registered variants: each model's arguments once, then each name with what it overrides.

_register_gpt = partial(register_model, family="transformer", model_cls=GPT, config_cls=GPTConfig, example_input=_token_input)
_register_gpt(
    "gpt-tiny", description="GPT, 2 layers × 128 wide, 4 heads, context 128 (~0.4M parameters)",
    n_layer=2, n_head=4, n_embd=128, block_size=128,
)
_register_gpt(
    "gpt-char", description="GPT, 4 layers × 192 wide, 6 heads, context 128 (~1.8M); shakespeare-gpt narrows it to 128",
    n_layer=4, n_head=6, n_embd=192, block_size=128,
)
_register_gpt(
    "gpt-mini", description="GPT, 6 layers × 384 wide, 6 heads, context 256 (~10.7M parameters)",
    n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
)
_register_gpt(
    "gpt2-small", description="GPT-2 small: 12 layers × 768, 12 heads, context 1024, vocab 50257 (124M)",
    n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257,
)
register_model(
    "seq2seq", family="transformer", model_cls=Seq2Seq, config_cls=Seq2SeqConfig,
    description="Transformer encoder-decoder, 3+3 layers × 128 wide, 4 heads (numbers-seq2seq uses 2+2)",
    example_input=_seq2seq_input,
)
