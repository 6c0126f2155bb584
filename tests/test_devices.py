"""Every launch runs under its input's device, and the GEMMs plan for that device (issue 18, item 1).

A model on ``cuda:1`` while device 0 is current must launch on ``cuda:1``: Triton compiles
for, and launches on, the *current* device. Without two GPUs the tests record what the
one launch helper (``backend.launch_device``) enters and check, at every kernel launch
(recorded, not run), that the innermost device entered is the launch's tensors' device.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

import fused_resnet
from fused_resnet import backend
from fused_resnet.conv1x1_bn import bn_relu_conv1x1, conv1x1_bn_relu
from fused_resnet import sync_batchnorm as sync_module
from fused_resnet.kernels.conv1x1_bn import plans as conv_kernels
from fused_resnet.kernels.bn_stats import bn_stats_partial_kernel
from fused_resnet.nn import FusedConvBottleneck

C = 4


class DeviceRecorder:
    """Stands in for ``backend.launch_device`` and for the kernels' launch: records the device
    each launch finds entered, and the launches made outside their tensors' device."""

    def __init__(self):
        self.entered: list[torch.device] = []
        self.launches = 0
        self.outside: list[str] = []

    @contextlib.contextmanager
    def launch_device(self, t):
        self.entered.append(t.device)
        try:
            yield
        finally:
            self.entered.pop()

    def run(self, kernel, *args, grid, warmup, **kwargs):
        self.launches += 1
        devices = {a.device for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)}
        current = self.entered[-1] if self.entered else None
        if devices != {current}:
            self.outside.append(f"{kernel.fn.__name__}: tensors on {devices}, entered {current}")


@pytest.fixture
def recorder(monkeypatch):
    rec = DeviceRecorder()
    monkeypatch.setattr(backend, "launch_device", rec.launch_device)
    monkeypatch.setattr(backend, "use_triton", lambda t: t.dtype != torch.float64)
    # Every kernel object is of one class (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1).
    monkeypatch.setattr(type(bn_stats_partial_kernel), "run",
                        lambda kernel, *a, **k: rec.run(kernel, *a, **k))
    return rec


def _bn(C=C):
    return torch.nn.BatchNorm2d(C)


def _tails():
    """Every BatchNorm tail and add_relu, training and eval, forward and backward."""
    for training in (True, False):
        x = torch.randn(2, C, 3, 3, requires_grad=True)
        r = torch.randn(2, C, 3, 3, requires_grad=True)
        bn, bn_r = _bn(), _bn()
        args = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
        r_args = (bn_r.running_mean, bn_r.running_var, bn_r.weight, bn_r.bias)
        yield fused_resnet.bn_relu(x, *args, training=training)
        yield fused_resnet.bn_add_relu(x, r, *args, training=training)
        yield fused_resnet.bn_add_bn_relu(x, r, *args, *r_args, training=training)
    yield fused_resnet.add_relu(x, r)


def _gemms():
    """The 1x1-convolution ops and the Bottleneck built from them, training and eval."""
    x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(C, 8, 1, 1, requires_grad=True)
    bn = _bn()
    yield conv1x1_bn_relu(x, w, None, bn.running_mean, bn.running_var, bn.weight, bn.bias, True)
    bn8 = _bn(8)
    yield bn_relu_conv1x1(x, bn8.running_mean, bn8.running_var, bn8.weight, bn8.bias, True, 0.1,
                          1e-5, w)
    downsample = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, bias=False), torch.nn.BatchNorm2d(16))
    block = FusedConvBottleneck(8, 4, downsample=downsample)
    yield block(x)
    with torch.no_grad():
        block.eval()(x.detach())


def _sync(monkeypatch):
    """The synchronised op's own path (a world of two, the collectives stood in for)."""
    monkeypatch.setattr(sync_module, "sync_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", lambda parts, t, group=None: [p.copy_(t) for p in parts])
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: t)
    x = torch.randn(2, C, 3, 3, requires_grad=True)
    bn = _bn()
    yield fused_resnet.sync_bn_relu(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True)


@pytest.mark.both
@pytest.mark.parametrize("ops", ["tails", "gemms", "sync"])
def test_every_launch_runs_under_its_inputs_device(recorder, monkeypatch, ops):
    make = {"tails": _tails, "gemms": _gemms, "sync": lambda: _sync(monkeypatch)}[ops]
    for y in make():
        if y is not None and y.requires_grad:
            y.backward(torch.ones_like(y))
    assert recorder.launches > 0
    assert not recorder.outside, recorder.outside[:5]


def test_gemm_plans_for_the_inputs_device_not_the_current_one(monkeypatch):
    """``target_of(device)`` reads that device's capability (an H100 as cuda:1, an A100 current)."""
    capabilities = {0: (8, 0), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capabilities[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", None)
    conv_kernels._cuda_target.cache_clear()
    try:
        assert conv_kernels.target_of(torch.device("cuda", 1)).arch == 90
        assert conv_kernels.target_of(torch.device("cuda", 0)).arch == 80
        assert conv_kernels.target_of(torch.device("cuda")).arch == 80
        assert conv_kernels.target_of(torch.device("cpu")) is None
    finally:
        conv_kernels._cuda_target.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_launch_device_makes_the_inputs_device_current():
    last = torch.cuda.device_count() - 1
    with backend.launch_device(torch.empty(1, device=f"cuda:{last}")):
        assert torch.cuda.current_device() == last


def test_make_gpu_last_device_check_says_why_it_skips():
    from fused_resnet.tools.gpu_checks import check_last_device

    result = check_last_device("resnet18", 2, 32, "float32", "channels_last")
    if torch.cuda.device_count() < 2:
        assert result["passed"] is None and result["status"] == "skipped" and "two or more" in result["reason"]
    else:
        assert result["passed"], result
