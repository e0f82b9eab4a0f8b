import pytest

from duboko import config as C
from duboko.errors import DubokoError


def test_recipe_resolves_to_the_primer_hyperparameters():
    cfg = C.resolve("mnist-cnn")
    t = cfg.train
    assert (t.epochs, t.batch_size, t.optimizer, t.lr, t.weight_decay) == (5, 64, "adam", 1e-3, 1e-4)
    assert cfg.model["name"] == "my_net" and cfg.model["dropout"] == 0.5
    d = cfg.data
    assert (d.image_size, d.channels, d.rotation, d.brightness, d.contrast) == (48, 3, 10.0, 0.2, 0.2)
    assert (d.mean, d.std) == (0.1307, 0.3081)


def test_overrides_bare_and_dotted_and_typed():
    cfg = C.resolve("mnist-cnn", ["epochs=1", "batch_size=128", "train.lr=3e-4", "model.dropout=0.1", "betas=[0.8, 0.9]"])
    assert cfg.train.epochs == 1 and cfg.train.batch_size == 128 and cfg.train.lr == 3e-4
    assert cfg.model["dropout"] == 0.1 and cfg.train.betas == [0.8, 0.9]
    assert C.parse_value("true") is True and C.parse_value("[256,128]") == [256, 128] and C.parse_value("tanh") == "tanh"


@pytest.mark.parametrize(
    "override, message",
    [
        ("foo=1", "unknown key 'foo'; valid keys: .*train.epochs"),
        ("epochs=many", "train.epochs expects an integer, got 'many'"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("optimizer=adamax", "unknown train.optimizer 'adamax'; expected one of: adam, adamw, rmsprop, sgd"),
        ("nosuch.x=1", "unknown section"),
        ("epochs", "expects key=value"),
        ("model.name=nope", "unknown model 'nope'"),
    ],
)
def test_bad_overrides_are_refused_with_the_valid_keys(override, message):
    with pytest.raises(DubokoError, match=message):
        C.resolve("mnist-cnn", [override])


def test_unknown_recipe_lists_known_ones(tmp_path):
    with pytest.raises(DubokoError, match="unknown recipe 'nope'; expected one of: .*mnist-cnn"):
        C.resolve("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("task = [")
    with pytest.raises(DubokoError, match="not valid TOML"):
        C.resolve(str(bad))


def test_config_round_trips_through_json():
    cfg = C.resolve("mnist-cnn", ["epochs=2"])
    again = C.resolve(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override", ["data.limit_train=-5", "data.rotation=nan", "data.std=0", "data.brightness=1.5"])
def test_bad_data_values_are_refused_before_training(tmp_path, override, capsys):
    """The task's `check` runs inside `resolve`: nothing is loaded and no run folder is made."""
    from duboko.cli.main import main

    with pytest.raises(DubokoError, match="data\\."):
        C.resolve("mnist-cnn", [override])
    assert main(["train", "mnist-cnn", "--set", override, "--out", str(tmp_path / "run")]) == 2
    assert "data." in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_bare_key_shared_by_data_and_model_sets_both():
    cfg = C.resolve("mnist-cnn", ["image_size=32"])
    assert cfg.data.image_size == cfg.model["image_size"] == 32


def test_a_bare_key_in_several_sections_must_be_dotted(tmp_path):
    """A key two sections have (and the task does not share) is ambiguous without its section."""
    from dataclasses import dataclass

    from duboko.registry import register_task
    from duboko.tasks import Task

    @dataclass
    class DropoutData:
        dropout: float = 0.0  # the same name as the model's field

    @register_task
    class AmbiguousTask(Task):
        name = "test-ambiguous-keys"
        data_config = DropoutData

    recipe = tmp_path / "amb.toml"
    recipe.write_text('task = "test-ambiguous-keys"\n[model]\nname = "my_net"\n')
    with pytest.raises(DubokoError, match="key 'dropout' is in several sections; write one of: model.dropout, data.dropout"):
        C.resolve(str(recipe), ["dropout=0.1"])
    assert C.resolve(str(recipe), ["data.dropout=0.1"]).data.dropout == 0.1
