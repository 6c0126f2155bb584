"""The reference blocks of the seed notes (../shared/seeds/), copied faithfully, in English.

Not a test file: the tests of ``convert`` and the fused modules build models from these.
Each class says which note it comes from. Their quirks are kept on purpose, because
``convert`` must cope with them:

- ``ResBlk`` (note 000, first version) never returns: its forward gives ``None``.
- ``ResBlkStride`` (note 000, second version) applies its second ReLU *before* the
  shortcut add and has no ReLU after it, and prints the shapes it sees: ``convert``
  must leave it alone.
- ``Residual`` (note 001, d2l) adds in place (``Y += X``) and uses ``if self.conv3:``.
- ``ResidualConv3x3Shortcut`` (note 003) is the same block with a 3x3, padding-1
  ``conv3`` shortcut and an ``nn.ReLU(inplace=True)`` module for the last ReLU.
- ``residual_block`` (note 002) has bias-free 3x3 convs, an always-present 1x1 ``conv3``
  shortcut, and ``F.relu(x + out, True)``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResBlk(nn.Module):
    """Note 000, first version: shortcut ``extra`` = 1x1 conv + BatchNorm when channels change.

    As in the note, forward ends after the add: no ReLU and no ``return``.
    """

    def __init__(self, ch_in, ch_out):
        super(ResBlk, self).__init__()
        self.conv1 = nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(ch_out)
        self.conv2 = nn.Conv2d(ch_out, ch_out, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(ch_out)

        # extra is the shortcut: input ch_in channels, output ch_out channels.
        self.extra = nn.Sequential()
        # When in != out, a 1x1 conv changes the number of feature maps (not their size)
        # so that the element-wise add works.
        if ch_out != ch_in:  # [b,ch_in,h,w] => [b,ch_out,h,w]
            self.extra = nn.Sequential(
                nn.Conv2d(ch_in, ch_out, kernel_size=1, stride=1),
                nn.BatchNorm2d(ch_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.extra(x) + out


class ResBlkStride(nn.Module):
    """Note 000, second version: a ``stride`` argument; ReLU before the add, none after."""

    def __init__(self, ch_in, ch_out, stride=1) -> None:
        super().__init__()

        self.conv1 = nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(ch_out)
        self.conv2 = nn.Conv2d(ch_out, ch_out, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(ch_out)

        # A kernel of size 1.
        self.extra = nn.Sequential()
        if ch_out != ch_in:
            self.extra = nn.Sequential(
                # The stride matches the main path's, so the shortcut halves the size too.
                nn.Conv2d(ch_in, ch_out, kernel_size=1, stride=stride),
                nn.BatchNorm2d(ch_out)
            )

    def forward(self, x):
        print(f"before res, data size: {x.shape}")

        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        # Shortcut: element-wise add
        # x: [b, ch_in, h, w], out: [b, ch_out, h, w]

        res_value = self.extra(x)
        out = res_value + out
        print(f"after res, out size: {out.shape}")

        return out


class Residual(nn.Module):
    """Note 001 (d2l): conv3x3-BN-ReLU-conv3x3-BN, plus X (through a 1x1 conv3), then ReLU."""

    def __init__(self, input_channels, num_channels,
                 use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(input_channels, num_channels,
                               kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels,
                               kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels,
                                   kernel_size=1, stride=strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return F.relu(Y)


class ResidualConv3x3Shortcut(nn.Module):
    """Note 003: the d2l block with a 3x3, padding-1 ``conv3`` shortcut and a ReLU module."""

    def __init__(self, input_channels, num_channels, use_1x1conv=False, strides=1):
        super(ResidualConv3x3Shortcut, self).__init__()
        self.conv1 = nn.Conv2d(in_channels=input_channels, out_channels=num_channels, kernel_size=3,
                               stride=strides, padding=1)
        self.conv2 = nn.Conv2d(in_channels=num_channels, out_channels=num_channels, kernel_size=3, stride=1,
                               padding=1)
        self.relu = nn.ReLU(inplace=True)
        if use_1x1conv:
            # The size must match the main path's, so the stride is inherited.
            self.conv3 = nn.Conv2d(in_channels=input_channels, out_channels=num_channels, kernel_size=3,
                                   stride=strides, padding=1)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(num_features=num_channels)
        self.bn2 = nn.BatchNorm2d(num_features=num_channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.conv3:
            x = self.conv3(x)
        y = y + x
        return self.relu(y)


def conv3x3(in_channel, out_channel, stride=1):
    """Note 002."""
    return nn.Conv2d(in_channel, out_channel, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channel, out_channel, stride=1):
    """Note 002."""
    return nn.Conv2d(in_channel, out_channel, 1, stride=stride)


class residual_block(nn.Module):  # noqa: N801 - the note's name
    """Note 002: the residual block, whose shortcut is always a 1x1 conv."""

    def __init__(self, in_channel, out_channel):
        super(residual_block, self).__init__()
        stride = 1

        self.conv1 = conv3x3(in_channel, out_channel, stride=stride)
        self.bn1 = nn.BatchNorm2d(out_channel)  # normalisation

        self.conv2 = conv3x3(out_channel, out_channel)
        self.bn2 = nn.BatchNorm2d(out_channel)

        self.conv3 = conv1x1(in_channel, out_channel, stride=stride)
        # self.conv3 = nn.Conv2d(in_channel, out_channel, 3, stride = 1, padding=1)

    def forward(self, x):
        out = self.conv1(x)
        out = F.relu(self.bn1(out), True)
        out = self.conv2(out)
        # out = F.relu(self.bn2(out), True)
        out = self.bn2(out)

        x = self.conv3(x)
        return F.relu(x + out, True)


def resnet_block(input_channels, num_channels, num_residuals, first_block=False, residual=Residual):
    """Notes 001 / 003: ``num_residuals`` blocks; the first halves H and W unless ``first_block``."""
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(residual(input_channels, num_channels,
                                use_1x1conv=True, strides=2))
        else:
            blk.append(residual(num_channels, num_channels))
    return blk


def resnet18(residual=Residual):
    """Notes 001 / 003: the 1-channel ResNet-18 (b1..b5, global average pool, Linear(512, 10))."""
    b1 = nn.Sequential(nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
                       nn.BatchNorm2d(64), nn.ReLU(),
                       nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b2 = nn.Sequential(*resnet_block(64, 64, 2, first_block=True, residual=residual))
    b3 = nn.Sequential(*resnet_block(64, 128, 2, residual=residual))
    b4 = nn.Sequential(*resnet_block(128, 256, 2, residual=residual))
    b5 = nn.Sequential(*resnet_block(256, 512, 2, residual=residual))
    return nn.Sequential(b1, b2, b3, b4, b5,
                         nn.AdaptiveAvgPool2d((1, 1)),
                         nn.Flatten(), nn.Linear(512, 10))


# --------------------------------------------------------------------------------------
# Not in the notes: note 000's first ResBlk with the ending its text describes.


class ReturningResBlk(ResBlk):
    """Note 000's first ``ResBlk``, completed with the ``relu`` and ``return`` it forgot.

    It computes a residual block, but under names (``extra``) no fused twin has: convert
    rewrites its forward with torch.fx instead of replacing it.
    """

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.extra(x) + out
        return F.relu(out)


# --------------------------------------------------------------------------------------
# Helpers shared by the tests of the fused modules, convert and fold_bn (not from the notes).


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Moves every BatchNorm's running statistics and affine parameters away from their init.

    At init (mean 0, var 1, weight 1, bias 0) an eval-mode BatchNorm is nearly the identity,
    which would let a wrong eval path or a wrong fold pass unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            C = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(C, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(C, generator=g) + 0.5)
                m.bias.copy_(torch.randn(C, generator=g) * 0.1)
    return model


def forward_backward(model: nn.Module, x, seed: int = 1) -> dict:
    """One forward and backward: output, input gradient, parameter gradients and buffers, by name.

    The output must be finite (NaN would compare unequal, and makes CPU kernels crawl).

    The loss is ``sum(y * r)`` with a fixed random ``r``, so every output element sends back
    its own gradient (positive and negative, through every ReLU mask).
    """
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same random numbers for a forward that draws any (dropout)
    y = model(x)
    if y is None:
        return {"output": None}
    assert torch.isfinite(y).all(), "the model's output is not finite"
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    (y * r).sum().backward()
    result = {"output": y.detach(), "input.grad": x.grad}
    result.update({f"{name}.grad": p.grad for name, p in model.named_parameters() if p.grad is not None})
    result.update({name: b.clone() for name, b in model.named_buffers()})
    return result


def assert_results_match(actual: dict, expected: dict, tolerance: float = 0.0) -> None:
    """Same keys, and each tensor bitwise the original's (``tolerance`` 0), or within
    ``tolerance`` of it relative to the tensor's largest magnitude (``max|a - e| / max|e|``,
    a measure that does not blow up on the near-zero elements of a gradient)."""
    assert actual.keys() == expected.keys(), f"{sorted(actual.keys() ^ expected.keys())}"
    for key, want in expected.items():
        got = actual[key]
        if want is None:
            assert got is None, key
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, key
        if tolerance == 0.0:
            if not torch.equal(got, want):
                diff = (got.double() - want.double()).abs().max().item()
                raise AssertionError(f"{key} differs from the original's (max abs difference {diff:.3g})")
            continue
        scale = max(want.double().abs().max().item(), torch.finfo(torch.float32).tiny)
        error = (got.double() - want.double()).abs().max().item() / scale
        assert error <= tolerance, f"{key}: max|difference| / max|original| = {error:.3g} > {tolerance:.3g}"
