"""Parity check: a converted torchvision ResNet against the original, forward and backward.

The reference is the eager model in float64 (the fused kernels take fp32 / fp16 / bf16
only). The eager model at the checked dtype is measured against the same reference, and
the fused model passes a group when its error is within the dtype's tolerance plus twice
eager PyTorch's own error: fused must be as accurate as eager at that dtype, not better.

Errors are max |value - reference| / max |reference| over a group (scale-free, so one
table covers logits, running statistics and gradients of every size).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .common import (DTYPES, MEMORY_FORMATS, STAGES, canonical_dtype, canonical_memory_format, convert_model,
                     progress, render_table, torchvision_resnet)

# Fewer values per channel than this make training-mode BatchNorm ill-conditioned: the
# gradient through its statistics loses digits in any precision, eager's included.
WELL_CONDITIONED_VALUES = 16
# Tolerance on the normalised max error, per checked dtype.
TOLERANCES = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
EAGER_ERROR_FACTOR = 2.0


@dataclass
class GroupError:
    """One output or gradient group: eager's and fused's error against the float64 reference."""

    group: str
    eager: float
    fused: float
    limit: float

    @property
    def passed(self) -> bool:
        # Not `fused <= limit`: a NaN error must fail.
        return not self.fused > self.limit and self.fused == self.fused


def _stage_of(name: str) -> str:
    """The stage a parameter or buffer name belongs to (fc counts as its own group)."""
    head = name.split(".")[0]
    if head in STAGES:
        return head
    return "fc" if head == "fc" else "stem"


def _kind_of(module_types: dict, name: str) -> str:
    owner = name.rsplit(".", 1)[0]
    return "bn" if issubclass(module_types.get(owner, nn.Module), nn.modules.batchnorm._BatchNorm) else "conv/fc"


def normalised_error(values: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """max |value - reference| over the group / max |reference|: one scale-free figure per group."""
    if not references:
        return 0.0
    diff = max(float((v.double() - r).abs().max()) for v, r in zip(values, references))
    scale = max(float(r.abs().max()) for r in references)
    return diff / scale if scale > 0 else diff


def build_model(name: str, seed: int = 0) -> nn.Module:
    """The model ``check`` compares, randomly initialised (nothing downloaded): a torchvision
    ResNet, or ``timm:NAME`` / ``hf:resnet-N`` (see :func:`fused_resnet.tools.coverage.build_model`)."""
    if ":" in name:
        from .coverage import build_model as build_zoo_model

        return build_zoo_model(name, seed)
    return torchvision_resnet(name, seed)


def min_values_per_channel(model: nn.Module, batch: int, resolution: int) -> int:
    """The fewest values per channel any BatchNorm of ``model`` normalises for this input size
    (read from a forward pass of a ``meta``-device copy: no memory, no compute)."""
    counts = []
    meta = copy.deepcopy(model).to("meta")
    hooks = [m.register_forward_hook(lambda mod, inp, out: counts.append(inp[0].numel() // inp[0].shape[1]))
             for m in meta.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    meta(torch.empty(batch, 3, resolution, resolution, device="meta"))
    for h in hooks:
        h.remove()
    return min(counts, default=batch * resolution * resolution)


@dataclass
class _Run:
    """What one model produced: outputs, running statistics, gradients (as float64 on the CPU)."""

    tensors: dict[str, torch.Tensor]


def _output_gradients(outputs: list[torch.Tensor], state: torch.Tensor) -> list[torch.Tensor]:
    """A fixed float64 gradient for each output, drawn from generator ``state`` (the same
    for every run of one check)."""
    gen = torch.Generator()
    gen.set_state(state)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outputs]


def _run(model: nn.Module, images: torch.Tensor, grad_state: torch.Tensor, dtype: torch.dtype,
         memory_format: torch.memory_format) -> _Run:
    """A training step's forward and backward, then an eval forward with the updated statistics.

    A model may return one tensor (logits) or several (a transformers ``ModelOutput``):
    each gets its own fixed gradient and its own output group."""
    from .coverage import output_tensors

    device = images.device
    model = model.to(device=device, dtype=dtype, memory_format=memory_format)
    x = images.to(dtype=dtype, memory_format=memory_format).requires_grad_()
    model.train()
    outputs = [o for o in output_tensors(model(x)) if o.is_floating_point() and o.requires_grad]
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(outputs, [x, *params.values()],
                                [g.to(dtype) for g in _output_gradients(outputs, grad_state)], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [x, *params.values()])]
    model.eval()
    with torch.no_grad():
        outputs_eval = [o for o in output_tensors(model(x)) if o.is_floating_point()]
    names = ["output"] if len(outputs) == 1 else [f"output {i}" for i in range(len(outputs))]
    out = {f"{n} (train)": o for n, o in zip(names, outputs)}
    out.update({f"{n} (eval)": o for n, o in zip(names, outputs_eval)})
    out["grad input"] = grads[0]
    out.update({f"grad {name}": g for name, g in zip(params, grads[1:])})
    out.update({f"buffer {name}": b for name, b in model.named_buffers() if b.is_floating_point()})
    return _Run({k: v.detach().double().cpu() for k, v in out.items()})


def _groups(names, module_types: dict) -> dict[str, list[str]]:
    """Output / gradient groups: outputs, input grad, then per stage conv and BatchNorm grads, then running stats."""
    groups: dict[str, list[str]] = {}
    for name in names:
        if name.startswith(("output", "grad input")):
            groups[name] = [name]
            continue
        what, param = name.split(" ", 1)
        stage = _stage_of(param)
        label = (f"grad {stage} {_kind_of(module_types, param)}" if what == "grad" else f"running stats {stage}")
        groups.setdefault(label, []).append(name)
    return groups


def run_check(model: str = "resnet50", device: Optional[str] = None, dtype: str = "float32",
              batch: Optional[int] = None, resolution: Optional[int] = None, memory_format: str = "nchw",
              seed: int = 0, show_progress: bool = False) -> tuple[list[GroupError], dict]:
    """Compare the fused model with eager PyTorch; returns the per-group errors and the settings."""
    dtype = canonical_dtype(dtype)
    memory_format = canonical_memory_format(memory_format)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    batch = batch or (16 if on_gpu else 4)
    resolution = resolution or (224 if on_gpu else 64)
    original = build_model(model, seed)
    fused = convert_model(original)
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch, 3, resolution, resolution, generator=gen, dtype=torch.float64).to(device)
    grad_state = gen.get_state()
    fmt = MEMORY_FORMATS[memory_format]
    settings = dict(model=model, device=str(device), dtype=dtype, batch=batch, resolution=resolution,
                    memory_format=memory_format, seed=seed,
                    min_values_per_channel=min_values_per_channel(original, batch, resolution))
    runs = {"reference": (copy.deepcopy(original), torch.float64), "eager": (copy.deepcopy(original), DTYPES[dtype]),
            "fused": (fused, DTYPES[dtype])}
    outputs = {}
    for name in progress(runs, len(runs), "check: float64 reference, eager, fused", show_progress):
        run_model, run_dtype = runs[name]
        try:
            outputs[name] = _run(run_model, images, grad_state, run_dtype, fmt).tensors
        except Exception as exc:  # noqa: BLE001 - a crash of the fused model is a failed check, reported as one
            if name != "fused":
                raise
            settings["fused_error"] = f"{type(exc).__name__}: {exc}"
            outputs[name] = {}
    reference, eager, candidate = outputs["reference"], outputs["eager"], outputs["fused"]
    module_types = {name: type(m) for name, m in original.named_modules()}
    errors = []
    for group, names in _groups(reference, module_types).items():
        missing = [n for n in names if n not in candidate]
        refs = [reference[n] for n in names]
        eager_err = normalised_error([eager[n] for n in names], refs)
        fused_err = float("nan") if missing else normalised_error([candidate[n] for n in names], refs)
        errors.append(GroupError(group, eager_err, fused_err, TOLERANCES[dtype] + EAGER_ERROR_FACTOR * eager_err))
    return errors, settings


def format_check(errors: list[GroupError], settings: dict, path: str) -> str:
    """The parity table, a header saying what was compared, and the verdict."""
    s = settings
    header = ["group", "eager err", "fused err", "limit", "result"]
    rows = [[e.group, f"{e.eager:.2e}", f"{e.fused:.2e}", f"{e.limit:.2e}", "PASS" if e.passed else "FAIL"]
            for e in errors]
    failed = [e.group for e in errors if not e.passed]
    title = (f"fused-resnet check: {s['model']} on {s['device']} ({path}), {s['dtype']}, {s['memory_format']}, "
             f"batch {s['batch']}, {s['resolution']}x{s['resolution']}; one training step (forward + backward), "
             f"then an eval forward")
    legend = (f"err = max |x - ref| / max |ref| per group, ref = eager torchvision in float64. "
              f"limit = {TOLERANCES[s['dtype']]:g} ({s['dtype']} tolerance; per dtype: "
              + ", ".join(f"{k} {v:g}" for k, v in TOLERANCES.items())
              + f") + {EAGER_ERROR_FACTOR:g} x eager's own error at {s['dtype']}.")
    verdict = (f"PASS: all {len(errors)} groups within their limits" if not failed
               else f"FAIL: {len(failed)} of {len(errors)} groups over their limits: {', '.join(failed)}")
    lines = [title, render_table(header, rows), legend, verdict]
    if s["min_values_per_channel"] < WELL_CONDITIONED_VALUES:
        lines.append(f"Note: the smallest BatchNorm sees {s['min_values_per_channel']} values per channel; below "
                     f"{WELL_CONDITIONED_VALUES} training-mode BatchNorm is ill-conditioned and every precision loses "
                     f"digits (raise --batch or --resolution).")
    if "fused_error" in s:
        lines.append(f"The fused model raised: {s['fused_error']}")
    return "\n".join(lines)
