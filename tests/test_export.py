"""A converted model leaves PyTorch as the original does: ONNX (both exporters) and torch.export.

The ONNX files are run with onnxruntime and compared with the original model in eval
(what a model exported for inference computes, also when it was in train mode: both
exporters export eval semantics). On the PyTorch path the model is torchvision's
resnet18 (32x32, batch 2); under ``TRITON_INTERPRET=1`` a stem and two torchvision
blocks (a downsample one and an identity one), since a whole ResNet through the
interpreter takes minutes.

Tolerance, fp32: atol 1e-4, rtol 1e-4 against the original's eager eval output. The
exported graph folds each BatchNorm into its convolution (ONNX's optimiser), which
rounds differently from eager BatchNorm; the largest difference measured here is 1.3e-6
(resnet18, PyTorch path) and 1.8e-7 (the blocks, interpreter).
"""
from __future__ import annotations

import copy

import onnx
import onnxruntime
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv

import fused_resnet
from fused_resnet import backend
from fused_resnet.export import standard_ops
from reference import TRITON_PATH
from seed_blocks import randomize_batchnorms

ONNX_TOL = dict(atol=1e-4, rtol=1e-4)
# Every op a ResNet's ONNX graph may hold, in the default domain: no custom op.
STANDARD_ONNX_OPS = {"Conv", "BatchNormalization", "Add", "Relu", "MaxPool", "GlobalAveragePool",
                     "AveragePool", "ReduceMean", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Gemm", "MatMul",
                     "Constant", "Identity"}


def small_model() -> nn.Module:
    """conv -> bn -> relu, then a torchvision BasicBlock with a (conv, bn) downsample and an
    identity one: bn_relu, bn_add_bn_relu and bn_add_relu, each fused by convert."""
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         tv.BasicBlock(8, 16, stride=2, downsample=downsample), tv.BasicBlock(16, 16))


def model_pair(training: bool):
    """(original, converted, input): the converted model shares nothing with the original."""
    torch.manual_seed(0)
    if TRITON_PATH:
        original, x = small_model(), torch.randn(2, 3, 8, 8)
    else:
        original, x = torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)
    original = randomize_batchnorms(original).train(training)
    converted = fused_resnet.convert(copy.deepcopy(original))
    return original, converted, x


def fused_op_count(model: nn.Module, x: torch.Tensor) -> int:
    """How many fused_resnet ops one eval forward of ``model`` records (0 on the CPU path)."""
    ep = torch.export.export(model, (x,))
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and "fused_resnet" in str(n.target))


@pytest.mark.both
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_onnx_export_is_standard_ops_and_matches(tmp_path, dynamo, training):
    original, converted, x = model_pair(training)
    buffers = {k: v.clone() for k, v in converted.state_dict().items()}
    path = tmp_path / "model.onnx"
    torch.onnx.export(converted, (x,), str(path), dynamo=dynamo, verbose=False)

    graph = onnx.load(str(path)).graph
    ops = {(node.domain, node.op_type) for node in graph.node}
    assert {domain for domain, _ in ops} <= {"", "ai.onnx"}, ops
    assert {op for _, op in ops} <= STANDARD_ONNX_OPS, ops
    assert {"Add", "Relu"} <= {op for _, op in ops}, ops
    # Exporting changes nothing: same mode, the running statistics untouched; the fused ops are back.
    assert converted.training == training
    for key, value in converted.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert not backend.standard_ops_wanted()

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = original.eval()(x)
    print(f"\nONNX ops {sorted(op for _, op in ops)}, max abs error {(torch.from_numpy(got) - expected).abs().max():.1e}")
    torch.testing.assert_close(torch.from_numpy(got), expected, **ONNX_TOL)


@pytest.mark.interpreter
def test_torch_export_keeps_fused_nodes_and_standard_ops_gives_aten():
    """torch.export of the Triton path: one fused node per tail; inside standard_ops(), none,
    and run_decompositions() gives core ATen ops only; both programs compute the model."""
    _, converted, x = model_pair(False)
    with torch.no_grad():
        expected = converted(x)
    assert fused_op_count(converted, x) == 5  # stem bn_relu; per block a bn_relu and the tail
    with standard_ops():
        assert backend.standard_ops_wanted()
        ep = torch.export.export(converted, (x,))
    assert not backend.standard_ops_wanted()
    targets = {str(n.target) for n in ep.run_decompositions().graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "fused_resnet" in t or "auto_functionalized" in t], targets
    assert all(t.startswith("aten.") or t == "<built-in function getitem>" for t in targets), targets
    assert any("batch_norm" in t for t in targets) and "aten.relu.default" in targets
    torch.testing.assert_close(ep.module()(x), expected, atol=1e-5, rtol=1e-5)
