"""Memory-traffic audit: bytes the fused kernels move against the eager op sequence.

Nothing here needs a GPU. Bytes are counted, not assumed (the counters are
:mod:`fused_resnet.tools.traffic`):

- **Fused**: the Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``),
  and :class:`~fused_resnet.tools.traffic.TritonTrafficCounter` records the addresses every
  masked load and store touches (masked-off lanes excluded). Each launch contributes its
  *unique* bytes read and its unique bytes written, per buffer; summed over launches.
- **Eager**: :class:`~fused_resnet.tools.traffic.AtenTrafficMode`, a ``TorchDispatchMode``,
  sees every ATen op the eager sequence dispatches and counts its inputs as read and its
  outputs (and mutated arguments) as written: the *one-pass* count. Batch norm cannot be
  one pass: in training it reads its input twice (statistics, then normalisation) and its
  backward reads grad and input twice (reductions, then the elementwise pass; in eval the
  second pass reads grad only). The *implementation* count adds those re-reads.

Activation bytes (tensors the size of the activation, T) are reported apart from per-channel
parameters, statistics and partial sums, which the traffic budget leaves out. Activation
bytes are linear in the activation size as long as the kernels' plan (``kernels/layout.py``)
does not change traffic with the shape, so they are measured at small shapes (the
interpreter is slow) and reported per T; per-stage bytes at real shapes are those ratios
times the real T: a scaling, said so wherever it is printed. Each per-stage figure states
the plans it was measured with (:class:`PlanChoice`); where the real shape's plan differs
from the small shape's in a traffic-relevant field (``TRAFFIC_PLAN_FIELDS``), the tail is
measured at a shape that gets the real shape's plan.

The modules, in the order a figure is made: :mod:`.tails` (one op, one pass, one shape),
:mod:`.plans` (which kernel plans a per-stage figure uses), :mod:`.stages` (the run, per
stage at the real shapes), :mod:`.report` (its tables); with the 1x1 convolutions fused and
convolutions included, :mod:`.blocks` (one block at a small shape) and :mod:`.projection`
(blocks and stages at real shapes).
"""
from __future__ import annotations

from .blocks import (CONV_BLOCK_TARGETS, BlockAudit, audit_conv_block, audit_conv_bottleneck, format_block_table,
                     weight_grad_gemms, weight_grad_partial_bytes)
from .plans import (BASIS_LABELS, MAX_MATCHED_ELEMENTS, TRAFFIC_PLAN_FIELDS, PlanChoice, audit_shape, kernel_plans,
                    plan_choice, traffic_plan)
from .projection import (PLAN_TARGETS, ProjectedBlockAudit, StageConvTraffic, format_conv_tables, project_conv_block,
                         project_conv_stages)
from .report import format_audit, format_op_table, format_stage_table
from .stages import (PROJECTION_GPU_NAMES, PROJECTION_GPUS, AuditConfig, StageTraffic, run_audit, run_in_interpreter,
                     stage_traffic)
from .tails import OPS, FusedCounters, OpAudit, audit_op, eager_traffic, fused_traffic
