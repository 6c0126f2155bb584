"""1x1 convolutions with BatchNorm fused into their GEMMs, as autograd ops.

Public functions (arguments as ``F.conv2d`` and ``F.batch_norm``; x is (N, C, H, W)):

- ``conv1x1_bn_relu(x, conv_weight, conv_bias, <bn>, ...)`` =
  ``relu(F.batch_norm(F.conv2d(x, conv_weight, conv_bias, stride), <bn>) [+ residual])``
- ``bn_relu_conv1x1(x, <bn>, conv_weight, conv_bias, ...)`` =
  ``F.conv2d(relu(F.batch_norm(x, <bn>)), conv_weight, conv_bias, stride)``

On the Triton path (channels_last input; see ``backend``) they run the kernels of
``kernels/conv1x1_bn/``: in training the convolution's GEMM writes y and the batch
statistics of y in its epilogue (the BatchNorm's statistics pass disappears), or applies
relu(bn(x)) to its input tiles as it loads them (the normalised activation is never
written, nor saved: the backward recomputes it). In eval conv + bn + (add) + relu is
one kernel. Elsewhere (CPU, float64, NCHW inputs) they are eager PyTorch's own
sequence, bitwise.

Ops underneath, each a ``torch.library`` custom op with a fake implementation:
``fused_resnet::conv1x1_forward`` / ``conv1x1_backward`` (tied by ``Conv1x1Function``;
``conv1x1_pair_backward`` for two convolutions of one input, ``Conv1x1PairFunction``),
``fused_resnet::conv1x1_bn_eval`` (inference only), ``fused_resnet::batch_stats`` and
``fused_resnet::bn_add_relu_with_stats`` (whose backward is ``bn_add_relu_backward``).
``conv1x1`` / ``batch_stats`` / ``bn_add_relu_with_stats`` are the pieces the
Bottleneck in ``nn/blocks.py`` (FusedConvBottleneck) is built from.

Modules: ``ops`` (the custom ops, their fake implementations and the TF32 rule) and
``autograd`` (the autograd Functions over them, the Bottleneck's pieces and the two
public functions).
"""
from .autograd import (
    Conv1x1Function,
    Conv1x1PairFunction,
    OutputStats,
    Prologue,
    batch_stats,
    bn_add_relu_with_stats,
    bn_relu_conv1x1,
    check_conv1x1_args,
    conv1x1,
    conv1x1_bn_eval,
    conv1x1_bn_relu,
    conv1x1_pair,
    eval_prologue,
    running_invstd,
)
from .ops import allow_tf32

__all__ = ["bn_relu_conv1x1", "conv1x1_bn_relu"]
