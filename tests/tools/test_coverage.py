"""The ATen-level tail counter of ``fused_resnet.tools.coverage`` and its model builder.

The counter is checked on small hand-written forwards whose tails are known, written each
way eager code writes them (in place or not, through views, returned or read twice), and
against itself: a fake-tensor pass counts what a real pass counts. Counting a converted
model (0 left) needs the Triton path and is in the TRITON_INTERPRET=1 process.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_resnet.convert import convert
from fused_resnet.tools.coverage import (CoverageRow, TailCount, build_model, count_tails, coverage, example_input,
                                         format_coverage, output_tensors, triton_path_available)


class Forward(nn.Module):
    """Runs ``fn(self, x)``: a forward written inline by each test."""

    def __init__(self, fn, channels=4):
        super().__init__()
        self.fn = fn
        self.bn, self.bn_r = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.fn(self, x)


X = torch.randn(2, 4, 3, 3)

CASES = {
    # name: (forward, {kind: count})
    "bn_relu": (lambda m, x: m.conv(F.relu(m.bn(x))), {"bn_relu": 1}),
    "bn_relu_inplace": (lambda m, x: m.conv(torch.relu_(m.bn(x))), {"bn_relu": 1}),
    "bn_add_relu_inplace": (lambda m, x: m.conv(torch.relu_(m.bn(x).add_(x))), {"bn_add_relu": 1}),
    "bn_on_the_other_operand": (lambda m, x: m.conv(F.relu(x + m.bn(x))), {"bn_add_relu": 1}),
    "bn_add_bn_relu": (lambda m, x: m.conv(F.relu(m.bn(x) + m.bn_r(x))), {"bn_add_bn_relu": 1}),
    "add_relu": (lambda m, x: m.conv(F.relu(m.conv(x) + x)), {"add_relu": 1}),
    # Not tails: the intermediate is read by something else, or is what the forward returns.
    "bn_output_read_twice": (lambda m, x: (lambda b: m.conv(F.relu(b)) + b)(m.bn(x)), {}),
    "bn_output_read_through_a_view": (lambda m, x: (lambda b: m.conv(F.relu(b)) + b.view(-1).sum())(m.bn(x)), {}),
    "sum_read_twice": (lambda m, x: (lambda s: m.conv(F.relu(s)) + s)(m.bn(x) + x), {"bn_add_relu": 0}),
    "bn_returned": (lambda m, x: (m.bn(x), F.relu(m.bn_r(x))), {"bn_relu": 1}),
    "relu_of_a_conv": (lambda m, x: F.relu(m.conv(x)), {}),
    "scaled_add": (lambda m, x: m.conv(F.relu(torch.add(m.bn(x), x, alpha=2))), {}),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fake", [True, False], ids=["fake", "real"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_counter_on_known_forwards(case, fake, training):
    fn, expected = case
    count = count_tails(Forward(fn), X, training, fake=fake)
    for kind in ("bn_relu", "bn_add_relu", "bn_add_bn_relu", "add_relu"):
        assert getattr(count, kind) == expected.get(kind, 0), (kind, count)
    assert count.total == sum(expected.values()) and len(count.places) == count.total


def test_counter_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[1].train()
    state = copy.deepcopy(model.state_dict())
    for fake in (True, False):
        assert count_tails(model, torch.randn(2, 3, 4, 4), training=True, fake=fake).total == 1
    assert not model.training and model[1].training  # modes restored, one by one
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no statistic updated


@pytest.mark.parametrize("name,tails", [("resnet18", 17)])
def test_counter_on_torchvision_resnets(name, tails):
    model = build_model(name)
    x = example_input(model)
    assert x.shape == (2, 3, 32, 32)
    for training in (True, False):
        assert count_tails(model, x, training).total == tails


def test_a_converted_model_on_the_cpu_path_runs_every_tail_as_aten_ops():
    """Without the Triton path the fused ops run ATen's own ops: the counter sees them all,
    which is why counting a converted model needs the interpreter (or a GPU)."""
    if triton_path_available():
        pytest.skip("this process runs the fused ops on their Triton path")
    model = build_model("resnet18")
    x = example_input(model)
    converted = convert(copy.deepcopy(model))
    assert count_tails(converted, x, True).total == count_tails(model, x, True).total == 17
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        coverage(["resnet18"])


@pytest.mark.interpreter
def test_coverage_table_of_converted_models():
    built = ["resnet18", "hf:resnet-18"]
    rows = coverage(built + ["timm:no_such_model"])
    by_name = {row.model: row for row in rows}
    for name in built:
        row = by_name[name]
        assert row.error is None, row.error
        assert {m: row.original[m].total for m in ("train", "eval")} == {"train": 17, "eval": 17}
        assert {m: row.converted[m].total for m in ("train", "eval")} == {"train": 0, "eval": 0}
        assert row.converted["train"].fused_ops == 17
    assert "does not build" in by_name["timm:no_such_model"].error
    table = format_coverage(rows)
    assert "| resnet18 | 2x3x32x32 | 17 / 17 | 0 / 0 |" in table
    assert "| timm:no_such_model | - | skipped: does not build: ValueError: unknown timm model" in table


def test_format_coverage_says_why_a_row_has_no_counts():
    rows = [CoverageRow("timm:x", error="does not build: ImportError: no timm"),
            CoverageRow("m", (2, 3, 32, 32), {"train": TailCount(bn_relu=3), "eval": TailCount(add_relu=1)},
                        {"train": TailCount(), "eval": TailCount()})]
    assert format_coverage(rows).splitlines()[2:] == [
        "| timm:x | - | skipped: does not build: ImportError: no timm | - |", "| m | 2x3x32x32 | 3 / 1 | 0 / 0 |"]


def test_build_model_names():
    assert type(build_model("resnet18")).__name__ == "ResNet"
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        build_model("resnet19")
    with pytest.raises(ValueError, match="unknown transformers ResNet 'resnet-19'; choose from hf:resnet-18"):
        build_model("hf:resnet-19")
    with pytest.raises(ValueError, match="model must be a non-empty name"):
        build_model("")
    model = build_model("hf:resnet-18")
    assert model.config.layer_type == "basic" and model.config.depths == [2, 2, 2, 2]
    assert [t.shape for t in output_tensors(model.eval()(torch.randn(1, 3, 32, 32)))] == [(1, 512, 1, 1)] * 2


def test_example_input_is_the_smallest_size_the_model_accepts():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(40))  # needs at least 42x42
    assert example_input(model, batch=1).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="accepts none of the input sizes"):
        example_input(model, sizes=(16, 32))
