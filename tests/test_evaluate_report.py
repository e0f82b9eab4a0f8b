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
