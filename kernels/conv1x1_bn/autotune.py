"""Timing the forward GEMM's candidate tiles against the rule's: an explicit opt-in, never
called by the library (the kernels always use ``gemm_tiles``)."""
from __future__ import annotations

import torch

from .forward import conv1x1_forward
from .plans import GemmTiles, gemm_tiles, target_of


def autotune_candidates(M: int, N: int, K: int, dtype: torch.dtype, target) -> list[GemmTiles]:
    """The rule's tiles and its neighbours (each block size halved or doubled within 16..128), in a fixed order."""
    rule = gemm_tiles(M, N, K, dtype, target)
    out = [rule]
    for bm in (rule.block_m // 2, rule.block_m, rule.block_m * 2):
        for bn in (rule.block_n // 2, rule.block_n, rule.block_n * 2):
            if 16 <= bm <= 128 and 16 <= bn <= 128 and bm * bn <= 128 * 128:
                warps = 8 if bm * bn >= 128 * 128 else rule.num_warps
                tiles = GemmTiles(bm, bn, rule.block_k, rule.group_m, warps, rule.num_stages)
                if tiles not in out:
                    out.append(tiles)
    return out


def autotune_conv1x1(shapes, dtype: torch.dtype = torch.float32, device="cuda", repeats: int = 10,
                     candidates=None, print_table: bool = True) -> list[dict]:
    """Time the forward GEMM's candidate tiles for each (N, C_in, H, W, C_out) in ``shapes`` and
    print the rule's choice against the fastest: an explicit opt-in, never called by the library
    (the kernels always use :func:`gemm_tiles`). On a CPU device the interpreter runs it (times
    are the interpreter's, only the table's shape means anything there).
    """
    import time

    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    shapes = list(shapes)
    if not shapes or any(not (isinstance(s, (tuple, list)) and len(s) == 5 and all(isinstance(v, int) and v > 0
                                                                                 for v in s)) for s in shapes):
        raise ValueError(f"shapes must be a non-empty list of (N, C_in, H, W, C_out) positive ints, got {shapes!r}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    rows = []
    for N, C_in, H, W, C_out in shapes:
        x = torch.randn(N, C_in, H, W, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(C_out, C_in, 1, 1, device=device, dtype=dtype)
        target = target_of(device)
        M = N * H * W
        rule = gemm_tiles(M, C_out, C_in, dtype, target)
        timed = []
        for tiles in (candidates or autotune_candidates(M, C_out, C_in, dtype, target)):
            conv1x1_forward(x, weight, None, 1, stats=True, target=target, tiles=tiles)  # compile, warm up
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                conv1x1_forward(x, weight, None, 1, stats=True, target=target, tiles=tiles)
            if cuda:
                torch.cuda.synchronize(device)
            timed.append(((time.perf_counter() - start) / repeats * 1e6, tiles))
        rule_us = next((us for us, t in timed if t == rule), float("nan"))
        best_us, best = min(timed, key=lambda pair: pair[0])
        rows.append(dict(shape=(N, C_in, H, W, C_out), rule=rule, rule_us=rule_us, best=best, best_us=best_us,
                         all=timed))
    if print_table:
        def name(t):
            return f"{t.block_m}x{t.block_n}x{t.block_k}/w{t.num_warps}/s{t.num_stages}"

        print(f"{'N,C_in,H,W,C_out':<24}{'rule tiles':<22}{'rule us':>10}  {'best tiles':<22}{'best us':>10}"
              f"{'rule/best':>10}   ({device.type}{', interpreter times' if not cuda else ''})")
        for r in rows:
            print(f"{','.join(map(str, r['shape'])):<24}{name(r['rule']):<22}{r['rule_us']:>10.1f}  "
                  f"{name(r['best']):<22}{r['best_us']:>10.1f}{r['rule_us'] / r['best_us']:>10.2f}")
    return rows
