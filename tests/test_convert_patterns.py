"""convert() on the residual patterns of issue 19, each as a small synthetic model:

1. one stateless module (nn.ReLU, nn.Identity, Dropout(p=0)) applied in several places;
2. the residual arriving as a forward argument (``block(x, shortcut)``, ``if shortcut is None``,
   a list of tensors with ``torch.cat`` and ``x += children[0]``, as timm's DLA and HRNet);
3. sums of more than two tensors before the ReLU (MobileOne / RepVGG branches, HRNet's fuse).

Each: every tail fused (the report lists nothing else skipped), a training step bitwise the
original's on the CPU path, within tolerance of a float64 copy through the interpreter (``both``).
Held out: a forward that writes an attribute when given its default stays as it is.
"""
from __future__ import annotations

import copy
from typing import List, Optional

import pytest
import torch
from torch import nn

import fused_resnet
from reference import DEVICE, TRITON_PATH

pytestmark = pytest.mark.both

C = 4
F64_TOLERANCE = 1e-4


def conv_bn(cin=C, cout=C, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.to(DEVICE)


def _step(model: nn.Module, x: torch.Tensor, training: bool) -> dict:
    model.train(training)
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y = torch.cat([t.flatten() for t in y]) if isinstance(y, (list, tuple)) else y
    g = torch.Generator().manual_seed(1)
    y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64).to(y))
    out = {"y": y.detach(), "dx": x.grad}
    out.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    out.update({f"buffer {n}": b.clone() for n, b in model.named_buffers()})
    return out


def assert_converted_matches(original: nn.Module, shape=(2, C, 8, 8)) -> fused_resnet.ConversionReport:
    """Converts a copy of ``original``; a training step and an eval step match it (bitwise on the
    CPU path, within F64_TOLERANCE of float64 on the Triton path). Returns the report."""
    original = _randomized(original)
    converted = fused_resnet.convert(copy.deepcopy(original))
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for training in (True, False):
        fused = _step(copy.deepcopy(converted), x, training)
        if TRITON_PATH:
            expected = _step(copy.deepcopy(original).double(), x.double(), training)
            for key, want in expected.items():
                if not want.is_floating_point():
                    assert torch.equal(fused[key], want), key
                    continue
                scale = max(want.abs().max().item(), 1e-30)
                assert (fused[key].double() - want).abs().max().item() <= F64_TOLERANCE * scale, key
        else:
            expected = _step(copy.deepcopy(original), x, training)
            for key, want in expected.items():
                assert torch.equal(fused[key], want), key
    return converted.fused_resnet_report


def skipped_batchnorms(report) -> List[str]:
    return [f"{e.name}: {e.detail}" for e in report.skipped]


# ------------------------------------------------------------------ 1. a stateless module in several places


class SharedStatelessBlock(nn.Module):
    def __init__(self, act: nn.Module, noop: nn.Module):
        super().__init__()
        self.a, self.b = conv_bn(), conv_bn()
        self.act, self.noop = act, noop

    def forward(self, x):
        out = self.act(self.noop(self.a(x)))
        return self.act(self.noop(self.b(out)) + x)


class SharedStateless(nn.Module):
    """One ReLU and one no-op, called at every tail, registered in the model and in each block."""

    def __init__(self, noop: nn.Module):
        super().__init__()
        self.act, self.noop = nn.ReLU(inplace=True), noop
        self.stem = conv_bn()
        self.blocks = nn.Sequential(SharedStatelessBlock(self.act, noop), SharedStatelessBlock(self.act, noop))

    def forward(self, x):
        return self.blocks(self.act(self.noop(self.stem(x))))


@pytest.mark.parametrize("noop", [nn.Identity, lambda: nn.Dropout(0.0)], ids=["identity", "dropout0"])
def test_one_stateless_module_in_several_places(noop):
    report = assert_converted_matches(SharedStateless(noop()))
    assert not report.skipped, str(report)
    assert sum(e.detail.count("BatchNorm") for e in report.fused) == 5, str(report)


# ------------------------------------------------------------------ 2. the residual as a forward argument


class ShortcutBlock(nn.Module):
    """timm's DlaBasic: the parent passes the shortcut, or nothing (then the input)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.relu = conv_bn(), conv_bn(), nn.ReLU(inplace=True)

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, children: Optional[List[torch.Tensor]] = None):
        if shortcut is None:
            shortcut = x
        out = self.relu(self.a(x))
        out = self.b(out)
        out += shortcut
        return self.relu(out)


class Root(nn.Module):
    """timm's DlaRoot: a list of tensors in, the first one the residual."""

    def __init__(self, n):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(n * C, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU(inplace=True)

    def forward(self, x_children: List[torch.Tensor]):
        x = self.bn(self.conv(torch.cat(x_children, 1)))
        x += x_children[0]
        return self.relu(x)


class Tree(nn.Module):
    """timm's DlaTree: a children list built up (``.append``) and handed down."""

    def __init__(self):
        super().__init__()
        self.project = conv_bn(k=1)
        self.tree1, self.tree2, self.root = ShortcutBlock(), ShortcutBlock(), Root(3)

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, children: Optional[List[torch.Tensor]] = None):
        if children is None:
            children = []
        children.append(x)
        x1 = self.tree1(x, self.project(x))
        x2 = self.tree2(x1)
        return self.root([x2, x1] + children)


class Branches(nn.Module):
    """timm's HighResolutionModule: a list in, its items replaced in place, a list out."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList([ShortcutBlock(), ShortcutBlock()])

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        for i, branch in enumerate(self.branches):
            x[i] = branch(x[i])
        return x


class ArgumentNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.tree, self.branches = Tree(), Branches()

    def forward(self, x):
        y = self.tree(x)
        a, b = self.branches([y, x])
        return a + b


def test_residual_as_a_forward_argument():
    report = assert_converted_matches(ArgumentNet())
    assert not report.skipped, str(report)
    assert sum(e.detail.count("BatchNorm") for e in report.fused) == 10, str(report)


class RecordingBlock(nn.Module):
    """Writes an attribute when its shortcut is the input: torch.fx would not record it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.conv2, self.bn2 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.relu = nn.ReLU()

    def forward(self, x, shortcut: Optional[torch.Tensor] = None):
        if shortcut is None:
            self.identity_calls = getattr(self, "identity_calls", 0) + 1
            shortcut = x
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + shortcut)


class RecordingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = RecordingBlock()

    def forward(self, x):
        return self.block(x)


def test_a_forward_that_writes_attributes_for_its_default_is_left_alone():
    model = _randomized(RecordingNet())
    converted = fused_resnet.convert(copy.deepcopy(model))
    report = converted.fused_resnet_report
    assert "its forward writes module attributes" in report.entry("block.bn2").detail, str(report)
    assert type(converted.block.bn2) is nn.BatchNorm2d and type(converted.block.bn1) is nn.BatchNorm2d


# ------------------------------------------------------------------ 3. sums of more than two tensors


class MultiBranch(nn.Module):
    """MobileOne / RepVGG at training time: branches summed in place, the identity BatchNorm last."""

    def __init__(self):
        super().__init__()
        self.identity = nn.BatchNorm2d(C)
        self.scale = conv_bn(k=1)
        self.kxk = nn.ModuleList([conv_bn(), conv_bn()])
        self.act = nn.ReLU()

    def forward(self, x):
        identity_out = self.identity(x)
        out = self.scale(x)
        for branch in self.kxk:
            out += branch(x)
        out += identity_out
        return self.act(out)


class FuseSum(nn.Module):
    """HRNet's fuse: ``y = y + f(x[j])`` over the branches, then one shared ReLU."""

    def __init__(self):
        super().__init__()
        self.fuse = nn.ModuleList([nn.ModuleList([conv_bn(), conv_bn(), conv_bn()]) for _ in range(2)])
        self.fuse_act = nn.ReLU()

    def forward(self, x):
        branches = [x, x * 2, x * 3]
        outs = []
        for fuse_outer in self.fuse:
            y = None
            for j, f in enumerate(fuse_outer):
                y = f(branches[j]) if y is None else y + f(branches[j])
            outs.append(self.fuse_act(y))
        return outs[0] + outs[1]


class RepVGGBranches(nn.Module):
    """RepVGG at training time: ``relu(dense(x) + one_by_one(x) + identity(x))``, identity last."""

    def __init__(self):
        super().__init__()
        self.dense, self.one_by_one, self.identity = conv_bn(), conv_bn(k=1), nn.BatchNorm2d(C)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.dense(x) + self.one_by_one(x) + self.identity(x))


@pytest.mark.parametrize("make", [RepVGGBranches, lambda: nn.Sequential(nn.ReLU(), RepVGGBranches(), RepVGGBranches())],
                         ids=["one", "chained"])
def test_sum_of_many_branches_fuses_the_last_add_and_its_batchnorm(make):
    report = assert_converted_matches(make())
    fused = [e.detail for e in report.fused]
    assert fused and all("identity -> BatchNormAddReLU2d" in d for d in fused), str(report)
    # The other terms stay separate adds, and the report says where each goes.
    assert all("goes to add()" in e.detail for e in report.skipped), str(report)


def test_sum_of_many_branches_with_the_batchnorm_moved_past_other_readers():
    """MobileOne: the identity BatchNorm runs first, its input feeds three more branches; moving it
    to the last add would change the order of x's gradient sum: add + ReLU alone are fused."""
    report = assert_converted_matches(MultiBranch())
    assert report.entry("").detail.endswith("(iadd() + ReLU -> add_relu)"), str(report)
    assert "moving it would change the order its gradient is summed in" in report.entry("identity").detail


def test_python_loop_sum_with_a_shared_relu():
    report = assert_converted_matches(FuseSum())
    assert report.fused[0].detail.count("BatchNormAddReLU2d") == 2, str(report)
