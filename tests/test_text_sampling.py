"""Sampling: temperature / top-k / top-p / repetition penalty, seeds, stop strings, cache equivalence."""

import pytest
import torch
from torch import nn

from duboko.nn.sampling import TextStreamer, apply_repetition_penalty, cut_at_stop, filter_logits, generate, sample_next
from duboko.registry import create_model


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = filter_logits(logits, top_k=2)
    assert torch.isfinite(kept).tolist() == [True, True, False, False, False]
    # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the 0.15 token is still needed; 0.1 and 0.05 are cut.
    kept = filter_logits(logits, top_p=0.8)
    assert torch.isfinite(kept).tolist() == [True, True, True, False, False]
    kept = filter_logits(logits, top_p=0.01)  # the top token always stays
    assert torch.isfinite(kept).tolist() == [True, False, False, False, False]
    # Temperature rescales the log-probabilities.
    p = torch.softmax(filter_logits(logits, temperature=0.5), -1)
    expected = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    torch.testing.assert_close(p, expected / expected.sum())


def test_repetition_penalty_matches_ctrl_rule():
    logits = torch.tensor([2.0, -1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -2.0, 0.5]))


def test_greedy_and_sampling_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    assert sample_next(logits, temperature=0) == 0
    g = torch.Generator().manual_seed(0)
    draws = [sample_next(logits, generator=g) for _ in range(3000)]
    freq = [draws.count(i) / 3000 for i in range(3)]
    assert abs(freq[0] - 0.7) < 0.04 and abs(freq[2] - 0.1) < 0.03


class CountingLM(nn.Module):
    """A tiny stateless LM that also counts how many tokens it was fed (to see the cache work)."""

    def __init__(self, vocab=7, block_size=None):
        super().__init__()
        self.config = type("C", (), {"vocab_size": vocab, "block_size": block_size})()
        self.emb = nn.Embedding(vocab, vocab)
        self.fed = 0

    def forward(self, idx, state=None):
        self.fed += idx.numel()
        # Logits depend on the last token and on the position count carried in the state.
        pos = (0 if state is None else state) + idx.shape[1]
        return self.emb(idx) + 0.01 * pos, pos


@pytest.mark.parametrize("name", ["lstm-char", "gru-char", "rnn-char"])
def test_generation_is_reproducible_and_cache_matches_full_context(name):
    torch.manual_seed(0)
    model = create_model(name, vocab_size=20, hidden_size=32)
    prompt = [1, 2, 3]
    a = generate(model, prompt, 30, temperature=1.0, top_k=10, seed=7)
    b = generate(model, prompt, 30, temperature=1.0, top_k=10, seed=7)
    c = generate(model, prompt, 30, temperature=1.0, top_k=10, seed=8)
    assert a == b and len(a) == 30 and a != c
    nocache = generate(model, prompt, 30, temperature=1.0, top_k=10, seed=7, use_cache=False)
    assert nocache == a
    assert model.training  # the previous mode is restored


def test_block_size_crop_and_cache_fallback():
    torch.manual_seed(0)
    model = CountingLM(block_size=4)
    # With a block size, no call ever sees more than 4 positions; cache vs no cache agree.
    out_cache = generate(model, [1, 2], 10, temperature=0)
    model.fed = 0
    out_full = generate(model, [1, 2], 10, temperature=0, use_cache=False)
    assert out_cache == out_full
    assert model.fed <= 4 * 10


def test_stop_strings_and_stop_ids_and_streaming():
    model = CountingLM(vocab=5)
    with torch.no_grad():
        model.emb.weight.zero_()
        model.emb.weight[:, 3] = 10.0  # always predicts token 3
    decode = lambda ids: "".join("abcd\n"[i] for i in ids)
    out = generate(model, [0], 50, temperature=0, stop=["dd"], decode=decode)
    assert decode(out) == "dd"
    out = generate(model, [0], 50, temperature=0, stop_ids=[3])
    assert out == [3]
    written = []
    streamer = TextStreamer(decode, written.append, stop=["ddd"])
    generate(model, [0], 10, temperature=0, stop=["ddd"], decode=decode, on_token=streamer)
    assert "".join(written) == "" == streamer.text()  # nothing before the stop string
    written.clear()
    streamer = TextStreamer(decode, written.append, stop=["ddx"])
    generate(model, [0], 4, temperature=0, on_token=streamer)
    assert "".join(written) == "dd"  # "dd" might still become "ddx": held back ...
    streamer.flush()
    assert "".join(written) == "dddd" == streamer.text()  # ... until generation ends
    assert cut_at_stop("hello\n\nworld", ["\n\n"]) == "hello"


def test_streamer_holds_back_partial_utf8():
    pieces = {0: b"h", 1: "é".encode()[:1], 2: "é".encode()[1:]}
    decode = lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")
    written = []
    s = TextStreamer(decode, written.append)
    for i in (0, 1, 2):
        s(i)
    assert written == ["h", "é"]


def _bpe():
    from duboko.data.text import train_tokenizer

    text = "héllo wörld, naïve café — ünïcödé 東京 tokyo 😀 emoji. " * 20
    return train_tokenizer("bpe", text, vocab_size=300)


def test_incremental_decoder_equals_full_decode_and_decodes_only_the_tail():
    """Random id sequences of the byte-level BPE (multi-byte characters split across tokens) and
    the char tokenizer: the incremental text equals decoding everything, and each push decodes
    only the ids since the last complete character."""
    from duboko.data.text import train_tokenizer
    from duboko.nn.sampling import IncrementalDecoder

    g = torch.Generator().manual_seed(0)
    for tok in (_bpe(), train_tokenizer("char", "abc\né😀 xyz")):
        calls = []

        def decode(ids, tok=tok):
            calls.append(len(ids))
            return tok.decode(ids)

        for _ in range(5):
            ids = torch.randint(0, tok.vocab_size, (200,), generator=g).tolist()
            d = IncrementalDecoder(decode)
            for i, t in enumerate(ids):
                assert d.push(t) == tok.decode(ids[: i + 1])
        assert max(calls) < 20  # never the whole 200 ids


def test_streaming_a_long_generation_does_not_re_decode_everything():
    """TextStreamer and generate's stop check decode a bounded tail per token: the total number
    of ids decoded grows linearly with the length, not quadratically; the text is the same."""
    model = CountingLM(vocab=5)
    decoded = []

    def decode(ids):
        decoded.append(len(ids))
        return "".join("abcd\n"[i] for i in ids)

    written = []
    streamer = TextStreamer(decode, written.append, stop=["xyz"])
    out = generate(model, [0], 600, temperature=1.0, seed=1, stop=["xyz"], decode=decode, on_token=streamer)
    streamer.flush()
    assert len(out) == 600 and "".join(written) == "".join("abcd\n"[i] for i in out)
    assert max(decoded) <= 2 and sum(decoded) <= 2 * 2 * 600  # O(1) ids per token (was up to 600)


def test_streamer_with_bpe_and_stop_string_matches_full_decode():
    tok = _bpe()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tok.vocab_size, (300,), generator=g).tolist()
    full = tok.decode(ids)
    stop = full[150:153]
    written = []
    s = TextStreamer(tok.decode, written.append, stop=[stop])
    for t in ids:
        s(t)
    s.flush()
    assert "".join(written) == cut_at_stop(full, [stop]) == s.text()


# ---------------------------------------------------------------------------------------------
# The GPT's fused one-token step (preallocated key/value buffer written in place) against the
# module path: the same tokens for greedy and seeded sampling, and the same logits per state.


def _gpt(positional="learned", block_size=12):
    from duboko.models.transformer import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=23, block_size=block_size, n_layer=2, n_head=2, n_embd=16, positional=positional))
    with torch.no_grad():  # larger weights than the 0.02 init: peaked logits that depend on the context
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "none"])
@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=1.0, seed=3),
                                     dict(temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.3, seed=5)])
def test_gpt_fused_decode_gives_the_module_paths_tokens(positional, options, monkeypatch):
    """25 tokens after a 4-token prompt with block_size 12: the fused step runs for positions 4-11,
    then the window is full and every further token re-encodes the last 12 (general path)."""
    from duboko.models.transformer import GPT

    model = _gpt(positional)
    steps = []
    fused_step = GPT._decode_one
    monkeypatch.setattr(GPT, "_decode_one", lambda self, idx, state: steps.append(1) or fused_step(self, idx, state))
    fast = generate(model, [1, 2, 3, 4], 25, **options)
    assert len(steps) == 8  # the fused step did run, for the positions within the window
    monkeypatch.setattr(GPT, "_fast_decode_ok", lambda self: False)  # the blocks' own forward
    slow = generate(model, [1, 2, 3, 4], 25, **options)
    full = generate(model, [1, 2, 3, 4], 25, use_cache=False, **options)
    assert fast == slow == full and len(fast) == 25
    assert len(set(fast)) > 1


def test_fused_decode_writes_in_place_and_branches_copy():
    """A state's next position is written into its buffer in place (no concatenation); a second
    continuation of the same state gets its own copy and leaves the first branch intact."""
    model = _gpt().eval()
    seq = torch.tensor([[5, 1, 7, 2, 9, 4, 11]])

    def reference(ids):  # no cache: the whole sequence through the blocks
        return model(ids)[0][:, -1]

    with torch.no_grad():
        _, s4 = model(seq[:, :4])  # general path (prefill)
        _, s5 = model(seq[:, 4:5], s4)  # fused: a buffer copied from the prefill
        la, sa = model(seq[:, 5:6], s5)  # branch A, in place
        lb, sb = model(torch.tensor([[3]]), s5)  # branch B from the same state: a copy
        la2, sa2 = model(seq[:, 6:7], sa)  # A goes on in place
        torch.testing.assert_close(la[:, -1], reference(seq[:, :6]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lb[:, -1], reference(torch.cat((seq[:, :5], torch.tensor([[3]])), 1)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(la2[:, -1], reference(seq), atol=1e-5, rtol=1e-5)
    k5, ka, kb, ka2 = (s.layers[0][0] for s in (s5, sa, sb, sa2))
    assert ka.data_ptr() == k5.data_ptr() == ka2.data_ptr() and sa.buffer is s5.buffer is sa2.buffer
    assert kb.data_ptr() != k5.data_ptr() and sb.buffer is not s5.buffer
    assert sa2.offset == 7 and torch.equal(sa2.tokens, seq) and torch.equal(sb.tokens[:, -1], torch.tensor([3]))
    assert ka2.shape == (1, 2, 7, 8) and sa2.buffer.kv.shape == (2, 2, 1, 2, 12, 8)


def test_fused_decode_state_from_inference_mode_and_under_autograd():
    """A state made under inference_mode (as `generate` does) goes on under no_grad (its buffer is
    copied: inference tensors cannot be written outside inference mode); with autograd on, the
    general path runs (the stacked weights are copies without gradients)."""
    model = _gpt().eval()
    seq = torch.tensor([[5, 1, 7, 2, 9, 4]])
    with torch.inference_mode():
        _, s = model(seq[:, :4])
        _, s = model(seq[:, 4:5], s)
    with torch.no_grad():
        logits, s2 = model(seq[:, 5:6], s)
        assert model._fast_decode_ok() and s2.buffer is not s.buffer
        torch.testing.assert_close(logits[:, -1], model(seq)[0][:, -1], atol=1e-5, rtol=1e-5)
    assert not model._fast_decode_ok()  # grad enabled here
    logits, s3 = model(seq[:, 5:6], s2)
    assert s3.buffer is None and logits.requires_grad


def test_draw_one_is_torch_multinomial_draw_and_leaves_the_same_generator_state():
    from duboko.nn.sampling import draw_one

    for vocab in (2, 7, 71, 256, 1000):
        logits = torch.randn(vocab, generator=torch.Generator().manual_seed(vocab)) * 3
        logits[: vocab // 3] = float("-inf")  # filtered entries (top-k / top-p) have probability 0
        probs = torch.softmax(logits, -1)
        ours, theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        for _ in range(200):
            i = draw_one(probs, ours)
            assert i == int(torch.multinomial(probs, 1, generator=theirs))
            assert probs[i] > 0
        assert torch.equal(ours.get_state(), theirs.get_state())  # the random stream goes on unchanged
    with pytest.raises(RuntimeError, match="nan"):
        draw_one(torch.full((5,), float("nan")), torch.Generator().manual_seed(0))
