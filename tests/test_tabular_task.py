"""The tabular task: loss selection, batches, metrics (checked against scikit-learn), training."""

import json

import numpy as np
import pytest
import torch

from duboko import config as C
from duboko.errors import DubokoError
from duboko.evaluate.metrics import regression_metrics as _torch_regression_metrics
from duboko.tasks.tabular import TabularTask, resolve_loss


def regression_metrics(pred, true):
    return _torch_regression_metrics(torch.from_numpy(pred), torch.from_numpy(true))


def _task(recipe, *sets):
    cfg = C.resolve(recipe, list(sets))
    task = TabularTask(cfg, torch.device("cpu"))
    task.setup()
    return cfg, task


def test_loss_follows_problem_and_train_loss():
    assert resolve_loss("classification", "auto", 10) == "cross_entropy"
    assert resolve_loss("binary", "auto", 2) == "bce"
    assert resolve_loss("binary", "cross_entropy", 2) == "cross_entropy"
    assert resolve_loss("regression", "auto", 0) == "mse"
    with pytest.raises(DubokoError, match="expected one of: auto, mse"):
        resolve_loss("regression", "bce", 0)
    with pytest.raises(DubokoError, match="10 classes"):
        resolve_loss("classification", "bce", 10)


def test_setup_fills_model_sizes():
    cfg, task = _task("digits-binary")
    assert cfg.model["in_features"] == 64 and cfg.model["out_features"] == 1
    cfg, task = _task("digits-binary", "loss=cross_entropy")
    assert cfg.model["out_features"] == 2
    cfg, task = _task("digits")
    assert cfg.model["out_features"] == 10
    cfg, task = _task("diabetes-regression")
    assert cfg.model["in_features"] == 10 and cfg.model["out_features"] == 1


def test_batches_cover_the_train_split_once_and_are_reproducible():
    cfg, task = _task("breast-cancer", "batch_size=50")
    n = len(task.splits.y["train"])
    batches = list(task.train_batches(epoch=0))
    assert len(batches) == task.num_train_batches() == -(-n // 50)
    rows = torch.cat([x for x, _ in batches])
    assert rows.shape[0] == n
    # every train row exactly once: compare as a set of row tuples
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, task.splits.x["train"].tolist()))
    again = list(task.train_batches(epoch=0, start=2))
    torch.testing.assert_close(again[0][0], batches[2][0])
    other = list(task.train_batches(epoch=1))
    assert not torch.equal(other[0][0], batches[0][0])
    # two ranks split the data without overlap
    r0 = TabularTask(cfg, torch.device("cpu"), rank=0, world_size=2)
    r1 = TabularTask(cfg, torch.device("cpu"), rank=1, world_size=2)
    r0.setup(), r1.setup()
    assert r0.num_train_batches() == r1.num_train_batches()
    a = torch.cat([x for x, _ in r0.train_batches(0)])
    b = torch.cat([x for x, _ in r1.train_batches(0)])
    assert not set(map(tuple, a.tolist())) & set(map(tuple, b.tolist()))


def test_regression_metrics_match_sklearn():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(0)
    true = rng.normal(size=50) * 10 + 3
    pred = true + rng.normal(size=50) * 4
    m = regression_metrics(pred, true)
    assert m["mse"] == pytest.approx(mean_squared_error(true, pred))
    assert m["mae"] == pytest.approx(mean_absolute_error(true, pred))
    assert m["r2"] == pytest.approx(r2_score(true, pred))
    assert regression_metrics(np.full(50, true.mean()), true)["r2"] == pytest.approx(0.0)


def test_training_step_statistics_and_bce_loss():
    torch.manual_seed(0)
    cfg, task = _task("digits-binary")
    model = task.build_model()
    x, y = next(task.train_batches(0))
    out = task.training_step(model, (x, y))
    logits = model(x).squeeze(-1)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float()))
    assert out.stats["count"] == len(y)
    assert out.stats["correct"] == ((logits > 0).long() == y).sum()


@pytest.mark.parametrize(
    "recipe,sets,check",
    [
        ("digits-binary", ["epochs=8"], lambda m: m["test_accuracy"] >= 0.95),
        ("diabetes-regression", ["epochs=40"], lambda m: m["test_r2"] >= 0.4),
    ],
)
def test_short_training_runs_reach_the_bar(tmp_path, capsys, recipe, sets, check):
    from duboko.train.engine import fit

    cfg = C.resolve(recipe, sets)
    metrics = fit(cfg, tmp_path / "run", quiet=True)
    assert check(metrics), metrics
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    if recipe == "diabetes-regression":
        for key in ("test_mse", "test_mae", "test_r2", "test_loss", "test_baseline_mse"):
            assert key in saved
        assert saved["test_mse"] < saved["test_baseline_mse"]  # beats predicting the train mean
        assert (tmp_path / "run" / "predictions.png").is_file()
    else:
        assert "test_accuracy" in saved and "test_loss" in saved
        assert (tmp_path / "run" / "confusion_matrix.png").is_file()
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "report.txt").is_file()
    assets = json.loads((tmp_path / "run" / "tabular.json").read_text())
    assert len(assets["x_scaler"]["mean"]) == cfg.model["in_features"]
    # `duboko eval` on the run folder reproduces the test metrics from the saved weights
    from duboko.cli.main import main

    assert main(["eval", str(tmp_path / "run"), "--json", "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    key = "test_r2" if recipe == "diabetes-regression" else "test_accuracy"
    assert evaluated[key] == pytest.approx(saved[key], abs=1e-6)


def test_bad_loss_and_dataset_names_list_valid_ones():
    with pytest.raises(DubokoError, match="expected one of: auto, cross_entropy, bce, mse|expected one of: auto, bce, cross_entropy, mse"):
        C.resolve("digits", ["loss=hinge"])
    with pytest.raises(DubokoError, match="expected one of"):
        _task("digits", "data.dataset=iris")
    with pytest.raises(DubokoError, match="expected one of: adam, adamw, rmsprop, sgd"):
        C.resolve("digits", ["optimizer=lion"])
    with pytest.raises(DubokoError, match="valid fields|valid keys"):
        C.resolve("digits", ["model.depth=3"])
