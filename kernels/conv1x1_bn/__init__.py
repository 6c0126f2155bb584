"""1x1 convolutions as GEMMs with BatchNorm in their prologue and epilogue.

In channels_last a 1x1 convolution (groups 1, no padding) is a plain matrix product:
the input is A[M, C_in] with one row per output pixel, M = N * H_out * W_out (stride 2
picks every other pixel by index arithmetic, no copy), the weight is W[C_out, C_in], and
the output Y[M, C_out] = A x W^T (+ bias) is the channels_last output itself. At ResNet
shapes these GEMMs are memory-bound, so extra elementwise work on their tiles is almost
free, while every pass it replaces is a full read or write of an activation.

Kernels, read top to bottom (the tiling follows Triton's matrix-multiplication tutorial):

1. ``conv1x1_forward_kernel``: Y = A x W^T (+ bias), with optionally
   - PROLOGUE: A is relu(bn(x)) of the previous BatchNorm, computed on each tile as it
     is loaded (fp32, rounded to the input dtype where eager PyTorch stores a), so a is
     never written;
   - STATS: per (M tile, channel) mean and M2 of the stored output, for the BatchNorm
     that follows; ``conv1x1_stats_merge_kernel`` merges them in a fixed order with
     Chan's formula, and ``bn_stats``' finalize derives invstd and updates the running
     statistics exactly as for any other BatchNorm;
   - EVAL_BN: the following BatchNorm folded from its running statistics, an optional
     residual add and a ReLU (eval: conv + bn + add + relu is this one kernel).
2. ``conv1x1_dgrad_kernel``: dA = dY x W. With a prologue, its epilogue applies the
   ReLU's backward (the mask recomputed from the saved x, bitwise the forward's) and
   writes g with the per-(M tile, channel) partial sums of g and g * (x - mean) that
   the BatchNorm backward needs; ``bn_add_relu``'s finalize and dx kernels then finish
   it in one elementwise pass. Optionally adds another gradient into dA, or reduces over
   a second convolution of the same input too (a block's conv1 and stride-1
   downsample), so x's gradient is written once and never summed in a pass of its own.
3. ``conv1x1_wgrad_kernel``: dW = dY^T x A with A recomputed from x in its prologue,
   split over M into fp32 partials that ``split_sum_kernel`` adds in a fixed order
   (plus the bias gradient, sum dY over M). No atomics anywhere: the same input gives
   the same bits on every run.

Tiles come from ``gemm_tiles``, a deterministic rule of the shape, dtype and target.
``kernels/aot.py``'s ``conv1x1_launches`` records the launches a FusedConvBottleneck makes.

Modules, read in this order: ``common`` (the helpers every kernel and launcher shares),
``plans`` (the tile rules, ``target_of``), ``forward`` (1), ``partials`` (the fixed-order
merges and sums of 1 and 3), ``backward`` (2, 3, and the prologue's BatchNorm backward),
``dgrad_wgrad`` (2 and 3 in one pass where the weight fits one program), ``autotune``.
"""
from .autotune import autotune_candidates, autotune_conv1x1
from .backward import (
    conv1x1_dgrad,
    conv1x1_dgrad_kernel,
    conv1x1_prologue_backward,
    conv1x1_wgrad,
    conv1x1_wgrad_kernel,
)
from .common import ConvGeometry, geometry_of
from .dgrad_wgrad import conv1x1_dgrad_wgrad, conv1x1_dgrad_wgrad_kernel
from .forward import conv1x1_forward, conv1x1_forward_kernel
from .partials import combining_levels, conv1x1_stats_finalize, conv1x1_stats_merge_kernel, split_sum_kernel
from .plans import (
    DGRAD_WGRAD_MAX_ACCUMULATORS,
    DGRAD_WGRAD_PROGRAMS,
    GEMM_MAX_BLOCK_M,
    INTERPRETER_TILES,
    RESNET50_CONV1X1,
    GemmTiles,
    dgrad_wgrad_block_n2,
    dgrad_wgrad_plan,
    dgrad_wgrad_tiles,
    gemm_tiles,
    input_precision,
    interpreter_plans_as,
    target_of,
    wgrad_plan,
    wgrad_splits,
)

__all__ = [
    "DGRAD_WGRAD_MAX_ACCUMULATORS", "DGRAD_WGRAD_PROGRAMS", "GEMM_MAX_BLOCK_M", "INTERPRETER_TILES",
    "RESNET50_CONV1X1", "ConvGeometry", "GemmTiles", "autotune_candidates", "autotune_conv1x1", "combining_levels",
    "conv1x1_dgrad", "conv1x1_dgrad_kernel", "conv1x1_dgrad_wgrad", "conv1x1_dgrad_wgrad_kernel", "conv1x1_forward",
    "conv1x1_forward_kernel", "conv1x1_prologue_backward", "conv1x1_stats_finalize", "conv1x1_stats_merge_kernel",
    "conv1x1_wgrad", "conv1x1_wgrad_kernel", "dgrad_wgrad_block_n2", "dgrad_wgrad_plan", "dgrad_wgrad_tiles",
    "gemm_tiles", "geometry_of", "input_precision", "interpreter_plans_as", "split_sum_kernel", "target_of",
    "wgrad_plan", "wgrad_splits",
]
