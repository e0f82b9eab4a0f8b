"""`duboko bench lm|diffusion` on one tiny window per recipe: the JSON keys and user errors."""

from __future__ import annotations

import json

import pytest

from duboko.bench import recipes
from duboko.cli.main import main


def test_family_recipes_lists_trainable_recipes_only():
    lm = recipes.family_recipes("lm")
    assert "shakespeare-gpt" in lm and "shakespeare-lstm" in lm and "text-lstm" not in lm
    assert "mnist-diffusion" in recipes.family_recipes("diffusion")


def test_lm_bench_counts_tokens(capsys):
    code = main(["bench", "lm", "--json", "--recipe", "shakespeare-rnn", "--windows", "2", "--window", "1",
                 "--warmup", "0", "--set", "batch_size=2", "--no-progress"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    row = r["recipes"][0]
    assert r["unit"] == "tokens" and row["recipe"] == "shakespeare-rnn" and len(row["window_rates"]) == 2
    assert row["items_per_s"] > 0 and row["steps_per_s"] > 0 and "rss_peak_mb" in row["memory"]


def test_a_recipes_thread_count_does_not_leak_into_the_next():
    import torch

    before = torch.get_num_threads()
    r = recipes.run_family("lm", recipes=["shakespeare-word-lstm", "shakespeare-gpt"], overrides=["batch_size=2"],
                           windows=1, window=1, warmup=0, progress=False)
    threads = {row["recipe"]: row["torch_threads"] for row in r["recipes"]}
    assert threads == {"shakespeare-word-lstm": 1, "shakespeare-gpt": before}  # gpt's recipe sets none
    assert torch.get_num_threads() == before and r["hardware"]["torch_threads"] == before


def test_diffusion_bench_times_both_samplers():
    r = recipes.run_family("diffusion", recipes=["mnist-diffusion"], overrides=["batch_size=2", "data.limit_train=1200"],
                           windows=1, window=1, warmup=0, samples=1, ddpm_steps=4, ddim_steps=2, progress=False)
    s = r["recipes"][0]["sampling"]
    assert s["ddpm"]["steps"] == 4 and s["ddim"]["steps"] == 2 and s["ddpm"]["images_per_s"] > 0
    assert "DDIM" in recipes.format_report(r)


@pytest.mark.parametrize("argv, words", [
    (["lm", "--recipe", "mnist-cnn"], "image-classification"),
    (["lm", "--windows", "0"], "--windows"),
    (["diffusion", "--recipe", "nope"], "nope"),
])
def test_bench_family_user_errors(capsys, argv, words):
    assert main(["bench", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
