"""Time every autotune config of norm_proj_bwd_kernel (entry backward's dx/dphi pass) on a GPU.

    python3 benchmarks/probes/probe_norm_proj_bwd.py [--tokens 8192] [--hidden 4096 7168]

Prints, per C and per tile config, the median time and % of the pass's byte floor (read x,
d_agg, write dx; dphi partials omitted), so the autotuner's choice can be checked.
"""

import argparse

import torch
import triton
from _probe import copy_bandwidth, require_gpu

from megatron_mhc.kernels.triton import PRE_MAPPINGS_BWD_TILE, dx_pass_splits
from megatron_mhc.kernels.triton.projection import arrival_counters, norm_proj_bwd_kernel


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 7168])
    parser.add_argument("--n", type=int, default=4)
    args = parser.parse_args()
    require_gpu("probe_norm_proj_bwd.py")
    bw = copy_bandwidth()
    kernel = norm_proj_bwd_kernel.fn  # the jitted kernel under the autotuner
    configs = norm_proj_bwd_kernel.configs
    n, t = args.n, args.tokens
    m = n * n + 2 * n
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; T={t} n={n}")
    print("| C | BK | BT | warps | stages | splits | us | % of floor |")
    print("|---|---|---|---|---|---|---|---|")
    for c in args.hidden:
        kdim = n * c
        x = torch.randn(t, kdim, device="cuda", dtype=torch.bfloat16)
        phi = torch.randn(kdim, m, device="cuda", dtype=torch.bfloat16)
        dproj = torch.randn(t, m, device="cuda")
        coef = torch.randn(t, device="cuda")
        hp = torch.rand(t, n, device="cuda")
        dagg = torch.randn(t, c, device="cuda", dtype=torch.bfloat16)
        dx = torch.empty_like(x)
        blocks = cdiv(t, PRE_MAPPINGS_BWD_TILE[0])  # the entry's alpha / bias partial rows
        dalpha_part, dbias_part = torch.randn(blocks, 3, device="cuda"), torch.randn(blocks, m, device="cuda")
        floor = t * (2 * kdim + c) * 2 / bw * 1e6
        for splits in (4, 8, 16):
            splits, rows = dx_pass_splits(t, splits)
            part = torch.empty(splits, kdim, m, device="cuda")
            dalpha_split = torch.empty(splits, 3, device="cuda")
            dbias_split = torch.empty(splits, m, device="cuda")
            grads = (torch.empty(kdim, m, device="cuda"), torch.empty(3, device="cuda"),
                     torch.empty(m, device="cuda"), arrival_counters(x.device, kdim))
            for cfg in configs:
                bk, bt = cfg.kwargs["BK"], cfg.kwargs["BT"]

                def run(bk=bk, bt=bt, cfg=cfg, kdim=kdim, c=c, x=x, phi=phi, dproj=dproj,
                        coef=coef, hp=hp, dagg=dagg, dx=dx, part=part, rows=rows, splits=splits,
                        sums=(dalpha_part, dbias_part, dalpha_split, dbias_split), g=blocks,
                        grads=grads):
                    kernel[(cdiv(kdim, bk), splits)](
                        x, phi, dproj, coef, dx, part, hp, dagg, dx, *sums, *grads, t, kdim, c,
                        rows, g, N=n, M=m, BM=32, SP=triton.next_power_of_2(splits), DOT_MODE=0,
                        WITH_PRE=True, ADD_DX=True, ACCUMULATE=False, BT=bt, BK=bk,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                try:
                    us = triton.testing.do_bench(run, return_mode="median") * 1e3
                except Exception as exc:  # e.g. out of shared memory
                    print(f"| {c} | {bk} | {bt} | {cfg.num_warps} | {cfg.num_stages} | {splits} "
                          f"| failed: {type(exc).__name__} | |")
                    continue
                print(f"| {c} | {bk} | {bt} | {cfg.num_warps} | {cfg.num_stages} | {splits} | "
                      f"{us:.0f} | {100 * floor / us:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
