"""`duboko bench sample`: DDIM grid seconds and images/s, on tiny settings (2 images, 2 steps)."""

from __future__ import annotations

import json

import pytest
import torch

from duboko.bench import sample
from duboko.cli.main import main


def test_bench_sample_records_unconditional_and_guided(capsys):
    assert main(["bench", "sample", "--json", "--images", "2", "--steps", "2", "--repeats", "1", "--threads", "1",
                 "--precision", "auto"]) == 0
    r = json.loads(capsys.readouterr().out)
    rows = {row["recipe"]: row for row in r["models"]}
    assert set(rows) == {"mnist-diffusion", "mnist-diffusion-class"} and r["unit"] == "images"
    assert rows["mnist-diffusion"]["conditioning"] == "none" and rows["mnist-diffusion"]["guidance"] == 1.0
    assert rows["mnist-diffusion-class"]["conditioning"] == "class" and rows["mnist-diffusion-class"]["guidance"] > 1
    for row in rows.values():
        assert row["images"] == 2 and row["steps"] == 2 and row["sampler"] == "ddim"
        assert row["images_per_s"] == pytest.approx(2 / row["grid_seconds"], rel=0.02)
        assert row["precision"] in ("fp32", "bf16") and row["torch_threads"] == 1 and "untrained" in row["weights"]
    # auto: bf16 exactly where the CPU computes it natively
    want = "bf16" if r["hardware"]["cpu_bf16_native"] else "fp32"
    assert {row["precision"] for row in rows.values()} == {want}


def test_sampling_under_bf16_autocast_stays_close_to_fp32():
    """The bf16 path the bench times samples the same images as fp32 up to bf16 rounding
    (same seed, same untrained UNet, 3 DDIM steps)."""
    from duboko.precision import autocast

    task, model, _, weights = sample._task_and_model("mnist-diffusion", None, [], "cpu")
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # the UNet's last layer starts at zero (ε̂ = 0): give every weight a value
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cpu = torch.device("cpu")
    images = {}
    for prec in ("fp32", "bf16"):
        with torch.no_grad(), autocast(cpu, prec):
            images[prec] = task.generate(model, 2, sampler="ddim", steps=3, seed=0).images.float()
    diff = (images["fp32"] - images["bf16"]).abs()
    assert images["fp32"].shape == (2, 1, 28, 28) and "untrained" in weights
    assert diff.mean() < 0.05 and not torch.equal(images["fp32"], images["bf16"])


def test_bench_sample_table(capsys):
    assert main(["bench", "sample", "--recipe", "mnist-diffusion", "--images", "1", "--steps", "1", "--repeats", "1",
                 "--precision", "fp32", "--channels-last"]) == 0
    out = capsys.readouterr().out
    assert "DDIM-1, batch 1" in out and "1-image grid s" in out and "native bf16" in out


@pytest.mark.parametrize("argv, words", [
    (["--recipe", "shakespeare-gpt"], "diffusion"),
    (["--images", "0"], "--images"),
    (["--precision", "fp8"], "precision"),
])
def test_bench_sample_user_errors(capsys, argv, words):
    assert main(["bench", "sample", "--steps", "1", "--images", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_bench_sample_times_the_code_path_of_duboko_sample(tmp_path):
    """The bench's model and condition are `duboko sample`'s: the model as `load_run` builds it
    (eval, default memory format although the recipe trains channels-last), the digits 0-9 in
    turn (cli/diffusion.py's `_conditions` without --label/--prompt), the recipe's guidance, and
    fp32 by default as the CLI samples."""
    from duboko.cli.diffusion import _conditions

    task, model, _, _ = sample._task_and_model("mnist-diffusion-class", None, [], "cpu")
    assert not model.training and task.config.train.channels_last
    assert all(p.is_contiguous() for p in model.parameters())  # not channels-last
    assert sample.user_conditions(task, 12) == _conditions(task, None, None, 12)
    assert sample.user_conditions(task, 12)["labels"][:11] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    task.conditioning = "none"  # an unconditional run: no condition (cli: neither --label nor --prompt)
    assert sample.user_conditions(task, 4) == {} == _conditions(task, None, None, 4)
    r = sample.run_sample(recipes=["mnist-diffusion-class"], images=2, steps=1, repeats=1, threads=1, device="cpu")
    row = r["models"][0]
    assert row["precision"] == "fp32" and row["guidance"] == task.config.data.guidance and row["conditioning"] == "class"
    assert "generate_batched" in row["code_path"] and "omp_wait_policy" in r["hardware"]
