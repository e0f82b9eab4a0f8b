"""Attention blocks: written out == fused SDPA, masks, torch.nn.MultiheadAttention parity, positional
encodings (the paper's formula, rotary's relative property) and the encoder stack."""

from __future__ import annotations

import math

import pytest
import torch

from duboko.nn.attention import (
    MultiHeadAttention,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    TransformerDecoder,
    TransformerEncoder,
    attention,
    attention_weights,
    causal_mask,
    WRITTEN_OUT_MAX_KEYS,
    merge_masks,
    recording_attention,
    sinusoidal_table,
    written_out_is_faster,
)


def _qkv(b=2, h=3, t=5, s=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=g), torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g))


@pytest.mark.parametrize("case", ["none", "causal", "bool", "float", "padding+causal"])
def test_explicit_equals_sdpa(case):
    t = s = 6
    q, k, v = _qkv(t=t, s=s)
    kwargs = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "bool":
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(2, 1, t, s, generator=g) > 0.3
        mask[..., 0] = True  # every query sees at least one key
        kwargs["attn_mask"] = mask
    elif case == "float":
        kwargs["attn_mask"] = torch.randn(t, s)
    elif case == "padding+causal":
        pad = torch.zeros(2, s, dtype=torch.bool)
        pad[1, 4:] = True
        kwargs["attn_mask"] = merge_masks(None, pad, True, t, s, q.device)
    out_fast = attention(q, k, v, **kwargs)
    # The written-out path takes one merged mask (the causal flag folded in by merge_masks).
    mask = merge_masks(kwargs.get("attn_mask"), None, kwargs.get("is_causal", False), t, s, q.device)
    weights = attention_weights(q, k, mask)
    torch.testing.assert_close(out_fast, weights @ v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


@pytest.mark.parametrize("case", ["none", "causal", "causal-cached", "bool", "scale"])
def test_bf16_cpu_route_equals_fused_kernel(case):
    # bf16 on a CPU takes the written-out matmuls (faster there); it must compute what the fused
    # kernel computes, masks and scale included, and give the same gradients.
    t, s = (3, 7) if case == "causal-cached" else (6, 6)
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in _qkv(t=t, s=s))
    assert written_out_is_faster(q, k)
    kwargs = {}
    if case.startswith("causal"):
        kwargs["is_causal"] = True
    elif case == "bool":
        mask = torch.rand(2, 1, t, s, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[..., 0] = True
        kwargs["attn_mask"] = mask
    elif case == "scale":
        kwargs["scale"] = 0.2
    out = attention(q, k, v, **kwargs)
    out.float().square().sum().backward()
    grads = [x.grad for x in (q, k, v)]
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    if case == "causal-cached":  # the fused kernel aligns top-left: give it the bottom-right mask
        ref = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, attn_mask=causal_mask(t, s))
    else:
        ref = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, **kwargs)
    ref.square().sum().backward()
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)  # bf16: 8 mantissa bits
    for g, x in zip(grads, (q32, k32, v32)):
        torch.testing.assert_close(g.float(), x.grad, atol=6e-2, rtol=6e-2)


def test_route_keeps_fp32_and_long_sequences_on_the_fused_kernel():
    q, k, _ = _qkv()
    assert not written_out_is_faster(q, k)  # fp32: the fused kernel is as fast and uses less memory
    q16, k16 = q.to(torch.bfloat16), k.to(torch.bfloat16)
    assert written_out_is_faster(q16, k16)
    long_k = torch.zeros(1, 1, WRITTEN_OUT_MAX_KEYS + 1, q.shape[-1], dtype=torch.bfloat16)
    assert not written_out_is_faster(q16, long_k)  # its (T, S) softmax would be materialised


def test_explicit_is_the_formula():
    q, k, v = _qkv(t=4, s=4)
    expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
    torch.testing.assert_close(attention_weights(q, k) @ v, expected)


def test_causal_mask_with_cache_offset_matches_full():
    """Last 2 queries against all 6 keys with the shifted causal mask == rows 4, 5 of the full."""
    q, k, v = _qkv(t=6, s=6)
    full = attention(q, k, v, is_causal=True)
    tail = attention(q[:, :, 4:], k, v, is_causal=True)
    torch.testing.assert_close(tail, full[:, :, 4:], atol=1e-6, rtol=1e-6)
    assert causal_mask(2, 6).tolist() == [[True] * 5 + [False], [True] * 6]


def test_causal_blocks_the_future():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 8, 16)
    y, _ = mha(x, is_causal=True)
    x2 = x.clone()
    x2[:, 5] += 10 * torch.randn(2, 16)  # change token 5
    y2, _ = mha(x2, is_causal=True)
    torch.testing.assert_close(y2[:, :5], y[:, :5])  # outputs at <= 4 unchanged
    assert not torch.allclose(y2[:, 5:], y[:, 5:])


def test_decoder_stack_causal_blocks_the_future():
    torch.manual_seed(0)
    dec = TransformerDecoder(2, 16, 2, 32, 0.0, 20, "learned", cross_attention=False).eval()
    x = torch.randn(1, 10, 16)
    y, _ = dec(x)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(1, 3, 16)
    y2, _ = dec(x2)
    torch.testing.assert_close(y2[:, :7], y[:, :7])


@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_multihead_attention(bias):
    torch.manual_seed(0)
    d, h = 24, 4
    ref = torch.nn.MultiheadAttention(d, h, bias=bias, batch_first=True).eval()
    mine = MultiHeadAttention(d, h, bias=bias).eval()
    mine.load_torch_weights(ref)
    x = torch.randn(3, 6, d)
    ctx = torch.randn(3, 9, d)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[0, 6:] = True
    pad[2, 3:] = True
    # cross-attention with a key padding mask, and the recorded per-head weights
    expected, expected_w = ref(x, ctx, ctx, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    with recording_attention(mine):
        got, _ = mine(x, ctx, key_padding_mask=pad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.weights, expected_w, atol=1e-5, rtol=1e-5)
    # fast path, causal self-attention (torch's attn_mask is True where NOT allowed)
    expected, _ = ref(x, x, x, attn_mask=~causal_mask(6), need_weights=False)
    got, _ = mine(x, is_causal=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_kv_cache_in_mha_equals_full_pass():
    torch.manual_seed(0)
    for rotary in (0, 32):
        mha = MultiHeadAttention(16, 2, rotary_max_len=rotary).eval()
        x = torch.randn(2, 7, 16)
        full, _ = mha(x, is_causal=True)
        out, kv = mha(x[:, :4], is_causal=True)
        steps = [out]
        for t in range(4, 7):
            o, kv = mha(x[:, t : t + 1], is_causal=True, past_kv=kv)
            steps.append(o)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_sinusoidal_equals_paper_formula():
    d, length = 10, 50
    table = sinusoidal_table(length, d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    enc = SinusoidalPositionalEncoding(d, length)
    x = torch.zeros(1, 5, d)
    torch.testing.assert_close(enc(x, offset=3)[0], table[3:8])
    assert "pe" not in enc.state_dict()  # fixed, not saved


def test_rotary_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8, 64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    score = lambda i, j: (rope(q, i) * rope(k, j)).sum().item()  # noqa: E731
    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    torch.testing.assert_close(rope(q, 0), q)  # position 0 is the identity
    torch.testing.assert_close(rope(q, 5).norm(), q.norm())  # a rotation keeps the norm


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary", "none"])
def test_encoder_stack_api_and_padding(positional):
    torch.manual_seed(0)
    enc = TransformerEncoder(2, 16, 4, 32, 0.1, 20, positional=positional).eval()
    x = torch.randn(2, 6, 16)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    y = enc(x, key_padding_mask=pad)
    assert y.shape == (2, 6, 16) and torch.isfinite(y).all()
    # padding keys are ignored: changing them leaves the real positions unchanged
    x2 = x.clone()
    x2[1, 4:] = 100.0
    y2 = enc(x2, key_padding_mask=pad)
    torch.testing.assert_close(y2[1, :4], y[1, :4], atol=1e-5, rtol=1e-5)
    # and the unpadded sequence equals running it alone
    torch.testing.assert_close(enc(x[1:, :4]), y[1:, :4], atol=1e-5, rtol=1e-5)
    assert enc(x).shape == (2, 6, 16)


def test_encoder_trains():
    torch.manual_seed(0)
    enc = TransformerEncoder(1, 8, 2, 16, 0.0, 10)
    head = torch.nn.Linear(8, 1)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)
    x = torch.randn(16, 5, 8)
    y = x.sum(dim=(1, 2)).unsqueeze(1)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(head(enc(x).mean(1)), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="positional"):
        TransformerEncoder(1, 8, 2, 16, positional="fourier")
    with pytest.raises(ValueError, match="max_len"):
        TransformerEncoder(1, 8, 2, 16, max_len=4)(torch.randn(1, 5, 8))
