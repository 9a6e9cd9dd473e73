"""Tile shapes of the merge + next-projection kernel (``post_res_proj_fwd_kernel``) on a GPU.

    python benchmarks/probes/probe_merge_project.py [--tokens 8192] [--hidden 4096 7168]

Times the kernel alone for each (BT, BC, warps, stages, channels per split) against the plain
merge kernel and the floor (x, y read once, out written once), to choose the tuned configs.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
import triton


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 7168])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"{__file__.rsplit('/', 1)[-1]} needs a CUDA GPU")
    from megatron_mhc.kernels.triton.merge import post_res_fwd_kernel, post_res_proj_fwd_kernel

    n, m, t = 4, 24, args.tokens
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")  # noqa: E731
    for c in args.hidden:
        x = torch.randn(t, n, c, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(t, c, device="cuda", dtype=torch.bfloat16)
        hp = torch.rand(t, n, device="cuda")
        hr = torch.rand(t, n, n, device="cuda")
        phi = (torch.randn(n * c, m, device="cuda") * 0.01).to(torch.bfloat16)
        out = torch.empty_like(x)
        floor_us = (2 * n * c + c) * 2 * t / 3.0e12 * 1e6
        plain = bench(partial(post_res_fwd_kernel[(t // 2, c // 512)],
                              x, y, hp, hr, out, t, c, N=n, NP=n, BT=2, BC=512, num_warps=4)) * 1e3
        print(f"C={c}: floor {floor_us:.0f} us at 3.0 TB/s; plain merge kernel {plain:.0f} us",
              flush=True)
        print("| BT | BC | warps | stages | C per split | us | % of floor |")
        print("|---|---|---|---|---|---|---|")
        for bt, bc, warps, stages, per in (
                (32, 128, 4, 1, 512), (32, 128, 4, 3, 512), (64, 64, 8, 1, 512),
                (16, 128, 4, 1, 512), (16, 256, 4, 1, 256), (16, 512, 8, 1, 512),
                (32, 256, 8, 1, 256), (64, 128, 8, 1, 128), (16, 128, 4, 1, 128),
                (32, 128, 4, 1, 128), (16, 64, 2, 1, 128)):
            split = -(-c // per)
            part = torch.empty(split, t, m, device="cuda")
            ss = torch.empty(split, t, device="cuda")
            launch = partial(post_res_proj_fwd_kernel.fn[(-(-t // bt), split)],
                             x, y, hp, hr, out, phi, part, ss, t, c, per, N=n, M=m, BM=32,
                             DOT_MODE=0, BT=bt, BC=bc, num_warps=warps, num_stages=stages)
            try:
                us = bench(launch) * 1e3
            except Exception as exc:  # out of resources for this shape
                print(f"| {bt} | {bc} | {warps} | {stages} | {per} | failed: {type(exc).__name__} | |")
                continue
            print(f"| {bt} | {bc} | {warps} | {stages} | {per} | {us:.0f} | "
                  f"{100 * floor_us / us:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
