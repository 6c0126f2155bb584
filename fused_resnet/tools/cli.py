"""The ``fused-resnet`` command: ``check``, ``bench``, ``audit``, ``demo`` and ``gpu``.

Every subcommand picks defaults that fit the device it finds (small shapes on a CPU,
realistic ones on a GPU) and says which path its figures come from.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from fused_resnet import backend

from .bench import MODES, VARIANTS, BenchConfig, default_config
from .common import MODELS, STAGES, MissingDependency, canonical_dtype, canonical_memory_format


# --------------------------------------------------------------------------- argument types


def _one_of(choices: Sequence[str], what: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} '{value}'; choose from {', '.join(choices)}")
        return value
    parse.__name__ = what  # argparse names the type in its messages
    return parse


def _canonical(convert: Callable[[str], str], what: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        try:
            return convert(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = what
    return parse


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{value}' is not an integer") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number
    parse.__name__ = "integer"
    return parse


_positive_int = _int_at_least(1)


def _list_of(item: Callable[[str], object]) -> Callable[[str], list]:
    """A comma-separated list ('layer1,layer2'), each element parsed by ``item``."""
    def parse(value: str) -> list:
        return [item(v.strip()) for v in value.split(",") if v.strip()]
    parse.__name__ = getattr(item, "__name__", "list")
    return parse


def _device(value: str) -> str:
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device '{value}'; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device '{value}'; use cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"'{value}' requested but CUDA is not available on this machine")
    return value


model_type = _one_of(MODELS, "model")


def zoo_model_type(value: str) -> str:
    """A torchvision ResNet name, ``timm:NAME``, ``hf:resnet-N`` or ``frozen:NAME`` (built only later)."""
    if value.startswith(("timm:", "hf:", "frozen:")) and len(value.split(":", 1)[1]) > 0:
        return value
    try:
        return model_type(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"unknown model '{value}'; choose from {', '.join(MODELS)}, timm:NAME, hf:resnet-N or frozen:NAME") from None
stage_type = _one_of(STAGES, "stage")
mode_type = _one_of(MODES, "mode")
dtype_type = _canonical(canonical_dtype, "dtype")
format_type = _canonical(canonical_memory_format, "memory format")


def _flatten(values: Optional[list]) -> Optional[list]:
    """Repeated list options (``--stages stem --stages layer1,layer2``) as one list, in order, deduplicated."""
    if values is None:
        return None
    return list(dict.fromkeys(v for group in values for v in group))


# --------------------------------------------------------------------------- helpers


def execution_path(device: torch.device) -> str:
    """Which implementation the fused ops use for tensors on ``device``."""
    if device.type == "cuda":
        return "Triton kernels"
    if backend.INTERPRET:
        return "Triton kernels in the interpreter"
    return "CPU path: ATen composite"


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _progress_enabled(args) -> bool:
    return not args.no_progress


# --------------------------------------------------------------------------- check


def cmd_check(args) -> int:
    """Parity table of the converted model against eager PyTorch; 1 on any FAIL."""
    from .check import format_check, run_check

    device = torch.device(args.device or _default_device())
    if device.type == "cpu" and backend.INTERPRET:
        print("TRITON_INTERPRET=1: the fused model runs the Triton kernels in the interpreter (slow).",
              file=sys.stderr)
    try:
        errors, settings = run_check(args.model, str(device), args.dtype, args.batch, args.resolution,
                                     args.memory_format, args.seed, _progress_enabled(args))
    except (ValueError, MissingDependency) as exc:
        print(f"fused-resnet check: error: --model: {exc}", file=sys.stderr)
        return 2
    print(format_check(errors, settings, execution_path(device)))
    print(_tails_line(args.model, device))
    return 0 if all(e.passed for e in errors) and "fused_error" not in settings else 1


def _tails_line(model: str, device: torch.device) -> str:
    """'tails fused / found' of the model, counted at the ATen level where the Triton path runs."""
    from .common import convert_model
    from .coverage import build_model, count_tails, example_input, triton_path_available

    if not triton_path_available(device):
        return ("tails: counted where the fused ops run their Triton kernels (a GPU, or TRITON_INTERPRET=1): "
                f"`fused-resnet coverage --model {model}`")
    original = build_model(model).to(device)
    x = example_input(original).to(device)
    found = count_tails(original, x, training=True)
    left = count_tails(convert_model(original), x, training=True)
    return f"tails: {found.total - left.total} fused / {found.total} found (training forward, ATen level)"


# --------------------------------------------------------------------------- coverage


def cmd_coverage(args) -> int:
    """The table of tails found / left unfused after convert, per model, train and eval."""
    from .coverage import DEFAULT_MODELS, coverage, format_coverage, triton_path_available

    if not triton_path_available():
        # The counter needs the fused ops on their Triton path; fake tensors make the interpreter cheap.
        from .audit import run_in_interpreter

        return run_in_interpreter(args.argv)
    try:
        rows = coverage(_flatten(args.model) or list(DEFAULT_MODELS), batch=args.batch)
    except (ValueError, MissingDependency) as exc:
        print(f"fused-resnet coverage: error: --model: {exc}", file=sys.stderr)
        return 2
    print(format_coverage(rows))
    return 0


# --------------------------------------------------------------------------- bench


def bench_config(args) -> BenchConfig:
    """The run's settings: the device's defaults, overridden by what was given."""
    config = default_config(args.device)
    for name, value in (("models", _flatten(args.model)), ("stages", _flatten(args.stages)),
                        ("modes", _flatten(args.modes)), ("dtypes", _flatten(args.dtype)),
                        ("memory_formats", _flatten(args.memory_format)), ("batches", _flatten(args.batch)),
                        ("resolution", args.resolution), ("warmup", args.warmup), ("iters", args.iters),
                        ("threads", args.threads)):
        if value is not None:
            setattr(config, name, value)
    if args.compile is not None:
        wanted = {"eager", "fused"} | ({"compile"} if args.compile else set())
        config.variants = [v for v in VARIANTS if v in wanted]
    if args.graphs:
        config.variants = [*config.variants, "eager_graph", "fused_graph"]
    return config


def cmd_bench(args) -> int:
    """The per-stage table, and optionally the JSON report and the PNG chart."""
    from .bench import format_table, report, run_bench, write_plot
    from .common import machine_info, write_json
    from .kernel_bench import format_kernel_table, run_kernel_bench

    config = bench_config(args)
    device = torch.device(config.device)
    if device.type == "cpu" and backend.INTERPRET:
        print("warning: TRITON_INTERPRET=1: the fused model's times measure Triton's interpreter, not the kernels.",
              file=sys.stderr)
    if "compile" not in config.variants:
        print("torch.compile: skipped" + (" on the CPU (minutes of C++ compilation per stage); pass --compile to "
                                          "include it" if device.type == "cpu" else " (--no-compile)"))
    results = run_bench(config, _progress_enabled(args))
    info = machine_info(config.device)  # after run_bench has set the thread count
    print(format_table(results, info))
    kernels = []
    run_kernels = args.kernels if args.kernels is not None else device.type == "cuda"
    if run_kernels:
        for model in config.models:
            for dtype in config.dtypes:
                for fmt in config.memory_formats:
                    kernels += run_kernel_bench(model, config.batches[-1], config.resolution, dtype, fmt,
                                                config.device, config.warmup, config.iters, _progress_enabled(args))
        print()
        print(format_kernel_table(kernels, info))
    if args.json:
        write_json(args.json, report(results, info, config, kernels))
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, results, info)
        print(f"wrote {args.plot}")
    return 0


# --------------------------------------------------------------------------- audit


def cmd_audit(args) -> int:
    """The traffic tables; re-runs itself under TRITON_INTERPRET=1 when the kernels are compiled."""
    from .audit import AuditConfig, format_audit, run_audit, run_in_interpreter
    from .common import write_json
    from .traffic import interpreter_active

    if args.launches:
        return _audit_launches(args)
    if not interpreter_active():
        return run_in_interpreter(args.argv)
    if args.convolutions:
        return _audit_convolutions(args)
    config = AuditConfig(models=_flatten(args.model) or list(MODELS), batch=args.batch, resolution=args.resolution,
                         dtype=args.dtype, gpu=args.gpu)
    data = run_audit(config, _progress_enabled(args))
    print(format_audit(data))
    if args.json:
        write_json(args.json, data)
        print(f"wrote {args.json}")
    return 0


def _audit_launches(args) -> int:
    """``audit --launches``: every Triton launch of a converted ResNet-50 step, projected on an H100 plan."""
    from . import launch_audit
    from .common import write_json
    from .traffic import interpreter_active

    if interpreter_active():
        print("audit --launches records compiled launches: run it without TRITON_INTERPRET=1")
        return 2
    models = _flatten(args.model) or ["resnet50"]
    audits = [launch_audit.audit_case(launch_audit.AuditCase(c.batch, c.dtype, c.fuse_convolutions, c.training,
                                                             args.resolution, model))
              for model in models for c in launch_audit.all_cases(args.launch_batches)]
    print(launch_audit.format_launch_audit(audits))
    if args.json:
        write_json(args.json, {"fused_resnet_launch_audit": 1, "device": launch_audit.H100.name,
                               "projection": True, "cases": [a.to_json() for a in audits]})
        print(f"wrote {args.json}")
    return 1 if any(a.problems() for a in audits) else 0


def _audit_convolutions(args) -> int:
    """``audit --convolutions``: Bottleneck ResNets' stages with the 1x1 convolutions fused, convolutions included."""
    from . import audit
    from .common import write_json

    models = [m for m in (_flatten(args.model) or ["resnet50"]) if m != "resnet18"]
    if not models:
        print("resnet18 has no 1x1 convolutions to fuse (BasicBlock): nothing to audit with --convolutions")
        return 0
    plan = audit.PLAN_TARGETS[args.gpu]
    data = {"fused_resnet_conv_audit": 1, "plan": plan, "models": {}}
    for model in models:
        stages, blocks = audit.project_conv_stages(model, args.batch, args.resolution, args.dtype, plan,
                                                   _progress_enabled(args))
        print(audit.format_conv_tables(stages, blocks))
        data["models"][model] = {"stages": [s.to_json() for s in stages],
                                 "blocks": [a.to_json() for audits in blocks.values() for a in audits]}
    if args.json:
        write_json(args.json, data)
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    """check, audit and a short bench on this machine; writes the JSON and PNG into --out."""
    device = torch.device(_default_device())
    out = args.out
    os.makedirs(out, exist_ok=True)
    progress_flag = ["--no-progress"] if args.no_progress else []
    on_gpu = device.type == "cuda"
    steps = [
        ("check", ["check", "--model", "resnet50"] + (["--dtype", "bfloat16"] if on_gpu else [])),
        ("audit", ["audit", "--json", os.path.join(out, "audit.json")]),
        ("bench", ["bench", "--model", "resnet50" if on_gpu else "resnet18",
                   "--batch", "64" if on_gpu else "8", "--modes", "eval,train_backward" if on_gpu else "eval,train,train_backward",
                   "--json", os.path.join(out, "bench.json"), "--plot", os.path.join(out, "bench.png")]),
    ]
    status = 0
    for name, argv in steps:
        print(f"\n=== fused-resnet {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        rc = main(argv + progress_flag)
        print(f"=== {name}: {'ok' if rc == 0 else f'exit {rc}'} in {time.perf_counter() - start:.0f} s", flush=True)
        status = status or rc
    return status


# --------------------------------------------------------------------------- gpu


def cmd_gpu(args) -> int:
    """The whole GPU verdict in one folder (``make gpu``); ``--smoke`` at toy sizes on the CPU."""
    from .gpu import run_gpu, worker_main

    if args.worker:
        return worker_main(args.worker.split(","), args.part, args.budget_s)
    if not args.smoke and not torch.cuda.is_available():
        print("fused-resnet gpu: no CUDA device on this machine; --smoke (make gpu SMOKE=1) runs every phase at "
              "toy sizes on the CPU", file=sys.stderr)
        return 2
    return run_gpu(args.out, args.budget_s, args.smoke, args.device)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-resnet",
        description="Check, benchmark and audit the fused BatchNorm/add/ReLU kernels on torchvision ResNets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{check,coverage,bench,audit,demo,gpu}")
    progress = argparse.ArgumentParser(add_help=False)
    progress.add_argument("--no-progress", action="store_true", help="no progress bars")

    check = sub.add_parser("check", parents=[progress], help="parity of the converted model with eager PyTorch",
                           description="Convert a torchvision ResNet, run a training step and an eval forward "
                                       "against the original, print max errors per group; exit 1 on FAIL.")
    check.add_argument("--model", type=zoo_model_type, default="resnet50",
                       help="resnet18, resnet50, timm:NAME or hf:resnet-N (default resnet50)")
    check.add_argument("--device", type=_device, help="cpu or cuda[:N] (default: cuda when available)")
    check.add_argument("--dtype", type=dtype_type, default="float32", help="float32, bfloat16 or float16")
    check.add_argument("--batch", type=_positive_int, help="images (default 16 on a GPU, 4 on the CPU)")
    check.add_argument("--resolution", type=_positive_int, help="image side (default 224 on a GPU, 64 on the CPU)")
    check.add_argument("--memory-format", type=format_type, default="nchw", help="nchw or channels_last")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=cmd_check)

    cov = sub.add_parser("coverage", parents=[progress], help="tails found / left unfused by convert, per model",
                         description="Count, at the ATen level, the BatchNorm/add -> ReLU tails each model runs "
                                     "before and after convert(), in train and eval (the README's coverage table).")
    cov.add_argument("--model", type=_list_of(zoo_model_type), action="append",
                     help="models (default: the issue-10 zoo of timm, torchvision and transformers ResNets)")
    cov.add_argument("--batch", type=_positive_int, default=2, help="images per forward (default 2)")
    cov.set_defaults(func=cmd_coverage)

    bench = sub.add_parser("bench", parents=[progress], help="images/s per ResNet stage: eager, fused, compile",
                           description="Time each ResNet stage for eager PyTorch, the fused model and torch.compile "
                                       "side by side. Lists are comma-separated. Defaults fit the device: "
                                       "resnet50, batch 256 at 224x224, bf16, channels_last, compile on a GPU; "
                                       "resnet18, batch 8 at 64x64, fp32, no compile on the CPU.")
    bench.add_argument("--model", type=_list_of(model_type), action="append", help=f"of {', '.join(MODELS)}")
    bench.add_argument("--batch", type=_list_of(_positive_int), action="append", help="batch sizes, e.g. 64,256")
    bench.add_argument("--stages", type=_list_of(stage_type), action="append", help=f"of {', '.join(STAGES)}")
    bench.add_argument("--modes", type=_list_of(mode_type), action="append", help=f"of {', '.join(MODES)}")
    bench.add_argument("--dtype", type=_list_of(dtype_type), action="append", help="of float32, bfloat16, float16")
    bench.add_argument("--memory-format", type=_list_of(format_type), action="append", help="of nchw, channels_last")
    bench.add_argument("--resolution", type=_positive_int, help="image side")
    bench.add_argument("--device", type=_device, help="cpu or cuda[:N] (default: cuda when available)")
    bench.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="also time torch.compile of the eager model (default: on a GPU only)")
    bench.add_argument("--graphs", action="store_true",
                       help="also time eager and fused replayed from CUDA graphs: what the host's share of a step is "
                            "(CUDA only; skipped, said so, elsewhere)")
    bench.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                       help="also time the fused ops alone and report GB/s (default: on a GPU only)")
    bench.add_argument("--warmup", type=_int_at_least(0), help="untimed calls before timing")
    bench.add_argument("--iters", type=_positive_int, help="timed calls per measurement")
    bench.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default 1 on the CPU)")
    bench.add_argument("--json", metavar="FILE", help="write every figure, the machine and the settings as JSON")
    bench.add_argument("--plot", metavar="FILE", help="write a PNG chart of images/s per stage")
    bench.set_defaults(func=cmd_bench)

    from .audit import PROJECTION_GPUS

    audit = sub.add_parser("audit", parents=[progress], help="bytes moved: fused kernels against eager PyTorch",
                           description="Count the bytes the fused kernels move (Triton interpreter) and the eager "
                                       "op sequence moves (TorchDispatchMode), per op and per ResNet stage. "
                                       "Needs no GPU; re-runs itself with TRITON_INTERPRET=1 when needed.")
    audit.add_argument("--model", type=_list_of(model_type), action="append", help="default: resnet18,resnet50")
    audit.add_argument("--batch", type=_positive_int, default=256, help="batch of the per-stage table (default 256)")
    audit.add_argument("--resolution", type=_positive_int, default=224, help="image side (default 224)")
    audit.add_argument("--dtype", type=dtype_type, default="float32", help="activation dtype (default float32)")
    audit.add_argument("--gpu", type=_one_of(tuple(PROJECTION_GPUS), "GPU"), default="H100",
                       help=f"GPU of the projected times: {', '.join(PROJECTION_GPUS)} (default H100)")
    audit.add_argument("--convolutions", action="store_true",
                       help="instead: the Bottleneck ResNets' stages (default resnet50) with the 1x1 convolutions "
                            "fused, convolutions included, at the --gpu's tile plan (about 7 minutes on 2 cores)")
    audit.add_argument("--launches", action="store_true",
                       help="instead: every Triton launch of a converted ResNet-50 training step and eval forward "
                            "(bf16 channels_last and fp32 NCHW, fuse_convolutions on and off) recorded on meta "
                            "tensors with the H100's plan, projected per launch and per stage beside eager "
                            "(a projection; exit status 1 when a launch fails the check)")
    audit.add_argument("--launch-batches", type=_list_of(_positive_int), default=[32, 256],
                       help="batches of --launches (default 32,256)")
    audit.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    audit.set_defaults(func=cmd_audit)

    demo = sub.add_parser("demo", parents=[progress], help="check, audit and a short bench on this machine")
    demo.add_argument("--out", default="fused-resnet-demo", help="folder for the JSON and PNG (default fused-resnet-demo)")
    demo.set_defaults(func=cmd_demo)

    gpu = sub.add_parser("gpu", parents=[progress], help="the whole GPU verdict in one command, in a time budget",
                         description="On a CUDA GPU: machine, correctness (tests on CUDA tensors, no host sync, "
                                     "determinism, CUDA graph, torch.compile fullgraph, kernel registers and spills), "
                                     "kernel bandwidth and per-stage throughput against eager and torch.compile, "
                                     "within --budget-s; writes gpu.json, summary.md, gpu.png, log.txt and "
                                     "pytest.txt into --out. --smoke: every phase at toy sizes on the CPU.")
    gpu.add_argument("--out", default="gpu-results", help="folder for the results (default gpu-results)")
    gpu.add_argument("--budget-s", type=_positive_int, default=540, help="time budget of the whole run (default 540)")
    gpu.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, the interpreter where kernels run")
    gpu.add_argument("--device", type=_device, help="cuda[:N] (default cuda)")
    gpu.add_argument("--worker", help=argparse.SUPPRESS)  # the smoke run's TRITON_INTERPRET=1 child
    gpu.add_argument("--part", help=argparse.SUPPRESS)
    gpu.set_defaults(func=cmd_gpu)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``fused-resnet`` and ``python -m fused_resnet``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except MissingDependency as exc:
        print(f"fused-resnet {args.command}: {exc}", file=sys.stderr)
        return 2
