"""Host time of each fused op call up to its kernel launches, beside eager's dispatch (issue 18, item 10).

On a GPU, at layer4 in eval or at a small batch, a kernel can finish before Python has
launched the next, so what an op costs on the host is its speed there. This measures it
on the CPU: the ops take the Triton path on CPU tensors with every kernel launch stubbed
to a no-op (so the figure is validation, autograd, custom-op dispatch, allocations and
the launchers' own Python, not the kernels), beside eager PyTorch's ``F.batch_norm`` +
``relu`` (+ add) on the same tiny CPU tensors (whose ATen kernels do run: on 2x8x4x4
they are a few hundred nanoseconds). CPU figures, single thread, process CPU time.

    python -m fused_resnet.tools.host_time [--repeats 1000]
"""
from __future__ import annotations

import argparse
import contextlib
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

SHAPE = (2, 8, 4, 4)


@contextlib.contextmanager
def triton_path_with_stubbed_launches() -> Iterator[None]:
    """Within the block CPU tensors take the Triton path and no kernel runs: a launch goes
    through Triton's ``kernel[grid](...)`` call and stops where the real one would bind its
    arguments and enqueue the kernel."""
    from fused_resnet import backend
    from fused_resnet.kernels.add_relu import add_relu_forward_kernel

    # Every kernel is one class: JITFunction, or InterpretedFunction under TRITON_INTERPRET=1.
    kernel_class = type(add_relu_forward_kernel)
    saved = backend.use_triton, kernel_class.run
    backend.use_triton = lambda t: t.dtype != torch.float64
    kernel_class.run = lambda self, *args, grid, warmup, **kwargs: None
    try:
        yield
    finally:
        backend.use_triton, kernel_class.run = saved


def per_call_us(fn: Callable[[], object], repeats: int, rounds: int = 7) -> float:
    """The least over ``rounds`` of the mean CPU time of one call, in microseconds (this
    process's CPU time, and the least: other processes on a shared machine only add to it)."""
    for _ in range(max(repeats // 10, 10)):
        fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(repeats):
            fn()
        times.append((time.process_time() - start) / repeats * 1e6)
    return min(times)


def cases() -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """name -> (fused call, eager call) on tiny CPU tensors: the ops against eager's functional
    calls, then ``BatchNormReLU2d`` against ``BatchNorm2d`` + ``ReLU`` modules ("module ...")."""
    import torch.onnx  # noqa: F401 - imported in a user's process (torchvision and timm import it): the ops check its export flag

    import fused_resnet

    C = SHAPE[1]
    x = torch.randn(SHAPE)
    r = torch.randn(SHAPE)
    xg = x.clone().requires_grad_()
    dy = torch.ones(SHAPE)
    rm, rv, w, b = torch.zeros(C), torch.ones(C), torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    nbt = torch.zeros((), dtype=torch.long)

    def fused_eval():
        with torch.no_grad():
            return fused_resnet.bn_relu(x, rm, rv, w, b, False)

    def eager_eval():
        with torch.no_grad():
            return torch.relu_(F.batch_norm(x, rm, rv, w, b, False))

    def fused_add_eval():
        with torch.no_grad():
            return fused_resnet.bn_add_relu(x, r, rm, rv, w, b, False)

    def eager_add_eval():
        with torch.no_grad():
            return torch.relu_(F.batch_norm(x, rm, rv, w, b, False).add_(r))

    def fused_train():
        return fused_resnet.bn_relu(xg, rm, rv, w, b, True, 0.1, 1e-5, num_batches_tracked=nbt)

    def eager_train():
        nbt.add_(1)
        return torch.relu_(F.batch_norm(xg, rm, rv, w, b, True, 0.1, 1e-5))

    def step(forward):
        def run():
            forward().backward(dy)
        return run

    from fused_resnet.conv1x1_bn import conv1x1_bn_relu

    xc = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last).requires_grad_()
    wc = torch.randn(C, C, 1, 1, requires_grad=True)

    def fused_conv_train():
        return conv1x1_bn_relu(xc, wc, None, rm, rv, w, b, True, 0.1, 1e-5, num_batches_tracked=nbt)

    def eager_conv_train():
        nbt.add_(1)
        return torch.relu_(F.batch_norm(F.conv2d(xc, wc), rm, rv, w, b, True, 0.1, 1e-5))

    def fused_add_relu():
        with torch.no_grad():
            return fused_resnet.add_relu(x, r)

    def eager_add_relu():
        with torch.no_grad():
            return torch.add(x, r).relu_()

    # What a converted model runs: the fused module in place of BatchNorm2d + ReLU (two module calls).
    from fused_resnet.nn import BatchNormReLU2d

    def module_pair(training):
        fused_module, bn_module = BatchNormReLU2d(C).train(training), torch.nn.BatchNorm2d(C).train(training)
        relu_module = torch.nn.ReLU(inplace=True)

        def fused():
            with torch.set_grad_enabled(training):
                return fused_module(xg)

        def eager():
            with torch.set_grad_enabled(training):
                return relu_module(bn_module(xg))
        return fused, eager

    fused_module_train, eager_module_train = module_pair(True)
    return {"bn_relu eval forward": (fused_eval, eager_eval),
            "bn_add_relu eval forward": (fused_add_eval, eager_add_eval),
            "bn_relu train forward": (fused_train, eager_train),
            "bn_relu train forward+backward": (step(fused_train), step(eager_train)),
            "add_relu forward": (fused_add_relu, eager_add_relu),
            "conv1x1_bn_relu train fwd+bwd": (step(fused_conv_train), step(eager_conv_train)),
            "module eval forward": module_pair(False),
            "module train forward": (fused_module_train, eager_module_train),
            "module train forward+backward": (step(fused_module_train), step(eager_module_train))}


# The bound on an op call's host time: within this factor of eager's dispatch.
TARGET_RATIO = 1.5


def measure(repeats: int = 1000) -> list[dict]:
    """Per case: fused host time (launches stubbed), eager time, their ratio; CPU, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name, (fused, eager) in cases().items():
            eager_us = per_call_us(eager, repeats)
            with triton_path_with_stubbed_launches():
                fused_us = per_call_us(fused, repeats)
            rows.append({"case": name, "fused_host_us": fused_us, "eager_us": eager_us, "ratio": fused_us / eager_us})
    finally:
        torch.set_num_threads(threads)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1000)
    args = parser.parse_args(argv)
    print(f"CPU, one thread, input {'x'.join(map(str, SHAPE))} fp32; fused: Triton path, launches stubbed;"
          f" target: fused/eager <= {TARGET_RATIO}")
    print(f"{'case':<32}{'fused us':>10}{'eager us':>10}{'fused/eager':>13}")
    for row in measure(args.repeats):
        verdict = "" if row["ratio"] <= TARGET_RATIO else "  over"
        print(f"{row['case']:<32}{row['fused_host_us']:>10.1f}{row['eager_us']:>10.1f}{row['ratio']:>13.2f}{verdict}")


if __name__ == "__main__":
    main()
