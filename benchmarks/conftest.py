"""The pytest-benchmark suite's settings, shared fixtures and end-of-run tables.

Every figure is measured by ``fused_resnet.tools.bench`` and ``kernel_bench`` (the code
behind ``fused-resnet bench``);
this file only chooses the cases and collects the results. Options take comma-separated
lists; the defaults fit the device (see ``suite_defaults``). ``--bench-smoke`` is a tiny
run that checks the suite works, nothing more.
"""
from __future__ import annotations

import statistics

import pytest
import torch

from fused_resnet.tools import bench, common, kernel_bench

OPTIONS = {
    # option: (BenchConfig field, parser of one element)
    "--bench-models": ("models", str),
    "--bench-stages": ("stages", str),
    "--bench-modes": ("modes", str),
    "--bench-dtypes": ("dtypes", common.canonical_dtype),
    "--bench-formats": ("memory_formats", common.canonical_memory_format),
    "--bench-batches": ("batches", int),
    "--bench-variants": ("variants", str),
}
CHOICES = {"models": common.MODELS, "stages": common.STAGES, "modes": bench.MODES, "variants": bench.VARIANTS}


def pytest_addoption(parser):
    group = parser.getgroup("fused-resnet benchmarks")
    for option, (field, _) in OPTIONS.items():
        group.addoption(option, help=f"comma-separated {field} (default: fits the device)")
    group.addoption("--bench-resolution", type=int, help="image side (default 224 on a GPU, 64 on the CPU)")
    group.addoption("--bench-device", help="cpu or cuda[:N] (default: cuda when available)")
    group.addoption("--bench-threads", type=int, help="CPU threads for torch (default 1 on the CPU)")
    group.addoption("--bench-rounds", type=int, help="timed rounds per benchmark (default 30 GPU, 5 CPU)")
    group.addoption("--bench-warmup", type=int, help="untimed rounds first (default 10 GPU, 2 CPU)")
    group.addoption("--bench-smoke", action="store_true", help="a tiny run that only checks the suite works")
    group.addoption("--bench-json", metavar="FILE", help="write the side-by-side results as JSON")


def suite_defaults(device: str) -> bench.BenchConfig:
    """The whole matrix on a GPU (realistic shapes); the same matrix at small shapes on the CPU."""
    config = bench.default_config(device)
    config.models, config.modes = list(common.MODELS), list(bench.MODES)
    config.dtypes, config.memory_formats = ["float32", "bfloat16"], ["nchw", "channels_last"]
    if torch.device(device).type == "cuda":
        config.batches, config.variants = [64, 256], list(bench.VARIANTS)
    else:
        config.batches, config.iters = [4], 5
    return config


def smoke_config(device: str) -> bench.BenchConfig:
    return bench.BenchConfig(models=["resnet18"], stages=list(common.STAGES), modes=list(bench.MODES),
                             dtypes=["float32"], memory_formats=["channels_last"], batches=[2], resolution=32,
                             device=device, variants=["eager", "fused"], warmup=1, iters=2, threads=1)


def _parse_list(option: str, raw: str, parse, field: str) -> list:
    values = [parse(v.strip()) for v in raw.split(",") if v.strip()]
    unknown = [v for v in values if field in CHOICES and v not in CHOICES[field]]
    if unknown or not values:
        raise pytest.UsageError(f"{option}: unknown {field} {unknown or raw!r}; "
                                f"choose from {', '.join(map(str, CHOICES.get(field, ())))}")
    return values


def suite_config(config) -> bench.BenchConfig:
    """The suite's BenchConfig: device defaults (or the smoke run), then the --bench-* options."""
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = smoke_config(device) if config.getoption("--bench-smoke") else suite_defaults(device)
    for option, (field, parse) in OPTIONS.items():
        raw = config.getoption(option)
        if raw:
            try:
                setattr(chosen, field, _parse_list(option, raw, parse, field))
            except ValueError as exc:
                raise pytest.UsageError(f"{option}: {exc}") from None
    for option, field in (("--bench-resolution", "resolution"), ("--bench-threads", "threads"),
                          ("--bench-rounds", "iters"), ("--bench-warmup", "warmup")):
        if config.getoption(option) is not None:
            setattr(chosen, field, config.getoption(option))
    return chosen


def pytest_configure(config):
    config._fused_resnet_bench = suite_config(config)
    config._fused_resnet_cases = {}
    config._fused_resnet_kernels = []
    config._fused_resnet_conv1x1 = {}  # (pass, shape, batch, dtype) -> {implementation: median s}
    if config._fused_resnet_bench.threads:
        torch.set_num_threads(config._fused_resnet_bench.threads)


def pytest_report_header(config):
    chosen = config._fused_resnet_bench
    return common.device_banner(common.machine_info(chosen.device))


def pytest_generate_tests(metafunc):
    chosen = metafunc.config._fused_resnet_bench
    if "stage_case" in metafunc.fixturenames:
        cases = [(*case, variant) for case in bench.cases(chosen) for variant in chosen.variants]
        metafunc.parametrize("stage_case", cases, ids=["-".join(map(str, c)) for c in cases])
    if "kernel_case" in metafunc.fixturenames:
        cases = [(m, d, f, b, stage, op, p) for m in chosen.models for d in chosen.dtypes
                 for f in chosen.memory_formats for b in chosen.batches[-1:]
                 for stage in kernel_bench.kernel_shapes(m, b, chosen.resolution) if stage in chosen.stages
                 for op in kernel_bench.KERNEL_OPS for p in kernel_bench.KERNEL_PASSES]
        metafunc.parametrize("kernel_case", cases, ids=["-".join(map(str, c)) for c in cases])


@pytest.fixture(scope="session")
def suite(pytestconfig) -> bench.BenchConfig:
    """The settings of this run."""
    return pytestconfig._fused_resnet_bench


@pytest.fixture(scope="session")
def model_cache(suite) -> bench.ModelCache:
    """Models built once per (model, variant, dtype, memory format) for the whole run."""
    return bench.ModelCache(torch.device(suite.device), suite.seed)


@pytest.fixture
def timed(benchmark, suite):
    """Time a step with pytest-benchmark, and return seconds per call for the side-by-side table.

    On a GPU the step synchronises (pytest-benchmark's clock is the host's) and the table's
    figures come from a second, CUDA-event timed run; on the CPU they are pytest-benchmark's own.
    """
    device = torch.device(suite.device)

    def run(step, group: str, **extra_info) -> list[float]:
        def synced():
            step()
            common.synchronize(device)

        benchmark.group = group
        benchmark.extra_info.update(device_kind=device.type, note=common.CUDA_NOTE if device.type == "cuda"
                                    else common.CPU_NOTE, **extra_info)
        benchmark.pedantic(synced, rounds=suite.iters, warmup_rounds=suite.warmup, iterations=1)
        if device.type == "cuda":
            seconds = common.time_step(step, device, 0, suite.iters)
        elif benchmark.stats:
            seconds = list(benchmark.stats.stats.data)
        else:  # --benchmark-disable: the step ran once, untimed
            return []
        benchmark.extra_info["median_s"] = statistics.median(seconds)
        return seconds
    return run


def pytest_terminal_summary(terminalreporter, config):
    cases = getattr(config, "_fused_resnet_cases", {})
    kernels = getattr(config, "_fused_resnet_kernels", [])
    gemms = getattr(config, "_fused_resnet_conv1x1", {})
    if not cases and not kernels and not gemms:
        return
    chosen = config._fused_resnet_bench
    info = common.machine_info(chosen.device)
    order = {v: i for i, v in enumerate(bench.ALL_VARIANTS)}
    results = []
    for key, variants in cases.items():
        model, stage, mode, dtype, fmt, batch, resolution, shape = key
        measured = {v: bench.Measurement(variants[v]) for v in sorted(variants, key=order.get)}
        results.append(bench.CaseResult(model, stage, mode, dtype, fmt, batch, resolution, list(shape), measured))
    terminalreporter.write_sep("=", "fused-resnet: images/s per stage, side by side")
    if results:
        terminalreporter.write_line(bench.format_table(results, info))
    if kernels:
        terminalreporter.write_line("")
        terminalreporter.write_line(kernel_bench.format_kernel_table(kernels, info))
    if gemms:
        terminalreporter.write_line("")
        terminalreporter.write_line(conv1x1_table(gemms))
    path = config.getoption("--bench-json")
    if path:
        common.write_json(path, bench.report(results, info, chosen, kernels))
        terminalreporter.write_line(f"wrote {path}")


def conv1x1_table(gemms: dict) -> str:
    """The 1x1-convolution GEMMs next to cuDNN's sequence: time, ratio, TFLOP/s and GB/s of the fused GEMM."""
    header = ["pass", "C_in,H,W,C_out,stride", "dtype", "fused us", "cuDNN us", "cuDNN/fused", "fused TFLOP/s",
              "fused GB/s"]
    rows = []
    for (pass_, shape, batch, dtype), timed in gemms.items():
        flops, moved = kernel_bench.conv1x1_work(shape, batch, pass_, dtype)
        fused, cudnn = timed.get("fused"), timed.get("cudnn")
        rows.append([pass_, ",".join(map(str, shape)), dtype, common.format_figure(fused and fused * 1e6, ".1f"),
                     common.format_figure(cudnn and cudnn * 1e6, ".1f"),
                     common.format_figure(cudnn / fused if fused and cudnn else None, ".2f"),
                     common.format_figure(fused and flops / fused / 1e12, ".3g"),
                     common.format_figure(fused and moved / fused / 1e9, ".0f")])
    return "1x1-convolution GEMMs vs cuDNN's convolution + the ops they fuse\n" + common.render_table(header, rows)
