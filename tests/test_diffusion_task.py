"""Diffusion task end to end on a tiny slice of MNIST: the denoising loss falls; captions,
prompt tokenizer errors, sampling from a run folder, Fréchet distance."""

from __future__ import annotations

import json

import pytest
import torch

from duboko import config as C
from duboko.data import captions
from duboko.errors import DubokoError
from duboko.evaluate import fid

TINY_MODEL = [
    "model.base_channels=8", "model.channel_mults=[1, 2]", "model.groups=4", "model.num_heads=2",
    "model.attention_resolutions=[7]", "model.text_dim=16", "model.text_layers=1", "model.text_heads=2",
]
TINY_DATA = ["data.limit_train=200", "data.val_size=40", "data.eval_samples=0", "data.grid_rows=1",
             "data.grid_steps=2", "data.eval_batch_size=20"]
TINY_TRAIN = ["train.epochs=3", "train.batch_size=16", "train.lr=0.003", "train.warmup_steps=0",
              "train.ema_decay=0", "train.num_threads=1"]


def _tiny(recipe, extra=()):
    cross = ["model.cross_attention_resolutions=[7]"] if recipe == "mnist-text2img" else []
    return C.resolve(recipe, TINY_MODEL + cross + TINY_DATA + TINY_TRAIN + list(extra))


@pytest.mark.parametrize("recipe", ["mnist-text2img", "mnist-diffusion-class", "mnist-diffusion"])
def test_tiny_run_denoising_loss_falls(tmp_path, recipe):
    from duboko.train.engine import fit

    torch.manual_seed(0)
    metrics = fit(_tiny(recipe), tmp_path / "run", quiet=True)
    rows = [line.split(",") for line in (tmp_path / "run" / "history.csv").read_text().splitlines()]
    head = rows[0]
    losses = [float(r[head.index("train_loss")]) for r in rows[1:]]
    # The zero-initialised output predicts ε̂ = 0 at first: a loss of E[ε²] = 1. It must fall.
    assert losses[0] < 1.0 and losses[-1] < 0.8 * losses[0], losses
    assert metrics["val_loss"] < 0.8
    assert (tmp_path / "run" / "samples" / "epoch_003.png").is_file()
    assert (tmp_path / "run" / "model.safetensors").is_file()
    if recipe == "mnist-text2img":
        assert json.loads((tmp_path / "run" / "prompt_tokenizer.json").read_text())["max_len"] == 48


def test_prompt_dropout_and_conditions():
    from duboko.tasks.diffusion import DiffusionTask

    cfg = _tiny("mnist-text2img")
    task = DiffusionTask(cfg, torch.device("cpu"))
    task.setup()
    labels = torch.arange(10).repeat(20)
    tokens = task.make_condition(labels, torch.Generator().manual_seed(0), drop=0.25)
    empty = (tokens[:, 1:] == 0).all(1)  # only BOS left: the null prompt
    assert 0.15 < empty.float().mean() < 0.35
    assert (tokens[:, 0] == captions.BOS).all()
    cfg = _tiny("mnist-diffusion-class")
    task = DiffusionTask(cfg, torch.device("cpu"))
    task.setup()
    none = task.make_condition(labels, torch.Generator().manual_seed(0), drop=1.0)
    assert (none == 10).all()
    with pytest.raises(DubokoError, match="label-conditioned .* give labels, not prompts"):
        task.condition_for(prompts=["a seven"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_hand_computation_and_weight_the_training_loss(prediction_type):
    from duboko.models.unet import UNet, UNetConfig
    from duboko.tasks.diffusion import DiffusionTask

    task = DiffusionTask(_tiny("mnist-diffusion", [f"data.prediction_type={prediction_type}", "data.min_snr_gamma=5"]),
                         torch.device("cpu"))
    task.setup()
    t = torch.tensor([0, 10, 300, 600, 999])
    a = task.scheduler.alphas_cumprod[t].double()
    snr = a / (1 - a)
    # Hang et al. 2023, eq. 9: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v.
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(task.min_snr_weights(t).double(), expected, rtol=1e-5, atol=1e-7)
    if prediction_type == "epsilon":
        assert task.min_snr_weights(torch.tensor([999])).item() == pytest.approx(1.0)  # SNR < γ: unweighted
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, channel_mults=[1, 2], groups=4, num_heads=2, attention_resolutions=[7]))
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)  # a non-zero output, so the losses differ per sample
    x0 = torch.rand(5, 1, 28, 28) * 2 - 1
    batch = {"x0": x0, "noise": torch.randn_like(x0), "t": t, "cond": None}
    plain = task.loss(model, batch)
    per_sample = torch.stack([task.loss(model, {k: (v[i : i + 1] if v is not None else None) for k, v in batch.items()})
                              for i in range(5)])
    torch.testing.assert_close(plain, per_sample.mean())  # the validation loss stays the plain MSE
    weighted = task.loss(model, batch, weighted=True)
    torch.testing.assert_close(weighted, (per_sample * task.min_snr_weights(t)).mean(), rtol=1e-5, atol=1e-7)
    assert task.training_step(model, batch).loss.item() == pytest.approx(weighted.item())
    with pytest.raises(DubokoError, match="data.min_snr_gamma must be a finite number >= 0"):
        _tiny("mnist-diffusion", ["data.min_snr_gamma=-1.0"])


def test_task_contract_assets_metrics_and_no_files_without_a_run_folder(tmp_path):
    from duboko.tasks import Evaluation
    from duboko.tasks.diffusion import PROMPT_FILE, DiffusionTask

    cfg = _tiny("mnist-text2img")
    DiffusionTask.check(cfg)
    task = DiffusionTask(cfg, torch.device("cpu"))
    task.setup()
    assert cfg.model["vocab_size"] == captions.VOCAB_SIZE  # the derived field, from the prompt tokenizer
    assert task.loss_name() == "mse"
    assert task.save_assets(tmp_path) == [PROMPT_FILE] and (tmp_path / PROMPT_FILE).is_file()
    model = task.build_model()
    batch = next(task.train_batches(0))
    out = task.training_step(model, batch)
    assert set(out.stats) == {"loss_sum", "count"} and out.stats["count"] == 16
    assert task.epoch_end(model, 1, None) == {}  # no run folder: no grid drawn or written
    assert task.final_metrics(model, None, []) == Evaluation({})  # data.eval_samples=0
    # Two ranks split each global batch: every other image, with its noise, timestep and prompt.
    halves = [DiffusionTask(cfg, torch.device("cpu"), rank, 2) for rank in (0, 1)]
    for half in halves:
        half.setup()
    for rank, half in enumerate(halves):
        part = next(half.train_batches(0))
        for key in ("x0", "noise", "t", "cond"):
            assert torch.equal(part[key], batch[key][rank::2]), key


def test_captions_have_train_and_held_out_phrasings():
    train = set(captions.captions_for(7))
    held = set(captions.captions_for(7, held_out=True))
    assert {"a handwritten seven", "the digit 7", "7", "number seven, written by hand"} <= train
    assert not train & held and len(held) >= 4
    tok = captions.PromptTokenizer(48)
    for text in train | held:  # every caption fits and round-trips
        assert tok.decode(tok.encode(text)) == text


def test_prompt_tokenizer_errors_are_clear():
    tok = captions.PromptTokenizer(16)
    assert tok.encode("  A  Seven ") == tok.encode("a seven")  # case and spaces normalised
    with pytest.raises(DubokoError, match=r"character '\*' \(position 3\)"):
        tok.encode("a *seven")
    with pytest.raises(DubokoError, match="is 27 characters long; the model takes at most 15 characters"):
        tok.encode("a handwritten seven, please")
    batch = tok.batch(["7", "a two"])
    assert batch.shape == (2, 6) and batch[0, 2:].eq(0).all()


def test_frechet_distance_matches_scipy_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    import numpy as np

    torch.manual_seed(0)
    a = torch.randn(400, 6, dtype=torch.float64)
    b = torch.randn(300, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64) * 0.5 + 0.3
    mu1, s1 = fid.feature_stats(a)
    mu2, s2 = fid.feature_stats(b)
    covmean = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real  # pytorch-fid's formula
    want = float(((mu1 - mu2) ** 2).sum()) + float(np.trace(s1.numpy() + s2.numpy() - 2 * covmean))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
    assert fid.frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(DubokoError, match="at least 2"):
        fid.feature_stats(torch.randn(1, 3))


def test_missing_scorer_is_a_clear_error(tmp_path):
    with pytest.raises(DubokoError, match="train it with `duboko train mnist-scorer"):
        fid.load_scorer(folder=tmp_path)
