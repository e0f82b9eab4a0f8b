"""Diffusion commands on a tiny trained run: sample (grid, guidance, metrics), trajectory,
noising, and one-line errors for user mistakes."""

from __future__ import annotations

import json

import pytest
import torch

from duboko import config as C
from duboko.cli.main import main
from duboko.io import atomic_write_json, save_tensors

TINY = [
    "model.base_channels=8", "model.channel_mults=[1, 2]", "model.groups=4", "model.num_heads=2",
    "model.attention_resolutions=[7]", "model.cross_attention_resolutions=[7]", "model.text_dim=16",
    "model.text_layers=1", "model.text_heads=2", "data.limit_train=64", "data.val_size=16",
    "data.eval_samples=0", "data.grid_rows=0", "data.fd_reference=300", "data.eval_batch_size=10",
    "train.epochs=1", "train.batch_size=16", "train.num_threads=1",
]


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    from duboko.train.engine import fit

    out = tmp_path_factory.mktemp("t2i") / "run"
    torch.manual_seed(0)
    fit(C.resolve("mnist-text2img", TINY), out, quiet=True)
    return out


@pytest.fixture()
def random_scorer(tmp_path, monkeypatch):
    """An untrained scorer, to exercise the metrics path (its numbers mean nothing)."""
    from duboko import registry

    torch.manual_seed(0)
    model = registry.create_model("mnist-scorer")
    save_tensors(model.state_dict(), tmp_path / "model.safetensors")
    atomic_write_json(tmp_path / "config.json", {"model": {"name": "mnist-scorer", **vars(model.config)}})
    monkeypatch.setenv("DUBOKO_SCORER_DIR", str(tmp_path))


def test_sample_prompt_grid(t2i_run, tmp_path, capsys):
    out = tmp_path / "threes.png"
    rc = main(["sample", str(t2i_run), "--prompt", "a handwritten three", "--n", "4", "--steps", "3",
               "--guidance", "4.0", "--out", str(out), "--device", "cpu"])
    assert rc == 0 and out.stat().st_size > 100
    assert "4 image(s)" in capsys.readouterr().out


def test_sample_metrics_json(t2i_run, tmp_path, capsys, random_scorer):
    rc = main(["sample", str(t2i_run), "--metrics", "--n", "20", "--steps", "2", "--json",
               "--out", str(tmp_path / "g.png"), "--device", "cpu"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    for key in ("prompt_accuracy", "fd_mnist", "fd_mnist_real", "fd_mnist_noise", "sample_seconds"):
        assert key in m
    assert 0.0 <= m["prompt_accuracy"] <= 1.0 and m["fd_mnist_real"] >= 0.0
    assert m["prompt_phrasings"] == "held-out" and sum(m["sample_class_counts"]) == 20


def test_sample_metrics_seeds_give_each_seed_and_the_minimum(t2i_run, tmp_path, capsys, random_scorer):
    rc = main(["sample", str(t2i_run), "--metrics", "--n", "20", "--steps", "2", "--json", "--seeds", "0,1,2",
               "--out", str(tmp_path / "g.png"), "--device", "cpu"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert sorted(m["seeds"]) == ["0", "1", "2"]
    accs = [m["seeds"][s]["prompt_accuracy"] for s in ("0", "1", "2")]
    assert m["prompt_accuracy_min"] == min(accs)
    for s in ("0", "1", "2"):
        one = m["seeds"][s]
        assert one["sample_seed"] == int(s) and one["sample_count"] == 20
        assert one["prompt_accuracy_low"] <= one["prompt_accuracy"] <= one["prompt_accuracy_high"]
        assert len(one["prompt_accuracy_per_digit"]) == 10
    # The text form: one block per seed and the minimum.
    assert main(["sample", str(t2i_run), "--metrics", "--n", "20", "--steps", "2", "--seeds", "0,1",
                 "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "-- seed 0" in out and "-- seed 1" in out and "minimum" in out and "Wilson interval" in out


def test_sample_in_batches_matches_one_batch_for_the_first(t2i_run, tmp_path):
    """`sample --n` runs in batches (bounded memory); batch k uses seed + k·batch, so the first
    batch's images are the same as an unbatched call with the same seed."""
    from duboko.train.verify import load_run_of

    loaded = load_run_of(t2i_run, ("diffusion",), "cpu")
    task, model = loaded.task, loaded.model
    kw = dict(labels=[1, 2, 3, 4, 5], steps=2, seed=3)
    whole = task.generate(model, 5, **kw).images
    batched = task.generate_batched(model, 5, batch_size=3, **kw)
    assert batched.shape == (5, 1, 28, 28)
    assert torch.allclose(batched[:3], task.generate(model, 3, labels=[1, 2, 3], steps=2, seed=3).images, atol=1e-6)
    assert torch.allclose(batched[3:], task.generate(model, 2, labels=[4, 5], steps=2, seed=6).images, atol=1e-6)
    assert torch.allclose(task.generate_batched(model, 5, batch_size=5, **kw), whole, atol=1e-6)
    assert main(["sample", str(t2i_run), "--n", "7", "--batch-size", "3", "--steps", "2",
                 "--out", str(tmp_path / "b.png"), "--device", "cpu"]) == 0


def test_trajectory_and_noising(t2i_run, tmp_path):
    assert main(["trajectory", str(t2i_run), "--prompt", "7", "--steps", "4", "--frames", "3",
                 "--out", str(tmp_path / "traj.png"), "--device", "cpu"]) == 0
    assert (tmp_path / "traj.png").stat().st_size > 100
    assert main(["noising", "--out", str(tmp_path / "fwd.png"), "--timesteps", "0,500,1000"]) == 0
    assert (tmp_path / "fwd.png").stat().st_size > 100


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "a handwritten #"], "character '#'"),
        (["--prompt", "a very long prompt that keeps going well beyond the limit of the model"], "characters long"),
        (["--label", "3"], "use --prompt"),
        (["--sampler", "euler"], None),  # argparse refuses it (exit 2)
        (["--metrics", "--seeds", "0,x"], "--seeds expects comma-separated integers"),
        (["--metrics", "--seeds", "1,1"], "distinct"),
        (["--seeds", "0,1"], "--seeds is for --metrics"),
        (["--batch-size", "-1"], "--batch-size must be in"),
    ],
)
def test_sample_user_errors_are_one_line(t2i_run, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) if message is None else _no_raise():
        rc = main(["sample", str(t2i_run), "--out", str(tmp_path / "x.png"), *argv])
        assert rc == 2
    err = capsys.readouterr().err
    if message:
        assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_noising_bad_timesteps(capsys):
    assert main(["noising", "--timesteps", "0,2000"]) == 2
    assert "timesteps must be in 0..1000, got 2000" in capsys.readouterr().err


def test_sample_needs_a_diffusion_run(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
