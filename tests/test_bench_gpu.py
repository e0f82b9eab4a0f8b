"""`duboko bench gpu`: the prepared GPU record. Without a GPU it refuses; `--device cpu --quick`
runs every part at tiny sizes to check the script end to end."""

from __future__ import annotations

import json

import pytest
import torch

from duboko.bench import gpu
from duboko.cli.main import main


def test_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the refusal only happens without one")
    assert main(["bench", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err


def test_dry_run_on_cpu_writes_every_part(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    # time to accuracy is covered by tests/test_bench_mnist.py; here the other three parts
    assert main(["bench", "gpu", "--device", "cpu", "--quick", "--skip", "accuracy", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DRY RUN" in text and "tokens/s" in text
    rec = json.loads(out.read_text())
    assert rec["dry_run"] and rec["quick"] and rec["skipped"] == ["accuracy"]
    assert set(rec["parts"]) == {"mnist", "gpt", "sample"}
    assert rec["parts"]["mnist"]["images_per_s"] > 0 and rec["parts"]["mnist"]["epochs"] == 1
    g = rec["parts"]["gpt"]
    assert g["items_per_s"] > 0 and g["flops_per_token"] > 0 and g["mfu"] is None  # no peak known for a CPU
    assert rec["parts"]["sample"]["images"] == 2


def test_peak_table_and_mfu_arithmetic():
    assert gpu.gpu_peak_tflops("NVIDIA H200") == 989.0
    assert gpu.gpu_peak_tflops("NVIDIA L40S") == 362.0 and gpu.gpu_peak_tflops("NVIDIA L4") == 121.0
    assert gpu.gpu_peak_tflops("Some Future GPU") is None
