"""Float64 references for the fused ops, and per-dtype tolerances."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from fused_resnet import backend

# Where the tests put their tensors: the compiled kernels on a CUDA machine; here the CPU
# path, or the interpreter in the TRITON_INTERPRET=1 process.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# True where tensors on DEVICE go through the Triton kernels.
TRITON_PATH = DEVICE == "cuda" or backend.INTERPRET

# Tolerances against a float64 reference, per activation dtype: (atol, rtol).
# fp32 is limited by fp32 arithmetic. For fp16 / bf16 the Triton kernels round once (the
# output), but eager PyTorch, which the CPU path is, also rounds the BatchNorm output
# before the add: up to three half-ulp roundings of O(4) intermediates (ulp(4) is 2^-8
# in fp16 and 2^-5 in bf16), which can cancel to a small result.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (4e-2, 2e-2),
}
# Per-channel sums (weight / bias gradients, running statistics) accumulate in fp32.
PARAM_TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(actual, expected, dtype, name, params=False):
    """Compare ``actual`` with a float64 ``expected`` under the dtype's tolerance."""
    atol, rtol = (PARAM_TOLERANCES if params else TOLERANCES)[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name} ({dtype}): {m}")


def f64(t: Optional[torch.Tensor], grad: bool = False) -> Optional[torch.Tensor]:
    """A float64 leaf copy of t (None stays None)."""
    if t is None:
        return None
    out = t.detach().double().clone()
    return out.requires_grad_() if grad else out


def reference_bn(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked=None):
    """F.batch_norm with nn.BatchNorm2d's bookkeeping of num_batches_tracked / momentum=None."""
    if training and running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(num_batches_tracked)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.0 if momentum is None else momentum,
                        eps)


@contextlib.contextmanager
def forbid_host_sync():
    """Every Tensor method that copies a value to the host raises inside the block."""
    names = ["item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name}")
        return method

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def saved_bytes(module, x):
    """Bytes of the distinct tensors autograd saves in one training forward of ``module``."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())
