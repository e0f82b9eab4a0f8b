"""The engine's process settings (threads, the CPU allocator) and the optimizer kernels."""

import platform

import pytest
import torch

from duboko.config import TrainConfig
from duboko.errors import DubokoError
from duboko.train import runtime
from duboko.train.optim import build_optimizer


def _flags(opt: torch.optim.Optimizer) -> tuple:
    group = opt.param_groups[0]
    return bool(group.get("fused")), bool(group.get("foreach"))


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_auto_picks_the_fused_kernel_on_cpu(optimizer):
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    assert _flags(opt) == (True, False)


def test_optimizer_impl_switches_and_refusals():
    model = torch.nn.Linear(3, 2)
    cpu = torch.device("cpu")
    assert _flags(build_optimizer(model, TrainConfig(optimizer_impl="foreach"), cpu)) == (False, True)
    assert _flags(build_optimizer(model, TrainConfig(optimizer_impl="loop"), cpu)) == (False, False)
    assert _flags(build_optimizer(model, TrainConfig(optimizer="rmsprop"), cpu)) == (False, True)  # no fused rmsprop
    with pytest.raises(DubokoError, match="optimizer_impl='fused'.*'rmsprop'"):
        build_optimizer(model, TrainConfig(optimizer="rmsprop", optimizer_impl="fused"), cpu)


def test_fused_and_loop_adam_take_the_same_steps():
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    cfg = dict(optimizer="adam", lr=1e-2, weight_decay=1e-4)
    opts = [build_optimizer(a, TrainConfig(**cfg, optimizer_impl="fused"), torch.device("cpu")),
            build_optimizer(b, TrainConfig(**cfg, optimizer_impl="loop"), torch.device("cpu"))]
    x = torch.randn(8, 5)
    for _ in range(5):
        for model, opt in zip((a, b), opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_configure_sets_threads_and_the_allocator():
    before = torch.get_num_threads()
    try:
        applied = runtime.configure(TrainConfig(num_threads=1), torch.device("cpu"))
        assert torch.get_num_threads() == 1 and applied["torch_threads"] == 1
        on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
        assert applied["retain_cpu_memory"] is on_glibc
        assert "retain_cpu_memory" not in runtime.configure(TrainConfig(retain_cpu_memory=False), torch.device("cpu"))
    finally:
        torch.set_num_threads(before)


def test_resumed_optimizer_state_takes_the_parameters_memory_format():
    """Fused Adam walks parameter and moments as flat memory: moments loaded contiguous beside a
    channels-last weight would silently pair the wrong elements."""
    from duboko.train.checkpoint import optimizer_from_flat, optimizer_to_flat

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    cfg = TrainConfig(optimizer="adam", lr=0.1)
    opt = build_optimizer(conv, cfg, torch.device("cpu"))
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    conv(x).square().mean().backward()
    opt.step()
    tensors, meta = optimizer_to_flat(opt)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}  # as read back from safetensors

    twin = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    twin.load_state_dict(conv.state_dict())
    opt2 = build_optimizer(twin, cfg, torch.device("cpu"))
    optimizer_from_flat(opt2, tensors, meta)
    assert opt2.state[twin.weight]["exp_avg"].stride() == twin.weight.stride()
    for model, o in ((conv, opt), (twin, opt2)):
        o.zero_grad()
        model(x).square().mean().backward()
        o.step()
    torch.testing.assert_close(twin.weight, conv.weight, rtol=0, atol=0)


# -- the CUDA-only paths, exercised on the CPU where torch allows it ---------------------------


def test_fp16_grad_scaler_path_takes_the_unscaled_step():
    """The fp16 path (scale the loss, unscale before clipping, scaler.step/update) is the
    engine's `apply_gradients` with a GradScaler; torch's CPU GradScaler runs the same code, so the
    step must equal the plain fp32 step (the scale is a power of two: exact)."""
    from duboko.train.engine import apply_gradients

    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    apply_gradients(torch.nn.functional.mse_loss(a(x), y), a, oa, grad_clip=0.5)
    apply_gradients(torch.nn.functional.mse_loss(b(x), y), b, ob, grad_clip=0.5, scaler=scaler)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    assert scaler.get_scale() == 2.0**10  # finite gradients: the scale stays until growth_interval


def test_fp16_needs_cuda_and_auto_follows_the_hardware(monkeypatch):
    from duboko.precision import best_precision, resolve_precision

    with pytest.raises(DubokoError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert best_precision(torch.device("cuda", 0)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert best_precision(torch.device("cuda", 0)) == "fp32"  # e.g. a V100 or T4: no bf16, fp32 (fp16 is opt-in)


def test_configure_on_cuda_turns_on_tf32_and_cudnn_autotuning(monkeypatch):
    """What `configure` does for a CUDA device, checked without one (set_device is stubbed)."""

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        applied = runtime.configure(TrainConfig(), torch.device("cuda", 0))
        assert calls == [torch.device("cuda", 0)] and "retain_cpu_memory" not in applied
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


def test_pinned_non_blocking_copy_to_cuda():
    """Pinned host memory and non-blocking host-to-device copies (the language-model task's
    batches): need a GPU to mean anything."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: pinned memory and non-blocking copies only exist with one")
    x = torch.arange(1024).pin_memory()
    y = x.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert x.is_pinned() and torch.equal(y.cpu(), x)


def test_hardware_features_line_names_the_cpu_kind_and_bf16(monkeypatch):
    from duboko.precision import cpu_bf16_native, hardware_features

    line = hardware_features(torch.device("cpu"))
    assert line.startswith("CPU ") and line.endswith("native bf16: " + ("yes" if cpu_bf16_native() else "no"))
    assert torch.backends.cpu.get_cpu_capability() in line
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware_features(torch.device("cuda", 0)) == "GPU NVIDIA H200, bf16: yes"
