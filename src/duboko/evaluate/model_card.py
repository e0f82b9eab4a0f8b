"""MODEL_CARD.md for a run folder, in the Hugging Face layout (Mitchell et al., 2019, "Model Cards
for Model Reporting"; huggingface.co/docs/hub/model-cards): YAML front matter with
`library_name`, `datasets`, `metrics` and a `model-index` whose results are metrics.json's
numbers, then the sections description, intended use and limits, training data, training
procedure with hyper-parameters, results and framework versions.

The front matter is written by a small emitter of our own (every string as a JSON string, which is
a valid YAML double-quoted scalar), so writing a card needs no YAML library; tests parse it with
PyYAML.
"""

from __future__ import annotations

import json
import math
import platform
import re
from pathlib import Path
from typing import Any

from duboko.errors import DubokoError
from duboko.io import atomic_write_text, read_json

CARD = "MODEL_CARD.md"

# What each task is, in the Hub's task vocabulary, and what it is fit for.
TASK_TYPES = {
    "image-classification": "image-classification",
    "tabular": "tabular-classification",
    "language-model": "text-generation",
    "seq2seq": "text2text-generation",
    "diffusion": "text-to-image",
    "ldm": "text-to-image",
    "vae": "image-to-image",
    "adversarial": "image-classification",
    "backdoor": "image-classification",
}
INTENDED_USE = {
    "image-classification": "Classifying small grey images like those it was trained on (28×28 digits or clothing).",
    "tabular": "Predicting the target of rows drawn from the same table it was trained on.",
    "language-model": "Generating text in the style of its training corpus, and studying next-token predictions.",
    "seq2seq": "Rewriting inputs of the kind it was trained on (e.g. numbers written out in words).",
    "diffusion": "Sampling small grey images like its training set, for study.",
    "ldm": "Sampling small grey images like its training set, for study.",
    "vae": "Compressing and generating small grey images like its training set, for study.",
    "adversarial": "Classifying small grey images, with robustness to L∞-bounded adversarial perturbations as trained; for study.",
    "backdoor": "Studying data poisoning: this model was trained on a deliberately poisoned set and carries a backdoor. Never deploy it.",
}


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of metrics.json (not nested tables, not booleans or text)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    return json.dumps(str(value))


_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_YAML_WORDS = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}


def _yaml_key(key: Any) -> str:
    """A plain key where YAML reads it back as the same string, else a quoted one."""
    text = str(key)
    return text if _PLAIN_KEY.match(text) and text.lower() not in _YAML_WORDS else json.dumps(text)


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts, lists and scalars (what a model card's metadata holds)."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        out = []
        for k, v in value.items():
            key = _yaml_key(k)
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{key}:\n{to_yaml(v, indent + 2)}")
            else:
                out.append(f"{pad}{key}: {_yaml_scalar(v) if not isinstance(v, (dict, list)) else ('{}' if isinstance(v, dict) else '[]')}\n")
        return "".join(out)
    if isinstance(value, list):
        if not value:
            return pad + "[]\n"
        out = []
        for item in value:
            if isinstance(item, (dict, list)) and item:
                body = to_yaml(item, indent + 2)
                out.append(f"{pad}- {body[indent + 2:]}")  # the first line after "- "
            else:
                out.append(f"{pad}- {_yaml_scalar(item)}\n")
        return "".join(out)
    return pad + _yaml_scalar(value) + "\n"


def dataset_name(config: dict[str, Any]) -> str:
    data = config.get("data", {})
    if config.get("task") == "language-model" and "path" in data:
        # the corpus' file names only: an absolute path would say more about the machine than the data
        names = [Path(p).name for p in str(data["path"]).split(",") if p.strip()]
        return ",".join(names) if names else "shakespeare"
    for key in ("dataset", "corpus", "source"):
        if isinstance(data.get(key), str) and data[key]:
            return data[key]
    return str(config.get("task", "unknown"))


def versions() -> dict[str, str]:
    """Framework versions of this process (a run folder does not record them)."""
    import numpy
    import torch

    import duboko

    return {"duboko": duboko.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def card_metadata(config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    task = str(config.get("task", ""))
    dataset = dataset_name(config)
    results = scalar_metrics(metrics)
    return {
        "library_name": "duboko",
        "tags": ["duboko", "pytorch", task],
        "pipeline_tag": TASK_TYPES.get(task, task),
        "datasets": [dataset],
        "metrics": list(results),
        "model-index": [{
            "name": str(config.get("recipe", "duboko-model")),
            "results": [{
                "task": {"type": TASK_TYPES.get(task, task), "name": task},
                "dataset": {"type": dataset, "name": dataset},
                "metrics": [{"type": k, "name": k, "value": v} for k, v in results.items()],
            }],
        }],
    }


def _table(rows: list[tuple[str, str]], head: tuple[str, str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"| {head[0]} | {head[1]} |", "| --- | --- |"]
    lines += [f"| {cell(a)} | {cell(b)} |" for a, b in rows]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def model_card(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The card's text: front matter, then the sections."""
    task = str(config.get("task", ""))
    model = config.get("model", {})
    train = config.get("train", {})
    data = config.get("data", {})
    front = to_yaml(card_metadata(config, metrics))
    results = scalar_metrics(metrics)
    body = [
        f"# {config.get('recipe', 'duboko model')}",
        "",
        "## Model description",
        str(config.get("description", "")) or "(no description in the recipe)",
        "",
        f"Model `{model.get('name', '?')}` trained with duboko (task `{task}`); "
        f"{metrics.get('parameters', '?')} parameters.",
        "",
        "## Intended use and limits",
        INTENDED_USE.get(task, "Study and teaching."),
        "It is a teaching model trained on a small, clean data set: it is not evaluated for fairness, robustness "
        "or inputs unlike its training data, and must not be used for decisions about people.",
        "",
        "## Training data",
        f"Data set `{dataset_name(config)}`. Data settings:",
        "",
        _table([(k, _fmt(v)) for k, v in data.items()], ("data setting", "value")),
        "",
        "## Training procedure",
        "Hyper-parameters (the `[train]` section of the resolved recipe):",
        "",
        _table([(k, _fmt(v)) for k, v in train.items()], ("hyper-parameter", "value")),
        "",
        "Model configuration:",
        "",
        _table([(k, _fmt(v)) for k, v in model.items()], ("model field", "value")),
        "",
        "## Results",
        _table([(k, _fmt(v)) for k, v in results.items()], ("metric", "value")),
        "",
        "## Framework versions",
        _table(list(versions().items()), ("package", "version")),
        "",
    ]
    return "---\n" + front + "---\n\n" + "\n".join(body)


def write_model_card(run_dir: str | Path) -> Path:
    """Write RUN/MODEL_CARD.md from its config.json and metrics.json (atomically)."""
    run_dir = Path(run_dir)
    for name in ("config.json", "metrics.json"):
        if not (run_dir / name).is_file():
            raise DubokoError(f"{run_dir} has no {name}: a model card needs a finished run folder")
    config, metrics = read_json(run_dir / "config.json"), read_json(run_dir / "metrics.json")
    if not isinstance(config, dict) or not isinstance(metrics, dict):
        raise DubokoError(f"{run_dir}: config.json and metrics.json must each hold a JSON object")
    path = run_dir / CARD
    atomic_write_text(path, model_card(config, metrics))
    return path
