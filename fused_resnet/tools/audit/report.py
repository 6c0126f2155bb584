"""The tail audit's tables: per op and pass in units of T, per model stage in MB with the
projected time on a GPU."""
from __future__ import annotations

from ..common import OP_PASSES, PASS_LABELS, render_table
from .plans import BASIS_LABELS
from .tails import OPS


def table_value(value) -> str:
    """A table cell: '-' for no figure, floats to 2 decimals, ints as they are."""
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def format_op_table(data: dict) -> str:
    """Per op and pass, in units of T: fused and eager measured, beside minimum and budgets."""
    by_key = {}
    for a in data["ops"]:
        by_key[(a["op"], a["pass_"], a["channels_last"])] = a
    header = ["op", "pass", "minimum", "fused", "(NCHW)", "budget", "eager 1-pass", "eager impl", "budget",
              "eager/fused", "launches fused/eager", "fused other bytes"]
    rows, over_budget, over_minimum = [], [], []
    for op in OPS:
        for pass_ in OP_PASSES[op]:
            cl, nchw = by_key[(op, pass_, True)], by_key[(op, pass_, False)]
            f = cl["figures"]
            figures = [f["minimum"], f["fused"], nchw["figures"]["fused"], f["fused_budget"], f["eager_one_pass"],
                       f["eager_implementation"], f["eager_budget"], f["eager_implementation"] / f["fused"]]
            rows.append([op, PASS_LABELS[pass_], *map(table_value, figures),
                         f"{f['fused_launches']} ({f['fused_kernel_launches']} Triton) / {f['eager_launches']}",
                         f["fused_other_bytes"]])
            kernels = ", ".join(dict.fromkeys(cl["kernel_launches"]))
            if f["fused_budget"] is not None and f["fused"] > f["fused_budget"] + 1e-9:
                over_budget.append(f"{op} {PASS_LABELS[pass_]}: {f['fused']:.2f} T > budget {f['fused_budget']} T "
                                   f"({kernels})")
            elif f["fused"] > f["minimum"] + 1e-9:
                over_minimum.append(f"{op} {PASS_LABELS[pass_]}: {f['fused']:.2f} T vs minimum {f['minimum']} T")
    shape = "x".join(map(str, data["ops"][0]["shape"]))
    title = (f"Memory traffic per fused op, in T = bytes of one activation tensor (measured at {shape}, "
             f"{data['settings']['dtype']}, channels_last; NCHW beside it)")
    legend = ("minimum: least traffic without holding an activation on chip (training: statistics / gradient sums "
              "before the elementwise pass; eval: one pass). fused: unique bytes the Triton kernels load + store "
              "(interpreter, masked lanes excluded), plus any ATen op around them. eager 1-pass: each ATen op reads "
              "its inputs and writes its outputs once; eager impl: plus batch norm's second pass (training forward "
              "re-reads x; backward re-reads grad and, in training, x). Budgets: the design figures. launches: Triton "
              "launches + ATen ops around them (fused) / ATen ops (eager; on a GPU one ATen op may launch several "
              "kernels). other bytes: per-channel parameters, statistics and partial sums (not in T). "
              "eager/fused: eager impl / fused.")
    text = [title, render_table(header, rows), legend]
    text.append("Over the design budget: " + ("; ".join(over_budget) if over_budget
                                                else "none (every budgeted fused op measured within its budget)"))
    if over_minimum:
        text.append("Above the minimum (no budget set): " + "; ".join(over_minimum) + ". The interpreter executes "
                    "every load, including loads a compiled kernel drops as dead, so these are upper bounds.")
    return "\n".join(text)


def format_stage_table(data: dict) -> str:
    """Per model, stage and pass at the real shapes: MB moved, launches, projected time on a GPU."""
    peak = data["gpu_peak_bandwidth_bytes_per_s"]
    s = data["settings"]
    header = ["model", "stage", "pass", "blocks", "fused MB", "eager MB 1-pass", "eager MB impl", "minimum MB",
              "eager/fused", "launches/block fused/eager", f"proj. us fused/eager ({data['gpu_name']})", "kernel plan"]
    rows = []
    for st in data["stages"]:
        rows.append([st["model"], st["stage"], PASS_LABELS[st["pass_"]], st["blocks"], f"{st['fused'] / 1e6:.1f}",
                     f"{st['eager_one_pass'] / 1e6:.1f}", f"{st['eager_implementation'] / 1e6:.1f}",
                     f"{st['minimum'] / 1e6:.1f}", f"{st['eager_implementation'] / st['fused']:.2f}",
                     f"{st['fused_launches_last_block']} / {st['eager_launches_last_block']}",
                     f"{st['fused'] / peak * 1e6:.0f} / {st['eager_implementation'] / peak * 1e6:.0f}",
                     BASIS_LABELS[st.get("plan_basis", "scaled")]])
    title = (f"BatchNorm/add/ReLU traffic per ResNet stage at batch {s['batch']}, {s['resolution']}x{s['resolution']}, "
             f"{s['dtype']} (activation bytes only; convolutions excluded, identical in both)")
    legend = (f"Per-T ratios measured in the interpreter at (2, C, <={s['max_hw']}, <={s['max_hw']}) for every "
              f"(op, channels) of the stage, scaled to the real shapes analytically (activation bytes are linear in "
              f"the activation size). PROJECTION, not a measurement: proj. us = bytes / peak bandwidth of "
              f"{data['gpu_name']} ({peak / 1e12:.2f} TB/s), a lower bound on the tails' time. kernel plan: the "
              f"reduction / elementwise plans (kernels/layout.py) the figures were measured with; "
              f"'{BASIS_LABELS['scaled']}': the small shape's plans differ from the real shape's in tiling only "
              f"(traffic-relevant plan fields: {_plan_fields(data)}), so the ratios hold at the real shape; "
              f"'{BASIS_LABELS['real_plan']}': measured at a larger shape that gets the real shape's plan. Both "
              f"plans of every tail are in the JSON (stages[].plans).")
    return "\n".join([title, render_table(header, rows), legend])


def _plan_fields(data: dict) -> str:
    fields = [f"{kind}.{name}" for kind, names in data.get("traffic_plan_fields", {}).items() for name in names]
    return ", ".join(fields) or "none"


def format_audit(data: dict) -> str:
    return format_op_table(data) + "\n\n" + format_stage_table(data)

