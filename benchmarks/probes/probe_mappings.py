"""Time the per-token mapping kernels (Sinkhorn forward + pre-apply, Sinkhorn backward) over
tile shapes on a GPU: tokens per program (BT) and warps.

    python3 benchmarks/probes/probe_mappings.py [--tokens 4096 8192] [--hidden 768 4096]

Both kernels do per-token work (20 Sinkhorn iterations on an n x n tile) that is latency-bound
at small token counts; the mapping forward also reads x once for the pre-apply (its byte floor:
read x, write agg). Prints the median time per shape; the shape the ops launch
(``MAPPINGS_FWD_TILE`` / ``MAPPINGS_BWD_TILE`` in ``kernels/triton/mappings.py``) is marked
"(launched)". The first rows, (4, 4) forward and (16, 4) backward, were the launches before the
sixth part of issue 14.
"""

import argparse
import functools

import torch
import triton
from _probe import copy_bandwidth, require_gpu, time_us

from megatron_mhc.kernels import triton as triton_ops
from megatron_mhc.kernels.triton.mappings import mappings_bwd_kernel, mappings_fwd_kernel
from megatron_mhc.kernels.triton.projection import _project

FWD_SHAPES = [(4, 4), (4, 2), (4, 1), (2, 1), (8, 4), (8, 2), (16, 4)]
BWD_SHAPES = [(16, 4), (16, 2), (16, 1), (8, 1), (4, 1), (8, 2), (32, 4), (32, 2)]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launched(shape, tile) -> str:
    return " (launched)" if tuple(shape) == tuple(tile) else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--hidden", type=int, nargs="+", default=[768, 4096])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    require_gpu("probe_mappings.py")
    bw = copy_bandwidth()
    n, iters = args.n, args.iters
    m, np_ = n * n + 2 * n, triton.next_power_of_2(n)
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()} | copy bandwidth {bw / 1e12:.2f} TB/s | n={n}, "
          f"{iters} Sinkhorn iterations")
    print("| kernel | T | C | BT | warps | us | % of byte floor |")
    print("|---|---|---|---|---|---|---|")
    for t in args.tokens:
        for c in args.hidden:
            x = torch.randn(t, n, c, device=dev, dtype=torch.bfloat16)
            phi = (0.02 * torch.randn(n * c, m, device=dev)).to(torch.bfloat16)
            alpha = torch.full((3,), 0.5, device=dev)
            bias = torch.randn(m, device=dev)
            proj_part, ss_part = _project(x.view(t, n * c), phi, m)
            split = proj_part.shape[0]
            proj = torch.empty(t, m, device=dev)
            rinv = torch.empty(t, device=dev)
            h_pre, h_post = torch.empty(t, n, device=dev), torch.empty(t, n, device=dev)
            h_res = torch.empty(t, n, n, device=dev)
            agg = torch.empty(t, c, device=dev, dtype=x.dtype)
            floor = (x.numel() + agg.numel()) * 2 / bw * 1e6
            for bt, warps in FWD_SHAPES:
                launch = mappings_fwd_kernel[(cdiv(t, bt),)]
                us = time_us(functools.partial(
                    launch, proj_part, ss_part, alpha, bias, proj, rinv, h_pre, h_post, h_res,
                    x, agg, t, n * c, c, 1e-6, SPLIT=split, N=n, NP=np_, M=m,
                    BM=triton.next_power_of_2(max(m, 16)), VARIANT_MHC=True, ITERS=iters,
                    BT=bt, WITH_PRE=True, BC=512, num_warps=warps))
                print(f"| mappings_fwd (+pre-apply) | {t} | {c} | {bt} | {warps}"
                      f"{launched((bt, warps), triton_ops.MAPPINGS_FWD_TILE)} | {us:.1f} "
                      f"| {100 * floor / us:.0f} % |", flush=True)
            cb = cdiv(c, 512)
            dh_pre = torch.randn(t, n, device=dev)
            dh_post = torch.randn(t, cb, n, device=dev)
            dh_res = torch.randn(t, cb, n, n, device=dev)
            dproj = torch.empty(t, m, device=dev)
            coef = torch.empty(t, device=dev)
            scratch = torch.empty(t, 2 * iters * np_, device=dev)
            for bt, warps in BWD_SHAPES:
                blocks = cdiv(t, bt)
                dalpha_part = torch.empty(blocks, 3, device=dev)
                dbias_part = torch.empty(blocks, m, device=dev)
                us = time_us(functools.partial(
                    mappings_bwd_kernel[(blocks,)], proj, rinv, alpha, bias, dh_pre, dh_post,
                    dh_res, dproj, coef, dalpha_part, dbias_part, scratch, t, n * c, cb, N=n,
                    NP=np_, M=m, VARIANT_MHC=True, ITERS=iters, BT=bt, num_warps=warps))
                print(f"| mappings_bwd | {t} | {c} | {bt} | {warps}"
                      f"{launched((bt, warps), triton_ops.MAPPINGS_BWD_TILE)} | {us:.1f} | - |",
                      flush=True)


if __name__ == "__main__":
    main()
