"""The steppable `Trainer`: one step is the same code for `duboko train` and `duboko bench`; a new
model and a new task plug in from their own module; config mistakes stop before anything is made;
`--resume` takes only the overrides that keep it exact."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import duboko
from duboko import config as C
from duboko.cli.main import main
from duboko.errors import DubokoError
from duboko.train import engine
from duboko.train.engine import Trainer

LM_SMALL = ["train.num_threads=1", "model.hidden_size=32", "data.seq_len=16", "train.batch_size=8",
            "data.sample_tokens=0", "data.max_train_tokens=3000", "data.max_eval_tokens=1000"]


@pytest.fixture
def count_steps(monkeypatch):
    """Counts the calls of `Trainer.step`, wherever they come from."""
    calls = []
    real = Trainer.step

    def spy(self, batch):
        calls.append(type(self).__name__)
        return real(self, batch)

    monkeypatch.setattr(Trainer, "step", spy)
    return calls


def test_trainer_steps_without_a_run_folder(tmp_path, monkeypatch, tiny_cnn_overrides):
    monkeypatch.chdir(tmp_path)
    cfg = C.resolve("mnist-cnn", tiny_cnn_overrides + ["data.limit_train=128", "batch_size=32"])
    trainer = Trainer(cfg, None, quiet=True)
    assert trainer.steps_per_epoch == 4 and trainer.total_steps == 4 * cfg.train.epochs
    batches = trainer.train_batches()
    first = trainer.step(next(batches))
    assert first.loss.ndim == 0 and float(first.stats["count"]) == 32
    trainer.step(next(batches))
    assert (trainer.state.step, trainer.state.batch) == (2, 2)
    metrics = trainer.evaluate("test")
    assert set(metrics) >= {"loss", "accuracy"} and trainer.model.training
    trainer.save()  # no run folder: nothing is written
    assert list(tmp_path.iterdir()) == []


def test_bench_and_train_call_the_same_trainer_step(tmp_path, count_steps, tiny_cnn_overrides):
    from duboko.bench.common import EngineTrainer

    cfg = C.resolve("mnist-cnn", tiny_cnn_overrides + ["data.limit_train=128", "batch_size=32", "epochs=1"])
    metrics = engine.fit(cfg, tmp_path / "run", quiet=True)
    assert len(count_steps) == metrics["steps"] == 4
    bench = EngineTrainer(cfg, "cpu")
    window = bench.run(3)
    assert len(count_steps) == 4 + 3 and window["steps"] == 3 and window["images"] == 96
    assert bench.total_steps == Trainer(cfg, None, quiet=True).total_steps


def test_bench_holds_no_training_step_of_its_own():
    """Only the primer's reference pipeline (bench/reference.py, the other side of the comparison)
    trains by itself; duboko's side goes through `Trainer.step`."""
    bench = Path(duboko.__file__).parent / "bench"
    found = []
    for path in sorted(bench.glob("*.py")):
        if path.name == "reference.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in ("training_step", "apply_gradients", "backward", "zero_grad", "lr_factor"):
                    found.append(f"{path.name}:{node.lineno} {name}")
    assert not found, found


def test_nonfinite_skip_is_honoured_by_the_step(tiny_cnn_overrides):
    cfg = C.resolve("mnist-cnn", tiny_cnn_overrides + ["data.limit_train=64", "batch_size=32", "nonfinite=skip"])
    trainer = Trainer(cfg, None, quiet=True)
    batch = next(trainer.train_batches())
    x, y = batch
    assert trainer.step((torch.full_like(x, float("nan")), y)) is None
    assert trainer.state.skipped_steps == 1 and trainer.state.step == 0
    stop = Trainer(C.resolve("mnist-cnn", tiny_cnn_overrides + ["data.limit_train=64"]), None, quiet=True)
    with pytest.raises(DubokoError, match=r"the loss became nan .*\(no run folder\)"):
        stop.step((torch.full_like(x, float("nan")), y))


# -- a new family and a new task: one file each, nothing else edited -----------------------------
TOY_MODULE = '''
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from duboko.registry import register_model
from duboko.seeding import generator
from duboko.tasks import Evaluation, StepOutput, Task, register_task


@dataclass
class ToyNetConfig:
    in_features: int = 2  # input size
    hidden_size: int = 16  # hidden units
    num_classes: int = 2  # outputs


@register_model("toy-net-{tag}", family="toy", config_cls=ToyNetConfig, description="two-layer toy")
class ToyNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(nn.Linear(config.in_features, config.hidden_size), nn.Tanh(),
                                 nn.Linear(config.hidden_size, config.num_classes))

    def forward(self, x):
        return self.net(x)


@dataclass
class BlobsConfig:
    n: int = 512  # points per split
    noise: float = 0.3  # spread of each blob


@register_task
class BlobsTask(Task):
    name = "toy-blobs-{tag}"
    data_config = BlobsConfig
    shown_metric = "accuracy"

    def _split(self, which):
        g = generator(self.config.train.seed, which)
        y = torch.randint(0, 2, (self.config.data.n,), generator=g)
        x = torch.randn(self.config.data.n, 2, generator=g) * self.config.data.noise + (y[:, None] * 2.0 - 1.0)
        return x, y

    def setup(self, run_dir=None):
        self.splits = {"train": self._split(0), "val": self._split(1)}

    def num_train_batches(self):
        return -(-self.config.data.n // self.config.train.batch_size)

    def train_batches(self, epoch, start=0):
        x, y = self.splits["train"]
        perm = torch.randperm(len(x), generator=generator(self.config.train.seed, epoch))
        bs = self.config.train.batch_size
        for i in range(start, self.num_train_batches()):
            idx = perm[i * bs:(i + 1) * bs]
            yield x[idx], y[idx]

    def training_step(self, model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss, {"loss_sum": loss.detach() * len(y), "count": float(len(y)),
                                 "accuracy": (logits.argmax(1) == y).sum()})

    @torch.no_grad()
    def evaluate(self, model, split):
        x, y = self.splits["val"]
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(1) == y).float().mean().item()}

    def final_metrics(self, model, run_dir, history):
        val = self.evaluate(model, "val")
        return Evaluation({"test_accuracy": val["accuracy"]}, report=f"toy accuracy {val['accuracy']:.3f}")
'''


def _import_toy(tmp_path: Path, tag: str):
    path = tmp_path / f"toy_plugin_{tag}.py"
    path.write_text(TOY_MODULE.replace("{tag}", tag))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_a_new_model_and_task_from_their_own_module_train_end_to_end(tmp_path, capsys):
    _import_toy(tmp_path, "a")
    recipe = tmp_path / "toy.toml"
    recipe.write_text(textwrap.dedent('''
        description = "toy blobs"
        task = "toy-blobs-a"
        [model]
        name = "toy-net-a"
        [data]
        n = 256
        [train]
        epochs = 3
        batch_size = 32
        lr = 0.05
        num_threads = 1
    '''))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "toy accuracy" in printed and "accuracy = " in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.9, metrics  # two well-separated blobs
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert "toy-net-a" in duboko.registry.model_names() and "toy-blobs-a" in duboko.registry.task_names()


def test_unknown_task_lists_the_known_ones(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('task = "no-such-task"\n[model]\nname = "my_net"\n')
    with pytest.raises(DubokoError, match="unknown task 'no-such-task'.*image-classification"):
        C.resolve(str(recipe))


# -- config mistakes: one line, exit 2, nothing created ------------------------------------------
def test_a_loss_that_does_not_fit_fails_before_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "mnist-cnn", "--set", "loss=mse", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.loss 'mse'" in err and "cross_entropy" in err
    assert not out.exists()


def test_derived_model_fields_are_refused_with_a_pointer():
    with pytest.raises(DubokoError, match="model.vocab_size is derived by task 'language-model' from data.vocab_size"):
        C.resolve("shakespeare-gpt", ["model.vocab_size=77"])
    # The bare name is the field a user sets.
    assert C.resolve("shakespeare-gpt", ["vocab_size=77"]).data.vocab_size == 77


def test_config_round_trip_stays_typed():
    cfg = C.resolve("mnist-mlp", ["hidden_sizes=[64, 32]", "epochs=2", "lr=1e-3"])
    again = C.resolve(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.model["hidden_sizes"] == [64, 32] and isinstance(again.model["hidden_sizes"][0], int)
    assert isinstance(again.train.lr, float) and isinstance(again.train.epochs, int)


# -- resume ----------------------------------------------------------------------------------------
@pytest.fixture
def tiny_lm_run(tmp_path):
    out = tmp_path / "lm"
    assert main(["train", "shakespeare-gru", "--quiet", "--out", str(out), *sum((["--set", o] for o in LM_SMALL + ["epochs=1", "max_steps=4"]), [])]) == 0
    return out


def test_resume_of_a_run_written_with_an_old_key_name(tiny_lm_run, capsys):
    config = json.loads((tiny_lm_run / "config.json").read_text())
    config["data"]["tokenizer_vocab"] = config["data"].pop("vocab_size")  # as older runs wrote it
    (tiny_lm_run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(tiny_lm_run), "--set", "max_steps=6", "--quiet"]) == 0
    assert json.loads((tiny_lm_run / "metrics.json").read_text())["steps"] == 6
    assert "vocab_size" in json.loads((tiny_lm_run / "config.json").read_text())["data"]


def test_resume_refuses_overrides_that_break_exactness(tiny_lm_run, capsys):
    before = (tiny_lm_run / "state.safetensors").read_bytes()
    for override in ("batch_size=128", "seed=3", "model.hidden_size=16", "data.seq_len=8", "lr=0.1"):
        assert main(["train", "--resume", str(tiny_lm_run), "--set", override, "--set", "max_steps=6"]) == 2
        err = capsys.readouterr().err
        assert "cannot resume with" in err and "train.epochs" in err and "train.max_steps" in err, err
    assert (tiny_lm_run / "state.safetensors").read_bytes() == before
