"""The pieces every 1x1-convolution GEMM kernel and launcher shares: the Triton helpers
(input-pixel addressing, the dtype rounding eager PyTorch does, the prologue's relu(bn(x))
operand, the dot, the grouped tile order) and, host side, the convolution's GEMM geometry
and the argument packing of the launchers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..bn_add_relu import ChannelNorm, _affine_args, normalize

# ------------------------------------------------------------------------------ kernel helpers


@triton.jit
def pixel_offsets(m, HWo, Wo, row_stride, stride_n, stride_h, stride_w, SAMPLED: tl.constexpr):
    """64-bit offset of the first channel of output pixel m's input pixel (row m of A).

    Dense NHWC: rows are contiguous (m * C). SAMPLED (stride > 1): m = (n, ho, wo)
    reads pixel (n, ho * s, wo * s); the strides passed already include s.
    """
    if SAMPLED:
        n = m // HWo
        r = m - n * HWo
        ho = r // Wo
        wo = r - ho * Wo
        return n.to(tl.int64) * stride_n + ho.to(tl.int64) * stride_h + wo.to(tl.int64) * stride_w
    return m.to(tl.int64) * row_stride


@triton.jit
def rounded(x, DTYPE: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """fp32 x rounded to DTYPE, to nearest (ties to even) as a GPU's conversion rounds.

    INTERPRETER_BF16: Triton's interpreter truncates fp32 -> bf16 casts (and its explicit
    "rtne" drops the carry into the exponent), so the rounding is done on the bits first.
    """
    if INTERPRETER_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


@triton.jit
def bn_relu_operand(x, mask, mean, scale, shift, DTYPE: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """a = relu(bn(x)) as eager PyTorch materialises it (fp32 math, rounded to DTYPE), and
    exactly 0 outside the tile's mask (a tail of K must add nothing to the dot)."""
    pre = normalize(x.to(tl.float32), mean[None, :], scale[None, :], shift[None, :])
    a = rounded(tl.where(pre < 0.0, 0.0, pre), DTYPE, INTERPRETER_BF16)  # NaN kept, as relu_stored
    return tl.where(mask, a, 0.0).to(DTYPE)


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """acc + a x b with fp32 accumulation.

    INTERPRETER_BF16: Triton's interpreter multiplies bf16 operands as their uint16
    storage, so they go in as fp32 (exact for bf16 products).
    """
    if INTERPRETER_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row tiles sharing each column sweep so the
    weight and input tiles they share stay in L2 (the tutorial's grouped ordering)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# ---------------------------------------------------------------------------- launcher helpers


@dataclass(frozen=True)
class ConvGeometry:
    """A 1x1 convolution's GEMM: M output pixels of an NHWC input, C_in -> C_out."""

    N: int
    C_in: int
    H: int
    W: int
    C_out: int
    stride: int

    @property
    def H_out(self) -> int:
        return (self.H - 1) // self.stride + 1 if self.H > 0 else 0

    @property
    def W_out(self) -> int:
        return (self.W - 1) // self.stride + 1 if self.W > 0 else 0

    @property
    def M(self) -> int:
        return self.N * self.H_out * self.W_out

    def row_args(self) -> tuple:
        """(HWo, Wo, row_stride, stride_n, stride_h, stride_w) of ``pixel_offsets`` on a
        dense NHWC input (strides from the shape: size-1 dims may have any stride)."""
        s, C = self.stride, self.C_in
        return (self.H_out * self.W_out, self.W_out, C, self.H * self.W * C, s * self.W * C, s * C)

    @property
    def sampled(self) -> bool:
        return self.stride > 1


def geometry_of(x: torch.Tensor, weight: torch.Tensor, stride: int) -> ConvGeometry:
    N, C_in, H, W = x.shape
    return ConvGeometry(N, C_in, H, W, weight.shape[0], stride)


def _nhwc_empty(shape, like: torch.Tensor, zeros: bool = False) -> torch.Tensor:
    """A channels_last tensor of ``shape`` in ``like``'s dtype and device, uninitialised or
    zeroed: allocated in that layout (an NCHW one made channels_last would be one more
    launch and a copy of the whole output)."""
    out = torch.empty(shape, device=like.device, dtype=like.dtype, memory_format=torch.channels_last)
    return out.zero_() if zeros else out


def _norm_args(norm: Optional[ChannelNorm], fallback: torch.Tensor) -> tuple:
    """``_affine_args`` of an optional norm: all four pointers the unread ``fallback`` without one."""
    return (fallback,) * 4 if norm is None else _affine_args(norm)


def _norm_flags(norm: Optional[ChannelNorm]) -> tuple[bool, bool]:
    return norm is not None and norm.weight is not None, norm is not None and norm.bias is not None


def _check_nhwc(name: str, t: torch.Tensor) -> None:
    # The kernels address NHWC from the shape; anything else would be read wrongly.
    if not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{name} must be a dense channels_last tensor")


def _interpreter_bf16(dtype: torch.dtype, target) -> bool:
    return target is None and dtype == torch.bfloat16
