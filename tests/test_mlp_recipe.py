"""The mnist-mlp recipe resolves, trains end to end on a few MNIST images, and takes --set."""

import json

from duboko import config as C


def test_recipe_resolves_with_overrides():
    cfg = C.resolve("mnist-mlp", ["hidden_sizes=[256,128]", "activation=tanh"])
    assert cfg.task == "image-classification"
    assert cfg.model["hidden_sizes"] == [256, 128] and cfg.model["activation"] == "tanh"
    assert cfg.model["in_features"] == 784
    assert (cfg.data.image_size, cfg.data.channels, cfg.data.rotation) == (28, 1, 0.0)


def test_tiny_training_run(tmp_path):
    from duboko.train.engine import fit

    cfg = C.resolve("mnist-mlp", ["epochs=1", "limit_train=512", "limit_test=256", "batch_size=64",
                                  "log_grad_norms=true"])
    metrics = fit(cfg, tmp_path / "run", quiet=True)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    header = (tmp_path / "run" / "history.csv").read_text().splitlines()[0]
    assert "grad_norm_hidden.fc1" in header and "grad_norm_head" in header
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["name"] == "mlp-mnist"
