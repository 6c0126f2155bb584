"""Which kernel plans a per-stage figure is measured with: the small shape the interpreter
measures for a real stage shape, grown until its traffic-relevant plan is the real shape's."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

# Fields of the kernels' plans (kernels/layout.py) that change how many times an activation
# is read or written, not only how it is tiled. None today: every reduction plan reads each
# element once per pass and every elementwise plan touches it once, whatever its tiles and
# partial counts, so per-T ratios measured at a small shape hold at the real one. A plan
# that, say, keeps a channel on chip for a single-read kernel at small H*W names its field here.
TRAFFIC_PLAN_FIELDS: dict[str, tuple[str, ...]] = {"reduction": (), "elementwise": ()}
# The largest activation (elements) the interpreter is asked to measure when looking for a
# small shape that gets the real shape's plan.
MAX_MATCHED_ELEMENTS = 2**18


def kernel_plans(shape: Sequence[int], channels_last: bool = True) -> dict:
    """The reduction and elementwise plans the kernels choose for an activation of ``shape``."""
    from fused_resnet.kernels.layout import Layout, elementwise_plan, reduction_plan

    N, C, H, W = shape
    layout = Layout(N, C, H * W, channels_last)
    return {"reduction": asdict(reduction_plan(layout)), "elementwise": asdict(elementwise_plan(layout))}


def traffic_plan(plans: dict) -> dict:
    """The traffic-relevant part of ``plans`` (the fields named in ``TRAFFIC_PLAN_FIELDS``)."""
    return {kind: {name: plans[kind][name] for name in fields} for kind, fields in TRAFFIC_PLAN_FIELDS.items()}


def audit_shape(shape: Sequence[int], batch: int = 2, max_hw: int = 4) -> tuple[int, int, int, int]:
    """The small shape the interpreter measures for a real stage shape: its channels, a
    couple of images, and at most max_hw x max_hw pixels."""
    _, C, H, W = shape
    return (batch, C, min(H, max_hw), min(W, max_hw))


def _growing_shapes(small: Sequence[int], real: Sequence[int]):
    """Shapes from ``small`` towards ``real``: H and W doubled first (capped at the real size), then N."""
    N, C, H, W = small
    while True:
        yield (N, C, H, W)
        if (N, H, W) == tuple(real[:1]) + tuple(real[2:]):
            return
        if (H, W) != tuple(real[2:]):
            H, W = min(2 * H, real[2]), min(2 * W, real[3])
        else:
            N = min(2 * N, real[0])


@dataclass
class PlanChoice:
    """Which kernel plans one tail's per-stage figure used.

    ``basis``: ``scaled`` (measured at the small shape, whose plans differ from the real
    shape's in tiling only: the per-T ratio is the real shape's), ``real_plan`` (measured at
    the smallest shape that gets the real shape's traffic-relevant plan) or ``unmatched``
    (no shape up to ``MAX_MATCHED_ELEMENTS`` gets it: the figure is not valid for the real shape).
    """

    op: str
    real_shape: tuple[int, ...]
    measured_shape: tuple[int, ...]
    channels_last: bool
    basis: str
    real_plans: dict
    measured_plans: dict
    traffic_fields: dict

    @property
    def label(self) -> str:
        return BASIS_LABELS[self.basis]


BASIS_LABELS = {"scaled": "small-shape plan, same traffic", "real_plan": "real-shape plan",
                "unmatched": "PLAN DIFFERS: not valid"}


def plan_choice(op: str, real_shape: Sequence[int], channels_last: bool = True, max_hw: int = 4) -> PlanChoice:
    """The shape to measure ``real_shape``'s tail at, and the plans either shape gets.

    Starts from :func:`audit_shape`; when its traffic-relevant plan differs from the real
    shape's, grows it (see :func:`_growing_shapes`) until they agree, within ``MAX_MATCHED_ELEMENTS``.
    """
    real_shape = tuple(real_shape)
    real_plans = kernel_plans(real_shape, channels_last)
    wanted = traffic_plan(real_plans)
    small = audit_shape(real_shape, max_hw=max_hw)
    for shape in _growing_shapes(small, real_shape):
        if int(np.prod(shape)) > MAX_MATCHED_ELEMENTS:
            break
        plans = kernel_plans(shape, channels_last)
        if traffic_plan(plans) == wanted:
            basis = "scaled" if shape == small else "real_plan"
            return PlanChoice(op, real_shape, shape, channels_last, basis, real_plans, plans, TRAFFIC_PLAN_FIELDS)
    return PlanChoice(op, real_shape, small, channels_last, "unmatched", real_plans,
                      kernel_plans(small, channels_last), TRAFFIC_PLAN_FIELDS)

