"""The bench harness on a few tiny batches: both modes, the JSON keys, the CLI and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from duboko import config as C
from duboko.bench import common
from duboko.bench.mnist import duboko_config, format_report, run_throughput, run_time_to_accuracy
from duboko.bench.reference import ReferenceConfig
from duboko.cli.main import main

TINY_REF = ReferenceConfig(batch_size=16, limit_train=48, limit_test=32)
TINY_SET = ["batch_size=16", "data.limit_train=48", "data.limit_test=32"]


def test_pair_ratios_and_summary():
    a = [{"seconds": 1.0, "images": 10}, {"seconds": 2.0, "images": 10}]
    b = [{"seconds": 0.5, "images": 10}, {"seconds": 1.0, "images": 10}]
    assert common.pair_ratios(a, b) == [2.0, 2.0]
    s = common.ratio_summary([1.0, 2.0, 4.0])
    assert s["median"] == 2.0 and s["geomean"] == 2.0 and s["min"] == 1.0 and s["max"] == 4.0
    assert common.rate(a) == pytest.approx(20 / 3)


def test_best_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    assert common.best_precision(cpu) == ("bf16" if common.cpu_bf16_native() else "fp32")
    hw = common.hardware(cpu)
    for key in ("cpu", "cpu_cores", "torch", "cpu_bf16_native", "torch_threads"):
        assert key in hw


def test_duboko_side_uses_the_fast_switches_and_the_same_model():
    cfg = duboko_config("mnist-cnn", ["epochs=1"], torch.device("cpu"), precision="fp32")
    assert cfg.train.channels_last and cfg.train.precision == "fp32" and cfg.train.batch_size == 64
    fast = C.resolve("mnist-cnn-fast")
    assert fast.model == C.resolve("mnist-cnn").model  # MY_NET unchanged


def test_throughput_mode_json_keys_and_equal_work():
    torch.manual_seed(0)
    r = run_throughput(pairs=2, window=1, warmup=1, overrides=TINY_SET, precision="fp32", reference=TINY_REF,
                       evaluate=True, subprocess=False, progress=False)
    for key in ("hardware", "settings", "reference", "duboko", "speedup", "speedup_pairs", "accuracy_gap_pp"):
        assert key in r
    for side in ("reference", "duboko"):
        s = r[side]
        assert s["images"] == 2 * 16 and len(s["windows"]) == 2
        assert s["images_per_s"] > 0 and "rss_peak_mb" in s["memory"]
        assert 0.0 <= s["test_accuracy"] <= 1.0 and s["test_after_steps"] == 3
    assert r["speedup"] == pytest.approx(r["duboko"]["images_per_s"] / r["reference"]["images_per_s"], rel=1e-2)
    text = format_report(r)
    assert "images/s" in text and "speed-up" in text and "hardware:" in text
    json.dumps(r)  # serialisable


def test_time_to_accuracy_mode_reports_reference_estimate():
    r = run_time_to_accuracy(0.01, fast_recipe="mnist-cnn-fast", overrides=TINY_SET + ["precision=fp32"],
                             window=2, reference_every=1, warmup=0, reference=TINY_REF, subprocess=False,
                             progress=False)
    d, ref = r["duboko"], r["reference"]
    assert d["reached_target"] and d["time_to_accuracy_s"] > 0
    assert d["evaluations"][0]["step"] == 3  # 48 images / batch 16: the epoch's end is evaluated
    assert ref["time_source"].startswith("estimated") and ref["train_images"] == 48
    assert ref["time_s"] == pytest.approx(5 * 48 / ref["images_per_s"], rel=0.02)
    assert r["speedup_time_to_accuracy"] == pytest.approx(ref["time_s"] / d["time_to_accuracy_s"], rel=0.02)
    assert "time-to-accuracy" in format_report(r)


@pytest.mark.slow  # spawns two worker processes that import torch
def test_cli_json_in_subprocess_workers(capsys):
    code = main(["bench", "mnist", "--json", "--pairs", "1", "--window", "1", "--warmup", "0", "--limit-train", "64",
                 "--limit-test", "16", "--set", "batch_size=16", "--precision", "fp32", "--no-progress"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["settings"]["subprocess"] is True
    assert r["reference"]["images"] == 64 and r["duboko"]["images"] == 16  # the primer's batch stays 64
    assert math.isfinite(r["speedup"])


@pytest.mark.parametrize("argv, words", [
    (["--pairs", "0"], "--pairs"),
    (["--precision", "fp8"], "fp8"),
    (["--recipe", "no-such-recipe"], "no-such-recipe"),
    (["--time-to-accuracy", "99.2"], "0.992"),
])
def test_cli_user_errors_are_one_line(capsys, argv, words):
    code = main(["bench", "mnist", "--in-process", *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_recipe_precision_auto_runs_in_the_bench():
    """`--precision recipe` with a recipe that says precision=auto: the bench resolves it as the
    engine does (it used to reach autocast unresolved and fail as if it were fp16)."""
    r = run_throughput(pairs=1, window=1, warmup=0, overrides=TINY_SET + ["precision=auto"], precision="recipe",
                       reference=TINY_REF, subprocess=False, progress=False)
    assert r["duboko"]["images"] == 16 and r["duboko"]["images_per_s"] > 0
