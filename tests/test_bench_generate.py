"""`duboko bench generate`: batch-1 generation speed of the GPT and the LSTM, on tiny settings."""

from __future__ import annotations

import json

import pytest
import torch

from duboko.bench import generate
from duboko.cli.main import main

TINY = ["--prompt-tokens", "4", "--new-tokens", "6", "--repeats", "1",
        "--no-cache-tokens", "4"]


def test_bench_generate_records_both_families(capsys):
    before = torch.get_num_threads()
    assert main(["bench", "generate", "--json", *TINY]) == 0
    r = json.loads(capsys.readouterr().out)
    rows = {row["recipe"]: row for row in r["models"]}
    assert set(rows) == {"shakespeare-gpt", "shakespeare-lstm"} and r["unit"] == "tokens"
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["first_token_ms"] > 0 and row["no_cache_tokens_per_s"] > 0
        assert row["precision"] == "fp32" and row["torch_threads"] == 1 and "untrained" in row["weights"]
        assert isinstance(row["meets_target"], bool) and row["prompt_tokens"] == 4
    assert rows["shakespeare-gpt"]["model"] == "GPT" and rows["shakespeare-gpt"]["block_size"] == 128
    assert "cpu_bf16_native" in r["hardware"] and "cpu_capability" in r["hardware"]
    assert torch.get_num_threads() == before  # --threads 1 and the LSTM recipe's 2 do not leak


def test_bench_generate_table_and_a_trained_run(tmp_path, capsys):
    run = tmp_path / "gpt"
    assert main(["train", "shakespeare-gpt", "--out", str(run), "--set", "max_steps=1", "--set", "model.n_layer=1",
                 "--set", "batch_size=2", "--set", "train.report=false"]) == 0
    capsys.readouterr()
    assert main(["bench", "generate", "--run", str(run), "--prompt-tokens", "3", "--new-tokens", "4", "--repeats", "1",
                 "--no-cache-tokens", "0", "--out", str(tmp_path / "g.json")]) == 0
    text = capsys.readouterr().out
    assert "first token ms" in text and "native bf16" in text and "trained" in text
    rec = json.loads((tmp_path / "g.json").read_text())
    assert rec["models"][0]["weights"].startswith("trained") and "no_cache_tokens_per_s" not in rec["models"][0]


def test_timed_generate_counts_first_token_apart():
    from duboko.models.transformer import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8)).eval()
    r = generate._timed_generate(model, [1, 2, 3], 5, use_cache=True, device=torch.device("cpu"), precision="fp32", seed=0)
    assert r["tokens"] == 5 and 0 < r["first_token_s"] <= r["seconds"] and r["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("argv, words", [
    (["--recipe", "mnist-cnn"], "language-model"),
    (["--new-tokens", "0"], "--new-tokens"),
    (["--repeats", "0"], "--repeats"),
    (["--device", "cuda:7"], "cuda"),
])
def test_bench_generate_user_errors(capsys, argv, words):
    if words == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda:7 may exist")
    assert main(["bench", "generate", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
