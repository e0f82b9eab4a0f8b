"""The `backdoor` task end to end: a tiny poisoned MY_NET learns the trigger (high attack
success), `detect-backdoor` recalls most poisons, and training without the flagged rows removes
the attack; plus the config checks and the exclusion file."""

from __future__ import annotations

import json

import pytest
import torch

from duboko import config as C
from duboko.cli.main import main
from duboko.errors import DubokoError
from duboko.tasks.backdoor import POISON_FILE, BackdoorTask, read_exclude

# MY_NET on 16×16 inputs (fc1 128·4·4 → 512): trains in seconds; the trigger is stamped on the
# raw 28×28 image first (4×4 patch, still ~2×2 pixels after the resize).
TINY = ["model.image_size=16", "data.image_size=16", "data.limit_train=1500", "data.limit_test=500",
        "data.poison_rate=0.04", "data.trigger_size=4", "train.epochs=2", "train.batch_size=32",
        "train.precision=fp32", "train.num_threads=1", "data.eval_batch_size=500"]


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory):
    from duboko.train.engine import fit

    out = tmp_path_factory.mktemp("bd") / "run"
    metrics = fit(C.resolve("mnist-backdoor", TINY), out, quiet=True)
    return out, metrics


def test_recipe_resolves_with_the_committed_defaults():
    cfg = C.resolve("mnist-backdoor")
    assert cfg.task == "backdoor" and cfg.data.poison_rate == 0.01 and cfg.data.target_class == 0
    assert cfg.model["name"] == "my_net_28" and cfg.data.rotation == 0


@pytest.mark.parametrize("override, message", [
    ("data.poison_rate=1.0", "poison_rate"),
    ("data.target_class=10", "target_class"),
    ("data.trigger_location=center", "trigger_location"),
    ("data.trigger_size=30", "does not fit"),
    ("data.dataset=folder", "data.dataset"),
])
def test_bad_configs_are_refused(override, message):
    with pytest.raises(DubokoError, match=message):
        C.resolve("mnist-backdoor", [override])


def test_the_poisoned_model_learns_the_backdoor(poisoned_run):
    out, metrics = poisoned_run
    assert metrics["poisoned_samples"] == 60 and metrics["poisoned_in_training"] == 60
    assert metrics["test_accuracy"] >= 0.8  # clean images still classified
    assert metrics["attack_success_rate"] >= 0.9  # triggered ones go to class 0
    saved = json.loads((out / POISON_FILE).read_text())
    assert len(saved["poisoned"]) == 60 and saved["target_class"] == 0
    assert POISON_FILE in json.loads((out / "manifest.json").read_text())["sha256"]
    assert "attack success rate" in (out / "report.txt").read_text()


def test_detect_and_retrain_remove_the_backdoor(poisoned_run, tmp_path, capsys):
    out, _ = poisoned_run
    clean_file = tmp_path / "flagged.json"
    picture = tmp_path / "signature.png"
    assert main(["detect-backdoor", str(out), "--write-clean", str(clean_file), "--json", "--out", str(picture)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["poisoned"] == 60 and result["flagged"] == 90
    assert result["recall"] >= 0.8, result  # measured 0.967 (58 of 60)
    flagged = json.loads(clean_file.read_text())["exclude"]
    assert len(flagged) == 90
    poisoned = set(json.loads((out / POISON_FILE).read_text())["poisoned"])
    assert len(poisoned & set(flagged)) == result["found"]
    # the same file twice without --overwrite is refused
    assert main(["detect-backdoor", str(out), "--write-clean", str(clean_file)]) == 2
    capsys.readouterr()

    # --retrain: the run's own config with data.exclude set to the flagged rows, trained into OUT
    assert main(["detect-backdoor", str(out), "--retrain", str(tmp_path / "clean"), "--json"]) == 0
    retrained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["retrained"]
    metrics = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert retrained["attack_success_rate"] == metrics["attack_success_rate"]
    assert json.loads((tmp_path / "clean-exclude.json").read_text())["exclude"] == flagged
    assert metrics["excluded_samples"] == 90
    assert metrics["poisoned_in_training"] == 60 - result["found"]
    assert metrics["attack_success_rate"] < 0.2, metrics["attack_success_rate"]  # measured 0.011 (seed 0)


def test_detect_backdoor_refuses_other_runs(tmp_path, capsys):
    from duboko.train.engine import fit

    fit(C.resolve("mnist-mlp", ["epochs=1", "max_steps=2", "limit_train=256", "limit_test=64", "batch_size=64"]),
        tmp_path / "mlp", quiet=True)
    assert main(["detect-backdoor", str(tmp_path / "mlp")]) == 2
    assert "needs a backdoor run" in capsys.readouterr().err


def test_exclusion_files_are_validated(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"exclude": [3, 1, 3]}))
    assert read_exclude(path, 10).tolist() == [1, 3]
    path.write_text(json.dumps([0, 9]))
    assert read_exclude(path, 10).tolist() == [0, 9]
    for bad, message in (({"exclude": [10]}, "outside"), ({"exclude": ["a"]}, "no list"), ({"rows": [1]}, "no list"),
                         ([True], "no list")):
        path.write_text(json.dumps(bad))
        with pytest.raises(DubokoError, match=message):
            read_exclude(path, 10)


def test_poisoned_rows_follow_the_exclusion(tmp_path):
    cfg = C.resolve("mnist-backdoor", ["data.limit_train=300", "data.limit_test=50", "data.poison_rate=0.1"])
    task = BackdoorTask(cfg, torch.device("cpu"))
    task.setup()
    poisoned = task.poison.poisoned.tolist()
    assert len(poisoned) == 30 and task.poisoned_rows().tolist() == poisoned
    images, labels = task.splits["train"]
    assert (labels[poisoned] == 0).all() and (images[poisoned][:, 24:27, 24:27] == 255).all()
    assert (task.splits["test"][0][:, 24:27, 24:27] != 255).any()  # the test split stays clean
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"exclude": poisoned[:10] + [0, 1]}))
    cfg2 = C.resolve("mnist-backdoor", ["data.limit_train=300", "data.limit_test=50", "data.poison_rate=0.1",
                                        f"data.exclude={path}"])
    task2 = BackdoorTask(cfg2, torch.device("cpu"))
    task2.setup()
    assert len(task2.splits["train"][0]) == 300 - len(set(poisoned[:10] + [0, 1]))
    kept = task2.rows[task2.poisoned_rows()].tolist()
    assert kept == poisoned[10:]
