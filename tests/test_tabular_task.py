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
    TabularTask.check(cfg)  # (config.resolve runs it too)
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
    # two ranks split every global batch without overlap: rank r takes its every other row
    r0 = TabularTask(cfg, torch.device("cpu"), rank=0, world_size=2)
    r1 = TabularTask(cfg, torch.device("cpu"), rank=1, world_size=2)
    r0.setup(), r1.setup()
    assert r0.num_train_batches() == r1.num_train_batches() == len(batches)
    for (xf, _), (x0, _), (x1, _) in zip(batches, r0.train_batches(0), r1.train_batches(0)):
        assert torch.equal(x0, xf[0::2]) and torch.equal(x1, xf[1::2])


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
    assert out.stats["accuracy"] == ((logits > 0).long() == y).sum()  # a per-row sum: the engine divides by count
    assert task.loss_name() == "bce" and task.shown_metric == "accuracy"
    _, regression = _task("diabetes-regression")
    assert regression.loss_name() == "mse" and regression.shown_metric == ""
    assert "accuracy" not in regression.training_step(regression.build_model(), next(regression.train_batches(0))).stats


def test_losses_are_known_from_the_config_where_the_data_set_tells():
    def allowed(recipe, *sets):
        return TabularTask.allowed_losses(C.resolve(recipe, list(sets)))

    assert allowed("digits") == ("cross_entropy",)
    assert allowed("digits-binary") == ("bce", "cross_entropy")  # positive_labels: a binary target
    assert allowed("breast-cancer") == ("bce", "cross_entropy")
    assert allowed("diabetes-regression") == ("mse",)
    assert allowed("breast-cancer", "data.problem=classification") == ("cross_entropy", "bce")
    assert allowed("digits", "data.problem=regression") == ("mse",)
    # A CSV's problem (with data.problem=auto) is only known from its rows: every loss passes the
    # config check, and `setup` refuses the one that does not fit.
    cfg = C.resolve("digits", ["data.dataset=csv", "data.path=x.csv", "data.target=y", "loss=mse"])
    assert TabularTask.allowed_losses(cfg) == ("cross_entropy", "bce", "mse")


def test_a_csv_target_decides_the_loss_at_setup(tmp_path):
    rows = "\n".join(f"{i % 7},{(i * 3) % 5},{'yes' if i % 2 else 'no'}" for i in range(60))
    (tmp_path / "t.csv").write_text("a,b,label\n" + rows + "\n")
    base = ["data.dataset=csv", f"data.path={tmp_path / 't.csv'}", "data.target=label"]
    cfg, task = _task("digits", *base)
    assert task.problem == "binary" and task.loss_name() == "bce" and cfg.model["out_features"] == 1
    with pytest.raises(DubokoError, match="train.loss='mse' does not fit a binary target"):
        _task("digits", *base, "loss=mse")
    with pytest.raises(DubokoError, match="train.label_smoothing"):
        _task("digits", *base, "label_smoothing=0.1")
    cfg, task = _task("digits", *base, "loss=cross_entropy", "label_smoothing=0.1")
    assert cfg.model["out_features"] == 2


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
