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
