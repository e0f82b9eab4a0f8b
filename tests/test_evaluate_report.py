"""report.html: one self-contained page per run (no external address), with each family's
sections, and a comparison page for several runs."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch

from duboko.cli.main import main
from duboko.errors import DubokoError
from duboko.evaluate.plots import save_grid
from duboko.evaluate.report import build_report, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def sets(values: list[str]) -> list[str]:
    return sum((["--set", v] for v in values), [])


def assert_self_contained(text: str) -> None:
    """No external address of any kind: every picture is an inline PNG. The base64 payloads are
    checked as PNGs and left out of the text search (random base64 can spell "hTtP")."""
    lowered = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "data:", text).lower()
    for needle in ("http", "src=\"//", "src='//", "href=\"//", "url(", "@import", "<script", "<link", "file:"):
        assert needle not in lowered, needle
    sources = re.findall(r'src="([^"]*)"', text)
    assert sources, "no picture at all"
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    hrefs = re.findall(r'href="([^"]*)"', text)
    assert all(h.startswith("#") for h in hrefs), hrefs


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory) -> Path:
    from tests.conftest import TINY_CNN

    out = tmp_path_factory.mktemp("rep") / "cnn"
    assert main(["train", "mnist-cnn", "--quiet", "--out", str(out),
                 *sets(TINY_CNN + ["data.limit_train=256", "data.limit_test=100", "epochs=2", "batch_size=64"])]) == 0
    return out


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rep") / "gru"
    small = ["train.num_threads=1", "model.hidden_size=32", "data.seq_len=16", "train.batch_size=8",
             "data.sample_tokens=40", "data.max_train_tokens=3000", "data.max_eval_tokens=1000", "epochs=2", "max_steps=6", "train.log_every=2"]
    assert main(["train", "shakespeare-gru", "--quiet", "--out", str(out), *sets(small)]) == 0
    return out


def test_classifier_report(cnn_run, capsys):
    assert main(["report", str(cnn_run)]) == 0
    assert "report.html" in capsys.readouterr().out
    text = (cnn_run / "report.html").read_text()
    assert_self_contained(text)
    metrics = json.loads((cnn_run / "metrics.json").read_text())
    for heading in ("Final metrics", "Training curves", "Per-class precision, recall, F1", "Confusion matrix",
                    "Top losses (test)", "Timings", "Environment", "Resolved config"):
        assert heading in text, heading
    assert f"{metrics['test_accuracy']:.6g}" in text
    f1 = metrics["classification_report"]["3"]["f1"]
    assert f"{f1:.6g}" in text
    assert text.count("<img") >= 3  # curves, confusion matrix, top losses
    assert "&quot;image_size&quot;: 16" in text  # the resolved config, escaped


def test_language_model_report_has_samples_and_next_tokens(lm_run, tmp_path, capsys):
    out = tmp_path / "lm.html"
    assert main(["report", str(lm_run), "--out", str(out)]) == 0
    text = out.read_text()
    assert_self_contained(text)
    assert "Samples per epoch" in text and "epoch_1</summary>" in text and "final</summary>" in text
    assert "Next token after" in text
    assert 'alt="per-step curves"' in text  # train/loss every 2 steps, from the TensorBoard log
    sample = (lm_run / "samples" / "epoch_1.txt").read_text()
    assert sample.strip().splitlines()[0].replace("&", "&amp;").replace("<", "&lt;")[:10] in text


def test_comparison_page(cnn_run, lm_run, tmp_path):
    out = tmp_path / "compare.html"
    assert main(["report", str(cnn_run), str(lm_run), "--out", str(out), "--files-only"]) == 0
    text = out.read_text()
    assert_self_contained(text)
    assert "Comparison" in text and "mnist-cnn (cnn)" in text and "shakespeare-gru (gru)" in text
    assert 'href="#run0"' in text and 'id="run1"' in text


def _fake_run(folder: Path, task: str) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"recipe": f"fake-{task}", "task": task, "description": "<b>x</b>",
                                                    "model": {"name": "m"}, "data": {}, "train": {}}))
    (folder / "metrics.json").write_text(json.dumps({"exact_match": 0.5, "train_seconds": 1.0}))
    (folder / "history.csv").write_text("epoch,step,train_loss,val_loss,lr,seconds\n1,2,1.5,1.4,0.001,0.5\n2,4,1.2,1.1,0.001,0.5\n")
    return folder


def test_seq2seq_and_diffusion_sections_from_files(tmp_path):
    seq = _fake_run(tmp_path / "seq", "seq2seq")
    (seq / "test_predictions.tsv").write_text("source\treference\tprediction\tcorrect\n12\ttwelve\ttwelve\t1\n"
                                              "7\tseven\tsevn\t0\n")
    text = build_report([seq])
    assert_self_contained(text)
    assert "Test predictions (2 rows, mistakes first; 2 shown)" in text
    assert text.index("<td>sevn</td>") < text.index("<td>twelve</td>")
    assert "&lt;b&gt;x&lt;/b&gt;" in text and "<b>x</b>" not in text  # text from a file is escaped

    diff = _fake_run(tmp_path / "diff", "diffusion")
    (diff / "samples").mkdir()
    save_grid(torch.zeros(4, 1, 8, 8), diff / "samples" / "epoch_001.png", nrow=2)
    save_grid(torch.zeros(2, 1, 8, 8), diff / "guidance.png", nrow=2)
    (diff / "fake.png").write_bytes(b"not a png at all")  # not inlined: not a PNG
    path = write_report(diff)
    text = path.read_text()
    assert_self_contained(text)
    assert "samples/epoch_001.png" in text and "guidance.png" in text and "fake.png" not in text


# -- diffusion: the sample grids, the guidance sweep (conditional runs), the noising strip ---------------
TINY_UNET = ["model.base_channels=8", "model.channel_mults=[1, 2]", "model.groups=4", "model.num_heads=2",
             "model.attention_resolutions=[7]", "data.limit_train=64", "data.val_size=16", "data.eval_samples=0",
             "data.grid_rows=1", "data.grid_steps=2", "data.eval_batch_size=16", "train.epochs=1",
             "train.batch_size=16", "train.warmup_steps=0", "train.ema_decay=0", "train.num_threads=1"]


@pytest.fixture(scope="module")
def diffusion_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rep-diffusion")
    runs = {}
    for name, recipe in (("class", "mnist-diffusion-class"), ("uncond", "mnist-diffusion")):
        runs[name] = root / name
        assert main(["train", recipe, "--quiet", "--out", str(runs[name]), *sets(TINY_UNET)]) == 0
    return runs


def _figure_of(text: str, alt: str) -> str:
    """The <figure> holding the picture `alt` (its inline PNG and its caption)."""
    pattern = r'<figure><img alt="' + re.escape(alt) + r'"[^>]*src="(data:image/png;base64,[^"]+)"><figcaption>[^<]+</figcaption></figure>'
    match = re.search(pattern, text)
    assert match, f"no {alt} figure"
    return match.group(1)


def test_diffusion_run_writes_and_reports_the_sweep_and_the_noising_strip(diffusion_runs):
    conditional, unconditional = diffusion_runs["class"], diffusion_runs["uncond"]
    # The end of training writes both pictures for a conditional run, only the strip otherwise.
    assert (conditional / "guidance_sweep.png").read_bytes().startswith(PNG)
    assert (conditional / "noising.png").read_bytes().startswith(PNG)
    assert (unconditional / "noising.png").read_bytes().startswith(PNG)
    assert not (unconditional / "guidance_sweep.png").exists()
    # ... and the report.html that `duboko train` wrote shows them, captioned, with the grids.
    text = (conditional / "report.html").read_text()
    assert_self_contained(text)
    for heading in ("Sample grids per epoch", "Guidance sweep", "Noising strip"):
        assert f"<h3>{heading}</h3>" in text, heading
    sweep = _figure_of(text, "guidance sweep")
    assert base64.b64decode(sweep.split(",", 1)[1]) == (conditional / "guidance_sweep.png").read_bytes()
    _figure_of(text, "noising strip")
    assert 'alt="samples/epoch_001.png"' in text and "ddim, 2 steps, guidance 3" in text
    text = (unconditional / "report.html").read_text()
    assert_self_contained(text)
    assert "<h3>Noising strip</h3>" in text and "Guidance sweep" not in text
    _figure_of(text, "noising strip")


def test_report_draws_missing_diffusion_pictures_from_the_model(diffusion_runs, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"  # an older run folder: no sweep, no strip
    shutil.copytree(diffusion_runs["class"], old)
    (old / "guidance_sweep.png").unlink()
    (old / "noising.png").unlink()
    assert main(["report", str(old), "--files-only", "--out", str(tmp_path / "files.html")]) == 0
    text = (tmp_path / "files.html").read_text()
    assert "(no guidance sweep: the run folder has none" in text and "(no noising strip" in text
    assert main(["report", str(old), "--out", str(tmp_path / "model.html")]) == 0
    text = (tmp_path / "model.html").read_text()
    assert_self_contained(text)
    _figure_of(text, "guidance sweep")
    _figure_of(text, "noising strip")
    assert "Drawn now from the model" in text and "Drawn now: the run folder has no noising.png" in text
    assert not (old / "guidance_sweep.png").exists()  # the report does not write into the run folder


def test_guidance_sweep_rows_share_the_noise_and_match_plain_sampling(diffusion_runs):
    """Row w of the sweep is exactly `generate(guidance=w)` for the ten digits with the grids'
    seed: the same x_T down each column, so the rows differ by the guidance alone."""
    from duboko.evaluate.diffusion import strip_timesteps
    from duboko.train.run import load_run

    loaded = load_run(diffusion_runs["class"], device="cpu")
    task, model = loaded.task, loaded.model
    images, columns = task.guidance_sweep(model, guidances=(0.0, 1.0, 4.0))
    assert images.shape == (3, 10, 1, 28, 28) and columns == [f"digit {d}" for d in range(10)]
    for row, w in enumerate((0.0, 1.0, 4.0)):
        plain = task.generate(model, 10, labels=list(range(10)), sampler="ddim", steps=2, guidance=w).images
        torch.testing.assert_close(images[row], plain.cpu())
    assert not torch.allclose(images[0], images[2])  # the guidance changes the images
    # The noising strip: x_t = √ᾱ x_0 + √(1-ᾱ) ε with the run's schedule, from clean to pure noise.
    frames = task.noising_strip(n=3)
    assert [t for t, _, _ in frames] == strip_timesteps(1000) == [0, 50, 100, 250, 500, 750, 1000]
    x0 = frames[0][2]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(task.config.data.eval_seed))
    for t, abar, xt in frames[1:]:
        assert abar == pytest.approx(float(task.scheduler.alphas_cumprod[t - 1]))
        torch.testing.assert_close(xt, abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise, rtol=1e-5, atol=1e-5)
    assert frames[-1][1] < 1e-3 and frames[1][1] > 0.99
    with pytest.raises(DubokoError, match="unconditional"):
        load_run(diffusion_runs["uncond"], device="cpu").task.sweep_columns()
