"""Bad input, edge shapes, NaN/Inf, host syncs, torch.compile and torch.export (property
tests: test_properties.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet import backend
from reference import DEVICE, TRITON_PATH, assert_close, f64, forbid_host_sync

C = 3


def bn_args(C=C, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    args = dict(running_mean=torch.randn(C, generator=g) * 0.1, running_var=torch.rand(C, generator=g) + 0.5,
                weight=torch.randn(C, generator=g), bias=torch.randn(C, generator=g))
    return {k: v.to(DEVICE) for k, v in args.items()}


def x_of(shape=(2, C, 4, 4), dtype=torch.float32):
    return torch.randn(shape).to(DEVICE, dtype)


# ------------------------------------------------------------------------ bad input

BAD_CALLS = [
    ("3-D input", lambda: fused_resnet.bn_relu(torch.randn(2, C, 4), **bn_args()), ValueError, "4D"),
    ("integer input", lambda: fused_resnet.bn_relu(torch.ones(2, C, 4, 4, dtype=torch.long), **bn_args()),
     NotImplementedError, "input"),
    ("bool input", lambda: fused_resnet.bn_relu(torch.ones(2, C, 4, 4, dtype=torch.bool), **bn_args()),
     NotImplementedError, "input"),
    ("channels vs running_mean", lambda: fused_resnet.bn_relu(x_of((2, 4, 4, 4)), **bn_args()), RuntimeError,
     "running_mean"),
    ("channels vs weight", lambda: fused_resnet.bn_relu(x_of(), **{**bn_args(), "weight": torch.ones(5)}),
     RuntimeError, "weight"),
    ("2-D bias", lambda: fused_resnet.bn_relu(x_of(), **{**bn_args(), "bias": torch.ones(1, C)}), RuntimeError,
     "bias"),
    ("integer running_var", lambda: fused_resnet.bn_relu(
        x_of(), **{**bn_args(), "running_var": torch.ones(C, dtype=torch.long)}), RuntimeError, "running_var"),
    ("eval without running stats", lambda: fused_resnet.bn_relu(x_of(), None, None), RuntimeError,
     "running_mean"),
    ("one value per channel", lambda: fused_resnet.bn_relu(x_of((1, C, 1, 1)), **bn_args(), training=True),
     ValueError, "more than 1 value per channel"),
    ("momentum=None without num_batches_tracked", lambda: fused_resnet.bn_relu(
        x_of(), **bn_args(), training=True, momentum=None), ValueError, "num_batches_tracked"),
    ("residual shape", lambda: fused_resnet.bn_add_relu(x_of(), x_of((2, C, 4, 5)), **bn_args()), RuntimeError,
     "residual"),
    ("residual dtype", lambda: fused_resnet.bn_add_relu(x_of(), x_of(dtype=torch.float64), **bn_args()),
     RuntimeError, "residual"),
    ("residual not a tensor", lambda: fused_resnet.bn_add_relu(x_of(), 1.0, **bn_args()), TypeError, "residual"),
    ("add_relu shapes", lambda: fused_resnet.add_relu(x_of(), x_of((1, C, 4, 4))), RuntimeError, "b"),
    ("add_relu integer", lambda: fused_resnet.add_relu(torch.ones(2, 2, dtype=torch.int32),
                                                       torch.ones(2, 2, dtype=torch.int32)), RuntimeError, "a"),
    ("dual: residual BN channels", lambda: fused_resnet.bn_add_bn_relu(
        x_of(), x_of(), *bn_args().values(), *bn_args(C=4).values()), RuntimeError, "r_running_mean"),
]
if torch.cuda.is_available():
    BAD_CALLS.append(("weight on another device", lambda: fused_resnet.bn_relu(
        x_of().cuda(), **{k: v.cuda() for k, v in bn_args().items()} | {"weight": torch.ones(C)}),
        RuntimeError, "weight"))
else:
    BAD_CALLS.append(("weight on the meta device", lambda: fused_resnet.bn_relu(
        x_of(), **{**bn_args(), "weight": torch.ones(C, device="meta")}), RuntimeError, "weight"))


@pytest.mark.parametrize("call,error,words", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_pytorch_error_naming_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call()


# ---------------------------------------------------------------------- edge shapes

EDGE_CASES = [
    ("empty batch, eval", (0, C, 4, 4), False),
    ("N=1, eval", (1, C, 5, 5), False),
    ("N=1 1x1, eval", (1, C, 1, 1), False),
    ("1x1 spatial, train", (4, C, 1, 1), True),
    ("C=1, train", (2, 1, 3, 3), True),
    ("wide C, train", (2, 1030, 2, 2), True),
]


def reference_bn_relu(x, args, training, residual=None):
    y = F.batch_norm(f64(x), f64(args["running_mean"]), f64(args["running_var"]), f64(args["weight"]),
                     f64(args["bias"]), training)
    return torch.relu(y if residual is None else y + f64(residual))


@pytest.mark.both
@pytest.mark.parametrize("shape,training", [c[1:] for c in EDGE_CASES], ids=[c[0] for c in EDGE_CASES])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_edge_shapes(shape, training, channels_last):
    args = bn_args(shape[1])
    x = x_of(shape)
    r = x_of(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = fused_resnet.bn_add_relu(x, r, **{k: v.clone() for k, v in args.items()}, training=training)
    assert_close(y, reference_bn_relu(x, args, training, r), torch.float32, "y")
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


@pytest.mark.both
def test_strided_inputs_of_no_standard_layout():
    """Sliced and permuted inputs are copied once to a dense layout, never read out of bounds."""
    args = bn_args()
    base = x_of((2, 6, 10, 9))
    cases = [base[:, 1::2, 2:8, ::3], base.permute(0, 1, 3, 2)[:, :C], base[:, :C].transpose(2, 3)]
    for x in cases:
        r = torch.randn_like(x)
        y = fused_resnet.bn_add_relu(x, r, **{k: v.clone() for k, v in args.items()}, training=True)
        assert_close(y, reference_bn_relu(x, args, True, r), torch.float32, "y")


# ------------------------------------------------------------------------- NaN, Inf


@pytest.mark.both
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nan_and_inf_propagate_as_in_pytorch(training, value):
    args = bn_args()
    x = x_of((2, C, 4, 4))
    x[1, 1, 2, 3] = value
    r = x_of((2, C, 4, 4))
    r[0, 2, 0, 0] = float("nan")
    y = fused_resnet.bn_add_relu(x, r, **{k: v.clone() for k, v in args.items()}, training=training)
    ref = torch.relu(F.batch_norm(x, *[v.clone() for v in args.values()], training=training) + r)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert_close(y[finite], ref[finite].double(), torch.float32, "finite part")


# ------------------------------------------------------------------- no host syncs




@pytest.mark.both
@pytest.mark.skipif(not TRITON_PATH, reason="the CPU path reads num_batches_tracked on the host (no device there)")
@pytest.mark.parametrize("momentum", [0.1, None])
def test_triton_path_makes_no_host_sync(momentum):
    """The Triton path reads no tensor value on the host (CUDA-graph capturable), momentum=None included."""
    args = bn_args()
    rargs = bn_args()
    x = x_of().requires_grad_()
    r = x_of().requires_grad_()
    nbt, rnbt = (torch.zeros((), dtype=torch.long, device=DEVICE) for _ in range(2))
    with forbid_host_sync():
        for training in (True, False):
            y = fused_resnet.bn_add_bn_relu(x, r, *args.values(), *rargs.values(), training=training,
                                            momentum=momentum, r_momentum=momentum, num_batches_tracked=nbt,
                                            r_num_batches_tracked=rnbt)
            y.backward(torch.ones_like(y))
            y = fused_resnet.add_relu(x, r)
            y.backward(torch.ones_like(y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_makes_no_host_sync():
    args = {k: v.cuda() for k, v in bn_args().items()}
    x = x_of().cuda().requires_grad_()
    r = x_of().cuda()
    nbt = torch.zeros((), dtype=torch.long, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = fused_resnet.bn_add_relu(x, r, **args, training=True, momentum=None, num_batches_tracked=nbt)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.both
@pytest.mark.skipif(not TRITON_PATH, reason="partitions the Triton reductions")
@pytest.mark.parametrize("target_programs", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_reduction_loops_over_rows_and_spans(monkeypatch, request, target_programs, channels_last):
    """A 70x70 image spans several pixel blocks and spans; few programs each loop over many rows."""
    from fused_resnet.kernels import layout

    monkeypatch.setattr(layout, "TARGET_PROGRAMS", target_programs)
    # Plans are cached per layout: none computed with the real constant, none kept with this one.
    layout.reduction_plan.cache_clear()
    request.addfinalizer(layout.reduction_plan.cache_clear)
    plan = layout.reduction_plan(layout.Layout(2, C, 70 * 70, channels_last))
    assert plan.rows_per_program > 1 and plan.blocks_per_span > 1 and plan.spans_per_image > 1
    args = bn_args()
    x = (x_of((2, C, 70, 70)) * 3 + 5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = args["weight"].clone().requires_grad_()
    y = fused_resnet.bn_relu(x, args["running_mean"].clone(), args["running_var"].clone(), w, args["bias"],
                             training=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = f64(x, True), f64(w, True)
    pre = F.batch_norm(x64, None, None, w64, f64(args["bias"]), True)
    pre.backward(torch.where(y > 0, dy, 0).double())
    assert_close(y, torch.relu(pre), torch.float32, "y")
    assert_close(x.grad, x64.grad, torch.float32, "dx")
    assert_close(w.grad, w64.grad, torch.float32, "dweight", params=True)


# -------------------------------------------------------------- compile and export


class TinyBlock(torch.nn.Module):
    """conv -> fused bn+add+relu with the input as shortcut."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(C, C, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(C)

    def forward(self, x):
        bn = self.bn
        return fused_resnet.bn_add_relu(self.conv(x), x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                        self.training, bn.momentum, bn.eps,
                                        num_batches_tracked=bn.num_batches_tracked)


@pytest.mark.skipif(backend.INTERPRET, reason="compiles the CPU path")
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_gives_the_same_numbers(compiler):
    import copy

    eager = TinyBlock().to(DEVICE)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=compiler)
    # Inductor generates its own code for whatever is not a fused op (on the CPU path,
    # the BatchNorm too), so its sums may be ordered differently.
    tol = dict(atol=1e-4, rtol=1e-4) if compiler == "inductor" else dict(atol=0, rtol=0)
    x = torch.randn(2, C, 8, 8, device=DEVICE)
    for step in range(2):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        ye.sum().backward()
        yc.sum().backward()
        torch.testing.assert_close(yc, ye, **tol)
        torch.testing.assert_close(xc.grad, xe.grad, **tol)
        torch.testing.assert_close(compiled_module.conv.weight.grad, eager.conv.weight.grad, **tol)
    torch.testing.assert_close(compiled_module.bn.running_mean, eager.bn.running_mean, **tol)
    assert int(compiled_module.bn.num_batches_tracked) == int(eager.bn.num_batches_tracked) == 2


@pytest.mark.both
def test_torch_export_in_eval_mode():
    """Exports without a break; on the Triton path the fused op is one node of the graph."""
    block = TinyBlock().to(DEVICE).eval()
    x = torch.randn(2, C, 8, 8, device=DEVICE)
    exported = torch.export.export(block, (x,))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert ("fused_resnet.bn_add_relu_forward.default" in targets) == TRITON_PATH
    torch.testing.assert_close(exported.module()(x), block(x))


def small_resnet():
    """A stem and two torchvision BasicBlocks, one with a conv + BatchNorm downsample."""
    from torchvision.models.resnet import BasicBlock

    downsample = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1, 2, bias=False), torch.nn.BatchNorm2d(8))
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               BasicBlock(4, 8, 2, downsample), BasicBlock(8, 8)).to(DEVICE)


@pytest.mark.both
def test_converted_model_compiles_fullgraph_with_the_same_numbers():
    import copy

    original = small_resnet()
    fused = fused_resnet.convert(copy.deepcopy(original))
    compiled_module = copy.deepcopy(fused)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    for step in range(2):
        outs = [m(x) for m in (compiled, fused, original)]
        for y in outs:
            y.sum().backward()
        # Compiling changes nothing: the fused ops are single graph nodes (or, on the CPU
        # path, the same ATen calls).
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(compiled_module[0].weight.grad, fused[0].weight.grad)
        assert_close(outs[1], outs[2].double(), torch.float32, "fused vs original")
    assert torch.equal(compiled_module[3].bn2.running_var, fused[3].bn2.running_var)


@pytest.mark.both
def test_converted_model_exports_in_eval_mode():
    import copy

    original = small_resnet().eval()
    fused = fused_resnet.convert(copy.deepcopy(original))
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    exported = torch.export.export(fused, (x,))
    assert_close(exported.module()(x), original(x).double(), torch.float32, "exported vs original")
