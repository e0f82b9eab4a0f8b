"""Attention from its parts: scaled dot-product attention, multi-head attention, positional
encodings and pre-LayerNorm transformer blocks (Vaswani et al. 2017, "Attention Is All You Need").

Shapes: B batch, T query length, S key length, H heads, D = d_model, Dh = D / H head size.

Masks follow `torch.nn.functional.scaled_dot_product_attention`:
  * a boolean `attn_mask` is True where a query MAY attend to a key (broadcast to (B, H, T, S));
  * a float `attn_mask` is added to the scores (0 = keep, -inf = block);
  * a `key_padding_mask` (B, S) is True at PADDING keys (the `torch.nn.MultiheadAttention` and
    `TransformerEncoder` convention), i.e. the opposite sense: it says what to ignore.

Two paths compute the same thing (tested equal to 1e-5):
  * written out: `attention_weights(q, k, mask) @ v`, softmax(Q Kᵀ / √d + mask) V (eq. 1 of the
    paper), which keeps the weights for attention maps;
  * `attention`: the fused `F.scaled_dot_product_attention` kernel (flash / memory-efficient
    attention on GPUs), used for training and generation unless weights are asked for; in bf16/fp16
    on a CPU it takes the written-out matmuls for sequences up to 1,024 keys (2.4x faster there).

Stable API used by other families (the diffusion text encoder):
    TransformerEncoder(num_layers, d_model, num_heads, dim_feedforward, dropout, max_len,
                       positional="sinusoidal")
    forward(x: (B, T, d_model), key_padding_mask: (B, T) bool True=pad | None) -> (B, T, d_model)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from duboko.nn.checks import check_divisible

POSITIONAL = ("sinusoidal", "learned", "rotary", "none")

KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (B, H, S, Dh)


# ---------------------------------------------------------------------------------------------
# Scaled dot-product attention.


def causal_mask(t: int, s: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (T, S) mask, True where query i may see key j: j <= i + (S - T).

    With S > T (new queries after S - T cached keys) the queries are the LAST T positions, so the
    diagonal is shifted; `F.scaled_dot_product_attention(is_causal=True)` aligns top-left instead,
    which is only right for S == T."""
    s = t if s is None else s
    rows = torch.arange(t, device=device).unsqueeze(1) + (s - t)  # absolute query positions
    return torch.arange(s, device=device).unsqueeze(0) <= rows


def merge_masks(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    t: int,
    s: int,
    device: torch.device,
) -> torch.Tensor | None:
    """One boolean "may attend" mask (broadcastable to (B, H, T, S)) from the three kinds, or None.

    A float `attn_mask` is turned into a boolean one only if it is all 0/-inf; otherwise it is
    kept additive (then it cannot be combined with the others by logical and, so we add -inf)."""
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask)
    if key_padding_mask is not None:
        masks.append(~key_padding_mask.bool()[:, None, None, :])  # (B, 1, 1, S)
    if is_causal:
        masks.append(causal_mask(t, s, device))  # (T, S)
    if not masks:
        return None
    if any(m.dtype != torch.bool for m in masks):  # additive float masks: sum as scores offsets
        total = None
        for m in masks:
            add = m if m.dtype != torch.bool else torch.zeros(m.shape, device=device).masked_fill(~m, float("-inf"))
            total = add if total is None else total + add
        return total
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    return out


def attention_weights(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """softmax(Q Kᵀ / √d_k + M), the attention weights of eq. (1) of Vaswani et al. written out;
    the output is `weights @ V`.

    q (..., T, Dh), k (..., S, Dh) -> weights (..., T, S), each row sums to 1 over the keys.
    `mask` is one mask in this module's conventions (boolean "may attend", or additive float);
    `merge_masks` builds it from a causal flag and a key padding mask. `scale` defaults to 1/√d_k."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., T, S)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The fast path: `F.scaled_dot_product_attention` (fused kernels), with its arguments; without
    dropout it equals `attention_weights(q, k, merge_masks(attn_mask, None, is_causal, T, S)) @ v`.

    Exception: bf16/fp16 on a CPU with short keys goes through the written-out matmuls instead
    (`written_out_is_faster`), because there the fused CPU kernel is the slow one."""
    t, s = q.shape[-2], k.shape[-2]
    written_out = written_out_is_faster(q, k)
    if is_causal and (attn_mask is not None or t != s or written_out):
        # SDPA refuses is_causal together with a mask, and aligns the causal mask top-left; the
        # written-out path takes one merged mask.
        attn_mask = merge_masks(attn_mask, None, True, t, s, q.device)
        is_causal = False
    if written_out:
        weights = attention_weights(q, k, attn_mask, scale=scale)  # (..., T, S)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return weights @ v  # (..., T, Dh)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


# Longest key sequence the written-out path takes: its (B, H, T, S) fp32 softmax is what the fused
# kernel avoids materialising, so long sequences stay fused whatever the speed.
WRITTEN_OUT_MAX_KEYS = 1024


def written_out_is_faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True for bf16/fp16 attention on a CPU over at most WRITTEN_OUT_MAX_KEYS keys.

    Measured 2026-12-02 (torch 2.13, 2-core Xeon with AVX-512 BF16/AMX, vit-tiny, batch 128, 49+1
    tokens, forward + backward + AdamW under bf16 autocast): the fused CPU flash kernel gives 408
    images/s, the written-out matmuls 994 (fp32 with either path: ~600-630). The flash kernel's
    bf16 backward took 59 % of the step; plain matmuls run on the AMX/AVX-512 BF16 units. fp32 keeps
    the fused kernel (equal speed, less memory)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and k.shape[-2] <= WRITTEN_OUT_MAX_KEYS
    )


# ---------------------------------------------------------------------------------------------
# Positional encodings.


def check_positions(offset: int, length: int, max_len: int) -> None:
    """Positions offset..offset+length-1 must be within the max_len an encoding was built for."""
    if offset + length > max_len:
        raise ValueError(f"sequence of {offset + length} positions is longer than max_len {max_len}")


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """(max_len, d_model) table of section 3.5 of the paper:
    PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))."""
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (L, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (ceil(D/2),)
    angle = pos / torch.pow(10000.0, two_i / d_model)  # (L, ceil(D/2))
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table; no parameters (a non-persistent buffer, not saved)."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = x.shape[1]  # x (B, T, D)
        check_positions(offset, t, self.max_len)
        return x + self.pe[offset : offset + t].to(x.dtype)


class LearnedPositionalEncoding(nn.Module):
    """Adds a learned embedding per position (GPT-2's `wpe`)."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = x.shape[1]
        check_positions(offset, t, self.max_len)
        pos = torch.arange(offset, offset + t, device=x.device)
        return x + self.embedding(pos)  # (B, T, D) + (T, D)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer eq. 34): rotates each pair of query/key
    features (x_j, x_{j+Dh/2}) by the angle pos·θ_j, θ_j = base^(-2j/Dh), so q·k depends only on
    the relative position. Applied inside attention to q and k, not added to the input."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head size, got {head_dim}")
        self.max_len = max_len
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (Dh/2,)
        angle = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (L, Dh/2)
        self.register_buffer("cos", torch.cos(angle).float(), persistent=False)
        self.register_buffer("sin", torch.sin(angle).float(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x (B, H, T, Dh) at positions offset..offset+T-1 -> rotated x, same shape."""
        t = x.shape[-2]
        check_positions(offset, t, self.max_len)
        cos = self.cos[offset : offset + t].to(x.dtype)  # (T, Dh/2)
        sin = self.sin[offset : offset + t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)  # halves (B, H, T, Dh/2)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def make_positional(kind: str, d_model: int, max_len: int) -> nn.Module | None:
    """The additive encoding for `kind` (None for rotary, applied in attention, and for none)."""
    if kind == "sinusoidal":
        return SinusoidalPositionalEncoding(d_model, max_len)
    if kind == "learned":
        return LearnedPositionalEncoding(d_model, max_len)
    if kind in ("rotary", "none"):
        return None
    raise ValueError(f"unknown positional encoding {kind!r}; expected one of: {', '.join(POSITIONAL)}")


# ---------------------------------------------------------------------------------------------
# Multi-head attention.


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_H) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)
    (section 3.2.2). Self-attention when `context` is None, cross-attention to `context` otherwise.

    Set `record_weights = True` (or use `recording_attention(model)`) to keep the last per-head
    weights (B, H, T, S) in `self.weights`; that takes the written-out path."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        rotary_max_len: int = 0,
    ):
        super().__init__()
        check_divisible("embed_dim", embed_dim, num_heads, "num_heads")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)  # W^Q for all heads at once
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)  # W^O
        self.rotary = RotaryEmbedding(self.head_dim, rotary_max_len) if rotary_max_len else None
        self.record_weights = False
        self.weights: torch.Tensor | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        past_kv: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """x (B, T, D) queries; context (B, S, D) keys/values (None: x itself).

        `past_kv` holds the keys and values (B, H, P, Dh) of P earlier positions (self-attention
        with a key/value cache): the new queries are positions P..P+T-1. Returns the output
        (B, T, D) and the full keys and values (B, H, P+T, Dh) to cache for the next step."""
        b, t, _ = x.shape
        source = x if context is None else context
        q = self._heads(self.q_proj(x))  # (B, H, T, Dh)
        k = self._heads(self.k_proj(source))  # (B, H, S, Dh)
        v = self._heads(self.v_proj(source))
        offset = 0 if past_kv is None else past_kv[0].shape[2]
        if self.rotary is not None and context is None:
            q = self.rotary(q, offset)
            k = self.rotary(k, offset)  # cached keys were rotated at their own positions
        if past_kv is not None:
            k = torch.cat((past_kv[0], k), dim=2)  # (B, H, P+T, Dh)
            v = torch.cat((past_kv[1], v), dim=2)
        s = k.shape[2]
        causal = is_causal and t > 1  # one new query may see every key already
        dropout = self.dropout if self.training else 0.0
        if self.record_weights:
            mask = merge_masks(attn_mask, key_padding_mask, causal, t, s, x.device)
            weights = attention_weights(q, k, mask)  # (B, H, T, S)
            self.weights = weights.detach()  # recorded before dropout: the map the model computes
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            out = weights @ v  # (B, H, T, Dh)
        else:
            mask = merge_masks(attn_mask, key_padding_mask, False, t, s, x.device)
            out = attention(q, k, v, mask, dropout, is_causal=causal)
        out = out.transpose(1, 2).reshape(b, t, self.embed_dim)  # concat heads (B, T, D)
        return self.out_proj(out), (k, v)

    @torch.no_grad()
    def load_torch_weights(self, mha: nn.MultiheadAttention) -> None:
        """Copy the weights of a `torch.nn.MultiheadAttention` (same embed_dim, num_heads,
        batch_first either way): its packed in_proj is W^Q, W^K, W^V stacked."""
        if mha.embed_dim != self.embed_dim or mha.num_heads != self.num_heads:
            raise ValueError("embed_dim and num_heads must match")
        if mha.in_proj_weight is None:
            raise ValueError("only MultiheadAttention with equal q/k/v sizes (packed in_proj) is supported")
        for proj, w in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_weight.chunk(3, dim=0)):
            proj.weight.copy_(w)
        if mha.in_proj_bias is not None:
            for proj, b in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_bias.chunk(3, dim=0)):
                proj.bias.copy_(b)
        self.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            self.out_proj.bias.copy_(mha.out_proj.bias)


@contextmanager
def recording_attention(model: nn.Module) -> Iterator[list[MultiHeadAttention]]:
    """Within the block, every MultiHeadAttention in `model` keeps its last weights (B, H, T, S)
    in `.weights`. Yields the modules in definition order."""
    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    for m in modules:
        m.record_weights = True
        m.weights = None
    try:
        yield modules
    finally:
        for m in modules:
            m.record_weights = False


# ---------------------------------------------------------------------------------------------
# Pre-LayerNorm blocks.


class MLP(nn.Module):
    """Position-wise feed-forward network (section 3.3): Linear -> GELU -> Linear -> dropout."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_model, dim_feedforward, bias=bias)
        self.fc2 = nn.Linear(dim_feedforward, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))  # (B, T, D)


@dataclass(frozen=True)
class BlockConfig:
    """The sizes every block of a stack shares (the stack builds one and hands it to each)."""

    d_model: int  # width D of the residual stream
    num_heads: int  # attention heads (d_model must be divisible by it)
    dim_feedforward: int  # MLP hidden size
    dropout: float = 0.0  # on attention weights and on every residual branch
    bias: bool = True  # biases in the Linear and LayerNorm layers
    rotary_max_len: int = 0  # > 0: rotary positions in self-attention, up to this length


class TransformerEncoderBlock(nn.Module):
    """Pre-LN encoder layer (Xiong et al. 2020): x + Attn(LN(x)), then x + MLP(LN(x)). The LayerNorm
    before each sublayer (instead of after, as in the paper) trains without warm-up tricks."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        c = config
        self.ln1 = nn.LayerNorm(c.d_model, bias=c.bias)
        self.attn = MultiHeadAttention(c.d_model, c.num_heads, c.dropout, c.bias, c.rotary_max_len)
        self.ln2 = nn.LayerNorm(c.d_model, bias=c.bias)
        self.mlp = MLP(c.d_model, c.dim_feedforward, c.dropout, c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        a, _ = self.attn(self.ln1(x), key_padding_mask=key_padding_mask, is_causal=is_causal)
        x = x + self.dropout(a)  # (B, T, D)
        return x + self.mlp(self.ln2(x))


class TransformerDecoderBlock(nn.Module):
    """Pre-LN decoder layer: causal self-attention, then (if `cross_attention`) attention to the
    encoder's output, then the MLP, each as x + Sublayer(LN(x)). Without cross-attention this is
    the GPT block."""

    def __init__(self, config: BlockConfig, cross_attention: bool = True):
        super().__init__()
        c = config
        # Registration order (ln1, self_attn, ln_cross, cross_attn, ln2, mlp) is the parameter
        # order: optimizer states and seeded initialisations depend on it.
        self.ln1 = nn.LayerNorm(c.d_model, bias=c.bias)
        self.self_attn = MultiHeadAttention(c.d_model, c.num_heads, c.dropout, c.bias, c.rotary_max_len)
        if cross_attention:
            self.ln_cross = nn.LayerNorm(c.d_model, bias=c.bias)
            self.cross_attn = MultiHeadAttention(c.d_model, c.num_heads, c.dropout, c.bias)
        else:
            self.ln_cross = self.cross_attn = None
        self.ln2 = nn.LayerNorm(c.d_model, bias=c.bias)
        self.mlp = MLP(c.d_model, c.dim_feedforward, c.dropout, c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        *,
        memory_key_padding_mask: torch.Tensor | None = None,
        past_kv: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """x (B, T, D) targets, memory (B, S, D) encoder output. Returns (B, T, D) and this layer's
        self-attention keys/values (B, H, P+T, Dh) for a cache."""
        # No padding mask on the targets: they are right-padded, so the causal mask already keeps
        # every real token from seeing a pad.
        a, kv = self.self_attn(self.ln1(x), is_causal=True, past_kv=past_kv)
        x = x + self.dropout(a)
        if self.cross_attn is not None:
            if memory is None:
                raise ValueError("this decoder block has cross-attention: pass the encoder memory")
            c, _ = self.cross_attn(self.ln_cross(x), memory, key_padding_mask=memory_key_padding_mask)
            x = x + self.dropout(c)
        return x + self.mlp(self.ln2(x)), kv


# ---------------------------------------------------------------------------------------------
# Stacks.


class _PreLNStack(nn.Module):
    """What the encoder and decoder stacks share: the positional encoding added to the embedded
    input, dropout, `num_layers` blocks of `block_cls` and the final LayerNorm (a pre-LN stack
    needs one: the residual stream is never normalised inside the blocks).

    `block_options` go to every block (the decoder's `cross_attention`)."""

    block_cls: type[nn.Module]

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float = 0.0,
        max_len: int = 512,
        positional: str = "sinusoidal",
        bias: bool = True,
        **block_options: bool,
    ):
        super().__init__()
        self.max_len = max_len
        self.positional = make_positional(positional, d_model, max_len)  # refuses an unknown kind
        rotary = max_len if positional == "rotary" else 0  # rotary acts inside each attention
        block = BlockConfig(d_model, num_heads, dim_feedforward, dropout, bias, rotary)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(self.block_cls(block, **block_options) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model, bias=bias)

    def embed_positions(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x (B, T, D) embedded tokens at positions offset..offset+T-1 -> x plus their positional
        encoding, after dropout (B, T, D)."""
        check_positions(offset, x.shape[1], self.max_len)
        if self.positional is not None:
            x = self.positional(x, offset)
        return self.dropout(x)


class TransformerEncoder(_PreLNStack):
    """Positional encoding + dropout + `num_layers` pre-LN encoder blocks + a final LayerNorm.

    Input is already embedded: x (B, T, d_model); key_padding_mask (B, T) bool, True at padding.
    Output (B, T, d_model). Used by the seq2seq model and as the diffusion text encoder."""

    block_cls = TransformerEncoderBlock

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_positions(x)
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return self.norm(x)


class TransformerDecoder(_PreLNStack):
    """Positional encoding + `num_layers` pre-LN decoder blocks + final LayerNorm, with an optional
    key/value cache: `past` is a list of per-layer (k, v); new inputs start at position P (the
    cached length). `cross_attention=False` leaves out the attention to an encoder (the GPT)."""

    block_cls = TransformerDecoderBlock  # cross_attention=True unless the stack is given False

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        *,
        memory_key_padding_mask: torch.Tensor | None = None,
        past: list[KV] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """x (B, T, D) embedded targets -> (B, T, D) and the per-layer (k, v) (B, H, P+T, Dh)."""
        x = self.embed_positions(x, offset=0 if not past else past[0][0].shape[2])
        present = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(
                x,
                memory,
                memory_key_padding_mask=memory_key_padding_mask,
                past_kv=past[i] if past else None,
            )
            present.append(kv)
        return self.norm(x), present
