"""Latent diffusion ("ldm" task): the latent scaling factor, the VAE run folder it reads (verified
against its manifest), and a tiny end-to-end run (VAE trained inside the run, then the denoiser on
its latents) whose loss falls and whose run folder samples and draws trajectories unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from duboko import config as C
from duboko import registry
from duboko.diffusion import latent as L
from duboko.errors import DubokoError
from duboko.io import atomic_write_json, save_tensors, sha256_file

TINY = [
    "model.base_channels=8", "model.groups=4", "model.num_heads=2", "model.attention_resolutions=[4]",
    "model.cross_attention_resolutions=[7]", "model.text_dim=16", "model.text_layers=1", "model.text_heads=2",
    "data.limit_train=240", "data.val_size=40", "data.eval_samples=0", "data.grid_rows=1", "data.grid_steps=2",
    "data.eval_batch_size=20", "data.vae_epochs=1", "data.vae_batch_size=24", "data.scale_images=200",
    "train.epochs=3", "train.batch_size=16", "train.lr=0.003", "train.warmup_steps=0", "train.ema_decay=0",
    "train.num_threads=1",
]


def test_scaling_factor_makes_latents_unit_variance():
    g = torch.Generator().manual_seed(0)
    z = torch.randn((500, 4, 7, 7), generator=g) * 3.0 + 0.5
    s = L.scaling_factor(z)
    assert s == pytest.approx(1 / float(z.double().std()))
    assert float((z * s).std()) == pytest.approx(1.0, abs=1e-5)
    assert s == pytest.approx(1 / 3.0, rel=0.02)
    with pytest.raises(DubokoError, match="standard deviation"):
        L.scaling_factor(torch.ones(10, 4))


def _fake_vae_run(folder, kl_weight=0.5):
    torch.manual_seed(0)
    vae = registry.create_model("vae-mnist", base_channels=8, groups=4, kl_weight=kl_weight)
    folder.mkdir(parents=True)
    save_tensors(vae.state_dict(), folder / "model.safetensors")
    atomic_write_json(folder / "config.json", {"task": "vae", "model": {"name": "vae-mnist", **vars(vae.config)}})
    atomic_write_json(folder / "manifest.json", {"sha256": {n: sha256_file(folder / n) for n in L.VAE_FILES}})
    return vae


def test_vae_run_folder_scale_and_derived_fields(tmp_path):
    from duboko.tasks.ldm import LDMTask

    vae = _fake_vae_run(tmp_path / "vae")
    cfg = C.resolve("mnist-ldm", TINY + [f"data.vae_run={tmp_path / 'vae'}"])
    LDMTask.check(cfg)
    task = LDMTask(cfg, torch.device("cpu"))
    task.setup()
    assert cfg.model["in_channels"] == 4 and cfg.model["image_size"] == 7  # from the VAE's latents
    # The factor is 1/std of the posterior samples of the training images, measured here again.
    x, _ = task._train_images()
    mean, std = L.encode_latents(vae.eval(), x[:200].float().unsqueeze(1) / 127.5 - 1)
    assert torch.allclose(mean, L.encode_latents(task.vae, x[:200].float().unsqueeze(1) / 127.5 - 1)[0])
    z = L.posterior_sample(mean, std, torch.Generator().manual_seed(1), 0.5)
    assert task.scale == pytest.approx(1 / float(z.double().std()), rel=0.05)  # another ε draw: close, not equal
    # A training batch's x_0 = s·z has about unit variance.
    data = task._load()
    x0 = task.train_x0(data, torch.arange(64), torch.Generator().manual_seed(2))
    assert x0.shape == (64, 4, 7, 7) and 0.8 < float(x0.std()) < 1.2
    assert all(not p.requires_grad for p in task.vae.parameters())  # frozen


def test_vae_run_folder_is_verified(tmp_path):
    from duboko.tasks.ldm import LDMTask

    _fake_vae_run(tmp_path / "vae")
    with open(tmp_path / "vae" / "model.safetensors", "ab") as f:
        f.write(b"tampered")
    cfg = C.resolve("mnist-ldm", TINY + [f"data.vae_run={tmp_path / 'vae'}"])
    with pytest.raises(DubokoError, match="does not match its manifest"):
        LDMTask(cfg, torch.device("cpu")).setup()
    cfg = C.resolve("mnist-ldm", TINY + [f"data.vae_run={tmp_path / 'nope'}"])
    with pytest.raises(DubokoError, match="not a run folder"):
        LDMTask(cfg, torch.device("cpu")).setup()
    with pytest.raises(DubokoError, match="patch_size must be 1"):
        LDMTask.check(C.resolve("mnist-ldm", TINY + ["model.patch_size=2"]))


def test_tiny_ldm_run_loss_falls_and_samples_decode(tmp_path):
    from duboko.cli.main import main
    from duboko.train.engine import fit

    torch.manual_seed(0)
    run = tmp_path / "run"
    metrics = fit(C.resolve("mnist-ldm", TINY), run, quiet=True)
    rows = [line.split(",") for line in (run / "history.csv").read_text().splitlines()]
    losses = [float(r[rows[0].index("train_loss")]) for r in rows[1:]]
    # The zero-initialised output predicts ε̂ = 0 at first: a loss of about E[ε²] = 1. It must fall.
    assert losses[-1] < 0.9 * losses[0], losses
    assert metrics["val_loss"] < 1.0
    meta = json.loads((run / "vae.json").read_text())
    assert meta["scaling_factor"] > 0 and "trained in this run" in meta["source"]
    listed = json.loads((run / "manifest.json").read_text())["sha256"]
    assert "vae.safetensors" in listed and "vae.json" in listed
    # `sample` and `trajectory` work on the run folder unchanged: 28×28 decoded images.
    from duboko.train.verify import load_run_of

    loaded = load_run_of(run, ("ldm",), "cpu")
    result = loaded.task.generate(loaded.model, 3, prompts=["a handwritten three"] * 3, steps=2, keep_every=1)
    assert result.images.shape == (3, 1, 28, 28) and result.images.abs().max() <= 1
    assert all(x.shape == (3, 1, 28, 28) for _, x in result.trajectory + result.predictions)
    assert main(["sample", str(run), "--prompt", "a handwritten three", "--n", "3", "--steps", "2",
                 "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 0
    assert main(["trajectory", str(run), "--prompt", "a handwritten three", "--steps", "2", "--frames", "2",
                 "--out", str(tmp_path / "t.png"), "--device", "cpu"]) == 0
    assert (tmp_path / "s.png").is_file() and (tmp_path / "t.png").is_file()
