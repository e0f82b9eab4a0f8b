"""evaluate/attention.py: attention maps of a GPT and of an encoder-decoder for one input, their
row labels, and the picture."""

from __future__ import annotations

import pytest
import torch

from duboko import registry
from duboko.errors import DubokoError
from duboko.evaluate.attention import AttentionMap, collect_attention, module_label, plot_attention

ALPHABET = "abcdefghijklmnop"


class CharTokenizer:
    kind = "char"
    pieces = ["<pad>", "<bos>", "<eos>", "<unk>", *ALPHABET]  # the seq2seq tokenizer's vocabulary

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) for c in text if c in ALPHABET]

    def token_text(self, i: int) -> str:
        return ALPHABET[i]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


class LanguageModelTask:
    name = "language-model"
    tokenizer = CharTokenizer()


class Seq2SeqTask:
    name = "seq2seq"
    tokenizer = CharTokenizer()

    def encode_source(self, text: str) -> torch.Tensor:
        return torch.tensor([[self.tokenizer.pieces.index(c) for c in text] + [2]])  # (1, S) with EOS


def test_gpt_maps_are_causal_softmax_weights_per_layer_and_head():
    torch.manual_seed(0)
    model = registry.create_model("gpt-tiny", vocab_size=len(ALPHABET), block_size=8).eval()
    heads = model.config.n_head
    maps, note = collect_attention(model, LanguageModelTask(), "abcdefghij")  # 10 tokens, block of 8
    assert note == repr("abcdefghij")
    assert len(maps) == model.config.n_layer
    for m in maps:
        assert isinstance(m, AttentionMap) and m.queries == m.keys == list("cdefghij")  # the last block
        assert m.weights.shape == (heads, 8, 8)
        assert torch.allclose(m.weights.sum(-1), torch.ones(heads, 8), atol=1e-5)  # each query's weights sum to 1
        assert torch.all(m.weights.triu(1) == 0)  # no query attends to a later key
    assert module_label(maps[0].name) == "dec L0 self"


def test_seq2seq_maps_pair_each_kind_with_its_tokens():
    torch.manual_seed(0)
    model = registry.create_model("seq2seq", vocab_size=len(CharTokenizer.pieces), d_model=16, num_heads=2,
                                  num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, max_len=8).eval()
    maps, note = collect_attention(model, Seq2SeqTask(), "abc")
    assert note.startswith("'abc' -> ")
    src = ["a", "b", "c", "<eos>"]
    kinds = {module_label(m.name): m for m in maps}
    assert set(kinds) == {"enc L0 self", "dec L0 self", "dec L0 cross"}
    tgt = kinds["dec L0 self"].queries
    assert tgt[0] == "<bos>"
    assert kinds["enc L0 self"].queries == kinds["enc L0 self"].keys == src
    assert kinds["dec L0 cross"].queries == tgt and kinds["dec L0 cross"].keys == src
    assert kinds["dec L0 cross"].weights.shape == (2, len(tgt), len(src))


def test_module_labels():
    assert module_label("encoder.layers.2.self_attn") == "enc L2 self"
    assert module_label("decoder.layers.1.cross_attn") == "dec L1 cross"
    assert module_label("decoder.layers.3.attn") == "dec L3 self"  # "attn" and "self_attn" are both self-attention


def test_a_model_without_attention_or_an_empty_prompt_is_refused():
    rnn = registry.create_model("lstm-char", vocab_size=len(ALPHABET), hidden_size=8)
    with pytest.raises(DubokoError, match="no attention layers"):
        collect_attention(rnn, LanguageModelTask(), "abc")
    gpt = registry.create_model("gpt-tiny", vocab_size=len(ALPHABET))
    with pytest.raises(DubokoError, match="encodes to no tokens"):
        collect_attention(gpt, LanguageModelTask(), "xyz")


def test_plot_draws_every_module_and_head(tmp_path):
    maps = [AttentionMap("decoder.layers.0.attn", torch.softmax(torch.randn(2, 3, 3), -1), list("abc"), list("abc")),
            AttentionMap("decoder.layers.0.cross_attn", torch.softmax(torch.randn(1, 3, 5), -1), list("abc"), list("vwxyz"))]
    out = tmp_path / "attn.png"
    plot_attention(maps, out, title="two modules")
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(DubokoError, match="no attention maps"):
        plot_attention([], tmp_path / "none.png")
