"""Seq2seq: the numbers data set, the piece tokenizer, TSV pairs, beam search, and a tiny
end-to-end run through the engine and the `translate` / `attention` commands."""

from __future__ import annotations

import json

import pytest
import torch

from duboko import config as C
from duboko import registry
from duboko.data import numbers as N
from duboko.errors import DubokoError


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (40, "forty"),
        (99, "ninety-nine"),
        (100, "one hundred"),
        (101, "one hundred one"),
        (4821, "four thousand eight hundred twenty-one"),
        (907305, "nine hundred seven thousand three hundred five"),
        (1_000_000, "one million"),
        (2_000_017, "two million seventeen"),
    ],
)
def test_number_to_words(n, words):
    assert N.number_to_words(n) == words
    assert N.words_to_number(words) == n


def test_words_round_trip():
    g = torch.Generator().manual_seed(0)
    for n in torch.randint(0, 10**12, (500,), generator=g).tolist() + list(range(0, 2000)):
        assert N.words_to_number(N.number_to_words(n)) == n


def test_splits_are_reproducible_and_held_out():
    a = N.NumberSplits(999_999, 200, 300, seed=5)
    b = N.NumberSplits(999_999, 200, 300, seed=5)
    assert a.val == b.val and a.test == b.test
    assert len(set(a.val) | set(a.test)) == 500 and min(a.test) >= 100
    train = set(a.train_numbers(20_000, epoch=0)) | set(a.train_numbers(20_000, epoch=1))
    assert not train & set(a.test) and not train & set(a.val)
    assert a.train_numbers(50, 0) == b.train_numbers(50, 0) != a.train_numbers(50, 1)
    lengths = {len(str(n)) for n in a.train_numbers(2000, 0)}
    assert lengths == {1, 2, 3, 4, 5, 6}  # every magnitude is trained on


def test_piece_tokenizer_round_trip(tmp_path):
    texts = ["4821", "four thousand eight hundred twenty-one", "Hello, world!"]
    tok = N.PieceTokenizer.train(texts)
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    assert N.PieceTokenizer.split("907305") == list("907305")
    assert tok.unknown("zebra 5") == [" ", "5", "zebra"]
    tok.save(tmp_path / "t.json")
    again = N.PieceTokenizer.load(tmp_path / "t.json")
    assert again.pieces == tok.pieces
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(DubokoError):
        N.PieceTokenizer.load(tmp_path / "bad.json")


def test_tsv_pairs(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("# comment\n" + "".join(f"src {i}\ttgt {i}\n" for i in range(40)), encoding="utf-8")
    pairs = N.read_tsv_pairs(path)
    assert len(pairs) == 40 and pairs[3] == ("src 3", "tgt 3")
    train, val, test = N.split_pairs(pairs, 0.1, 0.1, seed=0)
    assert len(val) == 4 and len(test) == 4 and len(train) == 32
    assert not {s for s, _ in train} & {s for s, _ in test}
    (tmp_path / "bad.tsv").write_text("no tab here\n" * 20)
    with pytest.raises(DubokoError, match="source<TAB>target"):
        N.read_tsv_pairs(tmp_path / "bad.tsv")
    with pytest.raises(DubokoError, match="does not exist"):
        N.read_tsv_pairs(tmp_path / "missing.tsv")


def test_collate_teacher_forcing_layout():
    src, tgt_in, tgt_out = N.collate([([5, 6, 2], [7, 8, 2]), ([5, 2], [9, 2])], pad_id=0, bos_id=1)
    assert src.tolist() == [[5, 6, 2], [5, 2, 0]]
    assert tgt_in.tolist() == [[1, 7, 8], [1, 9, 0]]
    assert tgt_out.tolist() == [[7, 8, 2], [9, 2, 0]]


def _tiny_model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=12, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
               dim_feedforward=32, dropout=0.0, max_len=12)
    return registry.create_model("seq2seq", **{**cfg, **kw}).eval()


def test_beam_one_equals_greedy_and_beam_is_at_least_as_likely():
    model = _tiny_model()
    src = torch.randint(3, 12, (6, 5))
    greedy = model.greedy_decode(src)
    assert model.beam_search(src, beam_size=1) == greedy

    def logp(i, out):
        tgt = torch.tensor([[1] + out])
        target = torch.tensor([out + [2]])
        with torch.no_grad():
            lp = torch.log_softmax(model(src[i : i + 1], tgt), -1)
        return lp.gather(-1, target[..., None]).sum().item()

    for i in range(6):
        beam = model.beam_search(src[i : i + 1], beam_size=4)[0]
        if len(beam) < 11 and len(greedy[i]) < 11:  # both finished with EOS
            assert logp(i, beam) >= logp(i, greedy[i]) - 1e-4


def test_cached_greedy_equals_uncached_decoding():
    model = _tiny_model()
    src = torch.randint(3, 12, (3, 6))
    memory, pad = model.encode(src)
    seq = torch.full((3, 1), 1)
    for _ in range(8):  # re-run the whole prefix every step, no cache
        logits, _ = model.decode(seq, memory, pad)
        seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), 1)
    cached = model.greedy_decode(src, 8)
    for row, out in zip(seq[:, 1:].tolist(), cached):
        stop = row.index(2) if 2 in row else len(row)
        assert out == row[:stop]


def test_padding_in_the_source_does_not_change_the_output():
    model = _tiny_model()
    src = torch.tensor([[5, 6, 7, 2]])
    padded = torch.tensor([[5, 6, 7, 2, 0, 0]])
    tgt = torch.tensor([[1, 4, 9]])
    torch.testing.assert_close(model(src, tgt), model(padded, tgt), atol=1e-5, rtol=1e-5)


def test_end_to_end_train_translate_attention(tmp_path, capsys):
    """A small run through the engine (seconds) that really learns to spell numbers, then the CLI
    commands on its folder."""
    from duboko.cli.main import main
    from duboko.train.engine import fit

    cfg = C.resolve(
        "numbers-seq2seq",
        ["train_size=1024", "val_size=20", "test_size=20", "epochs=20", "eval_every=20", "batch_size=64",
         "lr=3e-3", "warmup_steps=20", "d_model=64", "dim_feedforward=128", "num_heads=4",
         "num_encoder_layers=1", "num_decoder_layers=1", "max_number=9999", "eval_beam=2"],
    )
    run = tmp_path / "s2s"
    metrics = fit(cfg, run, quiet=True)
    # 320 steps on fresh numbers below 10,000. Measured with seeds 0, 1, 2: exact match 0.90-1.00
    # (greedy) and 0.95-1.00 (beam 2), token accuracy >= 0.985, test loss 0.043-0.045. An untrained
    # model gets exact match 0 and loss ~5.5; after 1 epoch of 4 steps it is still there.
    assert metrics["exact_match"] >= 0.6 and metrics["exact_match_beam"] >= 0.6
    assert metrics["token_accuracy"] >= 0.9
    assert metrics["test_loss"] < 0.3
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["exact_match"] == metrics["exact_match"]
    lines = (run / "test_predictions.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["source", "reference", "prediction", "correct"] and len(lines) == 21
    rows = [line.split("\t") for line in lines[1:]]
    assert all(ref == N.number_to_words(int(src)) for src, ref, _, _ in rows)  # the references are right
    correct = [int(ok) for _, ref, pred, ok in rows]
    assert correct == [int(pred == ref) for _, ref, pred, _ in rows]
    assert sum(correct) / len(rows) == pytest.approx(metrics["exact_match"])
    capsys.readouterr()
    assert main(["translate", str(run), "4821", "--beam", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"source": "4821", "output": "four thousand eight hundred twenty-one"}
    assert main(["translate", str(run), "4821"]) == 0  # greedy, plain text: the output alone
    assert capsys.readouterr().out == "four thousand eight hundred twenty-one\n"
    assert main(["translate", str(run), "48x"]) == 2  # unknown character: one-line error
    assert "vocabulary" in capsys.readouterr().err
    assert main(["attention", str(run), "--prompt", "4821", "--out", str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'a.png'}")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_data_config_is_a_user_error(tmp_path):
    from duboko.train.engine import fit

    with pytest.raises(DubokoError, match="direction"):
        fit(C.resolve("numbers-seq2seq", ["direction=sideways", "train_size=64"]), tmp_path / "r", quiet=True)
    with pytest.raises(DubokoError, match="does not exist"):
        fit(C.resolve("numbers-seq2seq", ["source=/nonexistent.tsv"]), tmp_path / "r2", quiet=True)


def test_directions():
    assert N.number_pairs([4821], "to_words") == [("4821", "four thousand eight hundred twenty-one")]
    assert N.number_pairs([12], "to_digits") == [("twelve", "12")]
    assert N.number_pairs([12], "both") == [("12", "twelve"), ("twelve", "12")]
    with pytest.raises(DubokoError, match="direction"):
        N.number_pairs([1], "sideways")


def test_tsv_run_and_translate_without_the_tsv(tmp_path, capsys):
    """Train on a user's TSV (word swapping: "cat dog" -> "dog cat"), then translate after the TSV
    is gone (the run folder's tokenizer is enough)."""
    from duboko.cli.main import main
    from duboko.train.engine import fit

    words = ["cat", "dog", "bird", "fish", "cow", "pig", "hen", "fox"]
    lines = [f"{a} {b}\t{b} {a}\n" for a in words for b in words]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(lines), encoding="utf-8")
    cfg = C.resolve("numbers-seq2seq", [
        f"source={tsv}", "epochs=30", "eval_every=30", "batch_size=16", "lr=5e-3", "warmup_steps=5",
        "d_model=32", "dim_feedforward=64", "num_heads=2", "num_encoder_layers=1", "num_decoder_layers=1",
        "val_fraction=0.1", "test_fraction=0.1",
    ])
    run = tmp_path / "tsv-run"
    metrics = fit(cfg, run, quiet=True)
    # 6 held-out pairs. Measured with seeds 0, 1, 2: exact match 1.0 and all 64 pairs swapped
    # right by `translate` (an untrained model swaps none).
    assert metrics["test_examples"] == 6
    assert metrics["exact_match"] >= 4 / 6 and metrics["token_accuracy"] >= 0.8
    tsv.unlink()
    capsys.readouterr()
    assert main(["translate", str(run), "cat dog"]) == 0
    assert capsys.readouterr().out == "dog cat\n"
    assert main(["translate", str(run), "fox hen", "bird cow"]) == 0  # several: source<TAB>output
    assert capsys.readouterr().out == "fox hen\then fox\nbird cow\tcow bird\n"
