"""What ``fused-resnet gpu`` concludes and writes: the verdict per goal (pure functions of the
measured figures), the markdown summary and the PNG chart."""
from __future__ import annotations

import os
import statistics
from typing import Callable, Optional, Sequence

from .bench import (ALL_VARIANTS, GRAPH_VARIANTS, MODE_LABELS, PLAIN_VARIANTS, CaseResult, Measurement, host_share,
                    panel_title, plot_stage_panel, stage_panels)
from .common import PASS_LABELS, format_figure, require

# The project's goals (issue 9).
KERNEL_BANDWIDTH_GOAL = 0.85  # fraction of the device's peak DRAM bandwidth, every fused kernel
FUSED_OVER_EAGER_GOAL = 1.15  # images/s, fused model over eager, every stage
FUSED_OVER_COMPILE_GOAL = 1.0  # images/s, the faster fused variant over torch.compile(eager), every stage

PASS, FAIL, NOT_MEASURED, NOT_JUDGED = "PASS", "FAIL", "not measured", "not judged"


def judge(value: Optional[float], goal: float) -> str:
    """PASS when ``value`` reaches ``goal``, FAIL below it, 'not measured' without a value."""
    if value is None:
        return NOT_MEASURED
    return PASS if value >= goal else FAIL


def combine(statuses: Sequence[str]) -> str:
    """One status for several: FAIL if any failed, PASS if all measured ones passed, else 'not measured'."""
    if FAIL in statuses:
        return FAIL
    return PASS if PASS in statuses else NOT_MEASURED


def kernel_label(k: dict) -> str:
    f = k["fused"]
    return f"{f['op']} {PASS_LABELS[f['pass_']]} {f['stage']} {f['dtype']} {f['memory_format']}"


def kernel_bandwidth_verdict(kernels: Sequence[dict], judged: bool, reason: str = "") -> dict:
    """Every fused kernel case at >= KERNEL_BANDWIDTH_GOAL of peak bandwidth?"""
    fractions = [(k, k["fused"]["fraction_of_peak"]) for k in kernels]
    measured = [(k, f) for k, f in fractions if f is not None]
    failing = [(k, f) for k, f in measured if f < KERNEL_BANDWIDTH_GOAL]
    out = {"goal": f"every fused kernel >= {KERNEL_BANDWIDTH_GOAL:.0%} of peak DRAM bandwidth",
           "cases": len(kernels), "judged_cases": len(measured), "passing": len(measured) - len(failing),
           "min_fraction": min((f for _, f in measured), default=None),
           "median_fraction": statistics.median(f for _, f in measured) if measured else None,
           "worst": [f"{kernel_label(k)}: {f:.0%}" for k, f in sorted(failing, key=lambda kf: kf[1])[:5]]}
    if not judged:
        out.update(status=NOT_JUDGED, reason=reason)
    elif not measured:
        out.update(status=NOT_MEASURED, reason="no kernel case with a known peak bandwidth")
    else:
        out["status"] = combine([judge(f, KERNEL_BANDWIDTH_GOAL) for _, f in measured])
    return out


# Status key in stage_speedups: (its ratio, the goal, the goal's text); one verdict each.
STAGE_GOALS = {
    "eager_status": ("fused_over_eager", FUSED_OVER_EAGER_GOAL, "fused >= {:.2f}x eager per stage"),
    "graphed_status": ("fused_over_eager_graphed", FUSED_OVER_EAGER_GOAL,
                       "fused >= {:.2f}x eager per stage, both replayed from CUDA graphs (no host time)"),
    "compile_status": ("best_fused_over_compile", FUSED_OVER_COMPILE_GOAL, "fused >= {:.2f}x torch.compile per stage"),
}
STAGE_VERDICTS = {"stages_vs_eager": "eager_status", "stages_vs_eager_graphed": "graphed_status",
                  "stages_vs_compile": "compile_status"}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def stage_speedups(case: dict) -> dict:
    """fused / eager (plain, and both replayed from CUDA graphs), the faster of fused and
    compile(fused) over compile(eager), and each graphed variant's host share, of one stage case."""
    ips = {v: (case["variants"].get(v) or {}).get("images_per_s") for v in ALL_VARIANTS}
    candidates = {v: ips[v] for v in ("fused", "compile_fused") if ips[v]}
    best = max(candidates, key=candidates.get) if candidates else None
    out = {"stage": case["stage"], "mode": case["mode"], "images_per_s": ips,
           "fused_over_eager": _ratio(ips["fused"], ips["eager"]),
           "fused_over_eager_graphed": _ratio(ips["fused_graph"], ips["eager_graph"]),
           "best_fused_variant": best, "best_fused_over_compile": _ratio(ips.get(best), ips["compile"]),
           "host_share": {base: host_share(ips[base], ips[graph]) for graph, base in GRAPH_VARIANTS.items()}}
    for status, (ratio, goal, _) in STAGE_GOALS.items():
        out[status] = judge(out[ratio], goal)
    return out


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def stages_verdict(stages: Sequence[dict], planned: int, judged: bool, reason: str = "") -> dict[str, dict]:
    """One verdict per STAGE_VERDICTS entry over every stage case (fused vs eager, plain and from
    CUDA graphs; best fused vs compile), with how many cases fused ran faster at all (> 1x)."""
    per_case = [stage_speedups(c) for c in stages]
    verdicts = {}
    for name, key in STAGE_VERDICTS.items():
        ratio, goal, text = STAGE_GOALS[key]
        statuses = [c[key] for c in per_case]
        values = [c[ratio] for c in per_case if c[ratio] is not None]
        out = {"goal": text.format(goal), "planned_cases": planned, "judged_cases": len(values),
               "passing": statuses.count(PASS), "faster": sum(r > 1.0 for r in values),
               "min_ratio": min(values, default=None),
               "failing": [f"{c['stage']} {MODE_LABELS[c['mode']]}: {c[ratio]:.2f}x" for c in per_case
                           if c[key] == FAIL]}
        if key == "graphed_status":
            out["median_host_share"] = {base: _median([c["host_share"][base] for c in per_case])
                                        for base in GRAPH_VARIANTS.values()}
        if not judged:
            out.update(status=NOT_JUDGED, reason=reason)
        else:
            out["status"] = combine(statuses)
        verdicts[name] = out
    return verdicts


def conv1x1_stage(shape: Sequence[int]) -> str:
    """The ResNet-50 stage of a 1x1 convolution (C_in, H, W, C_out, stride) by its output size at 224x224."""
    ho = (shape[1] - 1) // shape[4] + 1
    return {56: "layer1", 28: "layer2", 14: "layer3", 7: "layer4"}.get(ho, f"{ho}x{ho}")


def conv1x1_verdict(gemms: Sequence[dict], stages: Sequence[dict], judged: bool, reason: str = "") -> dict:
    """Per stage: is the fused GEMM path (fuse_convolutions) faster than cuDNN + today's kernels? Yes when
    its train step (and eval, where measured) beats the fused variant's; the GEMMs' summed time vs cuDNN's
    sequence alongside."""
    per_stage: dict[str, dict] = {}
    for g in gemms:
        entry = per_stage.setdefault(conv1x1_stage(g["shape"]), {"fused_s": 0.0, "cudnn_s": 0.0})
        entry["fused_s"] += g["fused_s"]
        entry["cudnn_s"] += g["cudnn_s"]
    for e in per_stage.values():
        e["gemm_speedup_over_cudnn"] = e.pop("cudnn_s") / e.pop("fused_s") if e["fused_s"] else None
    for case in stages:
        ips = {v: (case["variants"].get(v) or {}).get("images_per_s") for v in ("fused", "fused_conv")}
        if ips["fused"] and ips["fused_conv"]:
            per_stage.setdefault(case["stage"], {})[f"{case['mode']}_over_fused"] = ips["fused_conv"] / ips["fused"]
    for e in per_stage.values():
        steps = [r for k, r in e.items() if k.endswith("_over_fused")]
        e["faster"] = None if not steps else all(r > 1.0 for r in steps)
    line = "fused GEMM path faster than cuDNN + today's kernels: " + (", ".join(
        f"{st} {'-' if e['faster'] is None else 'yes' if e['faster'] else 'no'}"
        for st, e in per_stage.items() if "faster" in e and st.startswith("layer")) or "no stage measured")
    out = {"goal": "fuse_convolutions train step and eval faster than fused (cuDNN 1x1 + fused tails) per stage",
           "per_stage": per_stage, "line": line}
    decided = [e["faster"] for e in per_stage.values() if e["faster"] is not None]
    if not judged:
        out.update(status=NOT_JUDGED, reason=reason)
    else:
        out["status"] = (FAIL if False in decided else PASS) if decided else NOT_MEASURED
    return out


def correctness_verdict(checks: dict) -> dict:
    """PASS when every check that ran passed; skipped and cut checks are listed, not counted."""
    failed = [name for name, c in checks.items() if c.get("passed") is False]
    ran = [name for name, c in checks.items() if c.get("passed") is not None]
    not_run = {name: c.get("reason") or c.get("status") for name, c in checks.items() if c.get("passed") is None}
    status = FAIL if failed else PASS if ran else NOT_MEASURED
    return {"goal": "right on the device: tests, no host sync, determinism, CUDA graphs, torch.compile, no spills",
            "status": status, "failed": failed, "passed": [n for n in ran if n not in failed], "not_run": not_run}


def verdicts(report: dict) -> dict:
    """Every goal's verdict from a report's figures; speed is judged only on a GPU, outside smoke runs."""
    judged = report["device_kind"] == "cuda" and not report["smoke"]
    reason = "" if judged else "smoke run: toy sizes on the CPU; its figures say nothing about GPU speed"
    checks = dict(report["correctness"])
    if report.get("device_aot"):
        checks["device_aot"] = report["device_aot"]
    return {"correctness": correctness_verdict(checks),
            "kernel_bandwidth": kernel_bandwidth_verdict(report["kernels"], judged, reason),
            **stages_verdict(report["stages"], report["settings"]["stage_cases"], judged, reason),
            "conv1x1": conv1x1_verdict(report.get("conv1x1", []), report["stages"], judged, reason)}


# --------------------------------------------------------------------------- markdown


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0%}"


def _verdict_detail(name: str, v: dict) -> str:
    if v["status"] == NOT_JUDGED:
        return v["reason"] + ("; " + v["line"] if name == "conv1x1" else "")
    if name == "correctness":
        text = f"passed: {', '.join(v['passed']) or '-'}"
        if v["failed"]:
            text += f"; FAILED: {', '.join(v['failed'])}"
        if v["not_run"]:
            text += "; not run: " + ", ".join(f"{k} ({r})" for k, r in v["not_run"].items())
        return text
    if name == "conv1x1":
        return v["line"]
    if name == "kernel_bandwidth":
        text = (f"{v['passing']} of {v['judged_cases']} cases; min {_pct(v['min_fraction'])}, "
                f"median {_pct(v['median_fraction'])} of peak")
        return text + (f"; worst: {'; '.join(v['worst'])}" if v["worst"] else "")
    text = (f"{v['passing']} of {v['judged_cases']} measured cases ({v['planned_cases']} planned); "
            f"min {format_figure(v['min_ratio'], '.2f')}x; faster at all (> 1x) in {v['faster']}")
    if "median_host_share" in v:
        text += "; host share (median): " + ", ".join(f"{b} {_pct(x)}" for b, x in v["median_host_share"].items())
    return text + (f"; below: {'; '.join(v['failing'])}" if v["failing"] else "")


def _check_result(name: str, c: dict) -> str:
    if c.get("passed") is None:
        return c.get("reason") or c.get("status", "-")
    if name == "pytest":
        return (f"{c['tests_passed']} passed, {c['tests_failed']} failed, {c['tests_errors']} errors, "
                f"{c['tests_skipped']} skipped"
                + (f"; failing: {', '.join(c['failures'][:5])}" if c["failures"] else "")
                + (" (cut by the time budget)" if c.get("status") == "cut" else ""))
    if name == "sync_debug":
        return f"{c['cases']} op/pass cases under set_sync_debug_mode('error')" + (
            f"; {'; '.join(c['failures'][:3])}" if c["failures"] else ", no host synchronisation")
    if name == "determinism":
        return (f"{c['model']} batch {c['batch']} train step twice ({c['path']}): bitwise {c['bitwise_equal']}"
                + (f" (eager bitwise {c['eager_bitwise_equal']})" if c["eager_bitwise_equal"] is not None else ""))
    if name == "ops_determinism":
        return (f"bn_relu, bn_add_relu, bn_add_bn_relu at {'x'.join(map(str, c['shape']))} twice ({c['path']}): "
                f"bitwise {c['bitwise_equal']}")
    if name == "cuda_graph":
        return (f"{c['model']} batch {c['batch']} train step captured and replayed: error "
                f"{c['replay_vs_uncaptured_error']:.1e} (tolerance {c['tolerance']:g}), bitwise {c['bitwise_equal']}, "
                f"statistics advanced {c['num_batches_tracked_advance']}")
    if name == "compile_fullgraph":
        return (f"{c['model']} batch {c['batch']} ({c['path']}, {c['backend']}): fullgraph, {c['graphs']} graph(s), "
                f"{c['fused_op_node_count']} fused-op nodes, compile "
                f"{c['compile_s']:.0f} s, error {c['compiled_vs_uncompiled_error']:.1e} (tolerance {c['tolerance']:g})")
    if name == "device_aot":
        return (f"{c['source']}: {len(c['specialisations'])} specialisations, "
                f"{sum(k['spills'] for k in c['kernels'].values())} spills")
    return "passed" if c["passed"] else "failed"


def _stage_rows(stages: Sequence[dict]) -> list[list]:
    rows = []
    for case in stages:
        s = stage_speedups(case)
        ips = s["images_per_s"]
        compile_s = [(case["variants"].get(v) or {}).get("compile_s") for v in ("compile", "compile_fused")]
        rows.append([case["stage"], MODE_LABELS[case["mode"]], *(format_figure(ips[v], ",.0f") for v in PLAIN_VARIANTS),
                     format_figure(s["fused_over_eager"], ".2f"), format_figure(s["best_fused_over_compile"], ".2f"),
                     " / ".join(format_figure(c, ".0f") for c in compile_s)])
    return rows


def _graph_rows(stages: Sequence[dict]) -> list[list]:
    rows = []
    for case in stages:
        s = stage_speedups(case)
        ips, share = s["images_per_s"], s["host_share"]
        rows.append([case["stage"], MODE_LABELS[case["mode"]],
                     *(cell for graph, base in GRAPH_VARIANTS.items() for cell in
                       (format_figure(ips[base], ",.0f"), format_figure(ips[graph], ",.0f"), _pct(share[base]))),
                     format_figure(s["fused_over_eager"], ".2f"), format_figure(s["fused_over_eager_graphed"], ".2f")])
    return rows


def _graph_section(stages: Sequence[dict]) -> list[str]:
    """The stages replayed from CUDA graphs beside the plain steps: the host share per variant and
    fused/eager both ways; the skip reasons where no graph was measured."""
    if not any(g in case["variants"] for case in stages for g in GRAPH_VARIANTS):
        return []
    lines = ["", "### The same steps replayed from CUDA graphs (no host time)", "",
             "`X graph`: the step of X captured once in a CUDA graph and replayed (same module, input, mode). "
             "host share: 1 - graph time / plain time, the part of the plain step the GPU waited on the host "
             "(Python, dispatch, launches); negative when the replay ran slower.", ""]
    lines += _table(["stage", "mode", *(h for graph, base in GRAPH_VARIANTS.items()
                                        for h in (f"{base} img/s", f"{graph} img/s", f"{base} host share")),
                     "fused/eager", "fused/eager graphed"], _graph_rows(stages))
    skips = sorted({f"{g}: {m['skipped']}" for case in stages for g, m in case["variants"].items()
                    if g in GRAPH_VARIANTS and m.get("skipped")})
    return lines + (["", "Not measured: " + "; ".join(skips)] if skips else [])


def _gb(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _range(values: Sequence[float], show: Callable[[float], str]) -> str:
    low, high = min(values), max(values)
    return show(low) if show(low) == show(high) else f"{show(low)}-{show(high)}"


def _kernel_table(kernels: Sequence[dict]) -> tuple[list[str], list[list]]:
    """One row per (op, pass), one column per (dtype, format): the fused kernels' fraction of peak
    (GB/s without a known peak) over the stages, and the median eager time / fused time."""
    combos = list(dict.fromkeys((k["fused"]["dtype"], k["fused"]["memory_format"]) for k in kernels))
    cells: dict[tuple, dict[tuple, list[dict]]] = {}
    for k in kernels:
        f = k["fused"]
        cells.setdefault((f["op"], f["pass_"]), {}).setdefault((f["dtype"], f["memory_format"]), []).append(k)
    rows = []
    for (op, pass_), by_combo in cells.items():
        row = [op, PASS_LABELS[pass_]]
        for combo in combos:
            group = by_combo.get(combo, [])
            if not group:
                row.append("-")
                continue
            fractions = [k["fused"]["fraction_of_peak"] for k in group if k["fused"]["fraction_of_peak"] is not None]
            figure = (_range(fractions, _pct) if fractions
                      else _range([k["fused"]["gb_per_s"] for k in group], _gb) + " GB/s")
            row.append(f"{figure} ({statistics.median(k['speedup_over_eager'] for k in group):.2f}x)")
        rows.append(row)
    return ["op", "pass", *(f"{d} {f}" for d, f in combos)], rows


def summary_markdown(report: dict) -> str:
    """The short summary: machine, verdict per goal, phases, and the figures behind each verdict."""
    m, v, s = report["machine"], report["verdict"], report["settings"]
    where = (f"{m.get('gpu')} ({m.get('sm_count', '?')} SMs, {m.get('memory_bytes', 0) / 2**30:.0f} GiB, "
             f"CUDA {m.get('cuda')})" if report["device_kind"] == "cuda"
             else f"CPU smoke run on {m.get('cpu')} (toy sizes; no GPU figure)")
    lines = [f"# fused-resnet gpu: {where}", "",
             f"{report['created']}; torch {m['torch']}, triton {m['triton']}, Python {m['python']}; "
             f"budget {report['budget_s']:.0f} s, took {report['elapsed_s']:.0f} s. Every figure is in gpu.json.", ""]
    if report["smoke"]:
        lines += ["**Smoke run**: every phase at toy sizes on the CPU (Triton's interpreter where kernels are "
                  "needed). It checks that the command works; its figures are CPU figures and no speed goal is "
                  "judged.", ""]
    names = {k: ("correct on the device" if k == "correctness" else v[k]["goal"]) for k in v}
    lines += ["## Verdict", ""] + _table(["goal", "verdict", "detail"],
                                         [[names[k], f"**{v[k]['status']}**", _verdict_detail(k, v[k])] for k in v])
    lines += ["", "## Phases", ""] + _table(
        ["phase", "status", "budget until (s)", "took (s)", "note"],
        [[name, p["status"], f"{p['deadline_s']:.0f}", format_figure(p.get("elapsed_s"), ".1f"), p.get("note", "")]
         for name, p in report["phases"].items()])
    checks = dict(report["correctness"])
    if report.get("device_aot"):
        checks["device_aot"] = report["device_aot"]
    lines += ["", "## Correctness", ""] + _table(
        ["check", "passed", "result"],
        [[name, {True: "yes", False: "**no**", None: "-"}[c.get("passed")], _check_result(name, c)]
         for name, c in checks.items()])
    if report.get("pytest_subset"):
        lines += ["", f"pytest subset: `{report['pytest_subset']}`"]
    if report["kernels"]:
        lines += ["", f"## Kernel bandwidth: fused ops alone at {s['model']} stage shapes, batch {s['batch']}, "
                      f"{s['resolution']}x{s['resolution']}", "",
                  f"Fused kernels' fraction of the peak DRAM bandwidth "
                  f"({format_figure((m.get('peak_bandwidth_bytes_per_s') or 0) / 1e12 or None, '.2f')} TB/s, "
                  f"{m.get('peak_bandwidth_source', 'CPU: no peak, GB/s instead')}), range over the stages; in "
                  f"brackets eager's time / fused's time (median). Bytes: the design traffic (fused) and the "
                  f"audit's count of eager's sequence (eager); per stage in gpu.json.", ""]
        if m.get("copy_bandwidth_bytes_per_s"):
            lines += [f"Measured reference: a {m['copy_bandwidth_bytes'] / 2**20:.0f} MiB device copy moves "
                      f"{m['copy_bandwidth_bytes_per_s'] / 1e12:.3f} TB/s (read + write)"
                      + (f", {m['copy_fraction_of_peak']:.0%} of the datasheet peak" if m.get("copy_fraction_of_peak")
                         else "") + ": a fused kernel at that rate is at what the DRAM gives.", ""]
        lines += _table(*_kernel_table(report["kernels"]))
    if report.get("conv1x1"):
        lines += ["", f"## 1x1-convolution GEMMs vs cuDNN's sequence, batch {s['batch']}, channels_last", "",
                  "Bytes: one read of each operand and one write of the result; cuDNN's sequence also runs the "
                  "BatchNorm/ReLU ops the GEMM fuses (var_mean for statistics, bn + relu for eval, bn + relu "
                  "of the input for conv3's prologue)."
                  + ("" if report["device_kind"] == "cuda" else " CPU figures: the GEMMs in Triton's interpreter, "
                     "'cuDNN' is ATen's CPU convolution; they say nothing about GPU speed."), ""]
        lines += _table(["pass", "C_in,H,W,C_out,stride", "dtype", "fused us", "cuDNN us", "cuDNN/fused",
                         "fused TFLOP/s", "fused GB/s", "cuDNN TFLOP/s", "cuDNN GB/s"],
                        [[PASS_LABELS.get(g["pass_"], g["pass_"]), ",".join(map(str, g["shape"])), g["dtype"],
                          f"{g['fused_s'] * 1e6:.1f}", f"{g['cudnn_s'] * 1e6:.1f}", f"{g['speedup_over_cudnn']:.2f}",
                          f"{g['fused_tflop_per_s']:.3g}", _gb(g["fused_gb_per_s"]), f"{g['cudnn_tflop_per_s']:.3g}",
                          _gb(g["cudnn_gb_per_s"])] for g in report["conv1x1"]])
    if report["stages"]:
        lines += ["", f"## Per-stage throughput: {s['model']}, batch {s['batch']}, "
                      f"{s['resolution']}x{s['resolution']}, "
                      f"{s['dtype']}, {s['memory_format']} (images/s)", ""]
        lines += _table(["stage", "mode", *(f"{v} img/s" for v in PLAIN_VARIANTS), "fused/eager",
                         "best fused/compile", "compile s (eager / fused)"], _stage_rows(report["stages"]))
        lines += _graph_section(report["stages"])
    if report["device_aot"] and report["device_aot"].get("kernels"):
        lines += ["", f"## Kernels as compiled ({report['device_aot']['source']})", ""]
        lines += _table(["kernel", "specialisations", "max registers", "max shared bytes", "spills"],
                        [[k, d["specialisations"], d["max_registers"], d["max_shared_bytes"], d["spills"]]
                         for k, d in report["device_aot"]["kernels"].items()])
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- chart


def _case_results(stages: Sequence[dict]) -> list[CaseResult]:
    """Stage records (CaseResult.to_json) back as CaseResults, for the stage panels."""
    out = []
    for c in stages:
        variants = {v: Measurement(m["seconds"], m.get("skipped"), m.get("compile_s"), m.get("capture_s"))
                    for v, m in c["variants"].items()}
        out.append(CaseResult(c["model"], c["stage"], c["mode"], c["dtype"], c["memory_format"], c["batch"],
                              c["resolution"], c["input_shape"], variants))
    return out


def _plot_kernel_panel(ax, kernels: Sequence[dict]) -> None:
    """Per (op, pass), a bar per (dtype, format): the fused kernels' median fraction of peak over the
    stages (GB/s without a known peak), the range as an error bar, eager's median as a black mark."""
    has_peak = any(k["fused"]["fraction_of_peak"] is not None for k in kernels)
    key = "fraction_of_peak" if has_peak else "gb_per_s"
    groups = list(dict.fromkeys((k["fused"]["op"], k["fused"]["pass_"]) for k in kernels))
    combos = list(dict.fromkeys((k["fused"]["dtype"], k["fused"]["memory_format"]) for k in kernels))
    width = 0.8 / max(len(combos), 1)
    colors = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78"]
    for i, combo in enumerate(combos):
        xs, mids, lows, highs, eager = [], [], [], [], []
        for j, group in enumerate(groups):
            cases = [k for k in kernels if (k["fused"]["op"], k["fused"]["pass_"]) == group
                     and (k["fused"]["dtype"], k["fused"]["memory_format"]) == combo]
            values = [k["fused"][key] or 0 for k in cases]
            if not values:
                continue
            mid = statistics.median(values)
            xs.append(j + (i - (len(combos) - 1) / 2) * width)
            mids.append(mid)
            lows.append(mid - min(values))
            highs.append(max(values) - mid)
            eager.append(statistics.median(k["eager"][key] or 0 for k in cases))
        ax.bar(xs, mids, width, yerr=[lows, highs], label=" ".join(combo), color=colors[i % len(colors)],
               error_kw={"elinewidth": 0.8})
        ax.plot(xs, eager, "k_", markersize=6, label="eager" if i == 0 else None)
    if has_peak:
        ax.axhline(KERNEL_BANDWIDTH_GOAL, color="#d62728", linestyle="--", linewidth=1, label="goal")
    ax.set_ylabel("fraction of peak bandwidth" if has_peak else "GB/s (CPU figures)")
    ax.set_xticks(range(len(groups)), [f"{op}\n{PASS_LABELS[p]}" for op, p in groups], fontsize=7)
    ax.set_title("fused ops alone (bars: median over the stages, range) vs eager's sequence (black)"
                 + ("" if has_peak else " - CPU figures, toy sizes"), fontsize=9)
    ax.legend(fontsize=7, ncol=3)


def _plot_conv1x1_panel(ax, gemms: Sequence[dict]) -> None:
    """cuDNN's time / the fused GEMM's per 1x1-convolution case (above 1: the GEMM is faster)."""
    if not gemms:
        ax.axis("off")
        return
    labels = [f"{g['pass_']}\n{','.join(map(str, g['shape']))}\n{g['dtype']}" for g in gemms]
    ax.bar(range(len(gemms)), [g["speedup_over_cudnn"] for g in gemms], color="#2ca02c")
    ax.axhline(1.0, color="#d62728", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(gemms)), labels, fontsize=5, rotation=90)
    ax.set_ylabel("cuDNN time / fused time")
    ax.set_title("1x1-convolution GEMMs vs cuDNN's sequence for the same work", fontsize=9)


def write_chart(path: str, report: dict) -> None:
    """One PNG: the fused kernels' fraction of peak bandwidth (GB/s on the CPU) per case, then
    images/s per stage for every variant, one panel per mode."""
    matplotlib = require("matplotlib", "writing the gpu chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = stage_panels(_case_results(report["stages"]))
    rows = 2 + max(len(panels), 1)
    fig, axes = plt.subplots(rows, 1, figsize=(12, 3.8 * rows), squeeze=False)
    _plot_kernel_panel(axes[0][0], report["kernels"])
    _plot_conv1x1_panel(axes[1][0], report.get("conv1x1", []))
    for ax, (key, group) in zip([a[0] for a in axes[2:]], panels.items()):
        plot_stage_panel(ax, group, panel_title(key))
    if not panels:
        axes[2][0].axis("off")
    where = report["machine"].get("gpu") or f"CPU smoke run ({report['machine'].get('cpu')})"
    fig.suptitle(f"fused-resnet gpu - {where}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
