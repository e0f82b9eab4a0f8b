"""MODEL_CARD.md: Hugging Face layout, YAML front matter whose model-index equals metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from duboko.cli.main import main
from duboko.errors import DubokoError
from duboko.evaluate.model_card import CARD, write_model_card

yaml = pytest.importorskip("yaml", reason="PyYAML (the [dev] extra) parses the card's front matter")


def front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "mlp"
    sets = ["data.limit_train=256", "data.limit_test=100", "train.num_threads=1", "epochs=1", "hidden_sizes=[32]"]
    assert main(["train", "mnist-mlp", "--quiet", "--out", str(out), *sum((["--set", s] for s in sets), [])]) == 0
    return out


def test_model_card_front_matter_matches_metrics_json(mlp_run):
    path = write_model_card(mlp_run)
    assert path == mlp_run / CARD
    meta, body = front_matter(path.read_text())
    metrics = json.loads((mlp_run / "metrics.json").read_text())
    assert meta["library_name"] == "duboko"
    assert meta["datasets"] == ["mnist"]
    assert set(meta["metrics"]) == set(scalars(metrics))
    (entry,) = meta["model-index"]
    assert entry["name"] == "mnist-mlp"
    (result,) = entry["results"]
    assert result["task"]["type"] == "image-classification" and result["dataset"]["type"] == "mnist"
    assert {m["type"]: m["value"] for m in result["metrics"]} == scalars(metrics)  # exact, not rounded
    assert "test_accuracy" in {m["type"] for m in result["metrics"]}
    for section in ("## Model description", "## Intended use and limits", "## Training data", "## Training procedure",
                    "## Results", "## Framework versions"):
        assert section in body
    assert "| lr | 0.001 |" in body and "| torch |" in body


def test_strings_that_look_like_yaml_survive(tmp_path):
    tricky = 'a: "quoted" — ünïcode # not a comment\nnext line: [1, 2]'
    config = {"recipe": "yes", "description": tricky, "task": "language-model", "model": {"name": "gpt"},
              "data": {"corpus": "null"}, "train": {"lr": 3e-4}}
    metrics = {"val_loss": 1.5, "val_perplexity": float("inf"), "ranks_in_sync": True, "precision": "fp32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    meta, body = front_matter(write_model_card(tmp_path).read_text())
    assert meta["model-index"][0]["name"] == "yes"  # a string, not the boolean YAML 1.1 would read
    assert meta["datasets"] == ["null"]
    values = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values == {"val_loss": 1.5, "val_perplexity": float("inf")}  # booleans and text are not results
    assert tricky.split("\n")[0] in body


def test_a_folder_without_metrics_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DubokoError, match="metrics.json"):
        write_model_card(tmp_path)
