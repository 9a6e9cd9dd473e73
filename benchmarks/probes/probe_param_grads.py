"""Time the parameter-grad reduction of the mapping backward (``param_grads_kernel``) on a GPU,
whole and by part: the dphi programs alone (each sums the T-split partials of BK rows of dphi)
and the alpha/bias program alone (sums the per-split partials the dx pass made of the mapping
backward's per-token-block partials), over BK.

    python3 benchmarks/probes/probe_param_grads.py [--shapes 4096x768 8192x4096 8192x7168]

Shapes are tokens x C (n = 4), with the split and block counts the ops use. Prints the median
time of each launch and the bytes it reads against the copy bandwidth (its byte floor).
"""

import argparse
import functools

import torch
import triton
from _probe import copy_bandwidth, require_gpu, time_us

from megatron_mhc.kernels.triton import dx_pass_splits
from megatron_mhc.kernels.triton.projection import param_grads_kernel


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch(grid, tensors, k, splits, m, bk):
    param_grads_kernel[grid](*tensors, k, splits, M=m, BM=triton.next_power_of_2(max(m, 16)),
                               BK=bk, SP=triton.next_power_of_2(splits), ACCUMULATE=False,
                               num_warps=4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x768", "8192x4096", "8192x7168"])
    parser.add_argument("--n", type=int, default=4)
    args = parser.parse_args()
    require_gpu("probe_param_grads.py")
    bw, n = copy_bandwidth(), args.n
    m = n * n + 2 * n
    print(f"{torch.cuda.get_device_name()} | copy bandwidth {bw / 1e12:.2f} TB/s | n={n}")
    print("| T | C | launch | BK | programs | us | floor us |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        t, c = (int(v) for v in shape.split("x"))
        kdim = n * c
        splits = dx_pass_splits(t)[0]
        dphi_part = torch.randn(splits, kdim, m, device="cuda")
        dalpha_part = torch.randn(splits, 3, device="cuda")
        dbias_part = torch.randn(splits, m, device="cuda")
        dphi = torch.empty(kdim, m, device="cuda", dtype=torch.bfloat16)
        dalpha = torch.empty(3, device="cuda", dtype=torch.bfloat16)
        dbias = torch.empty(m, device="cuda", dtype=torch.bfloat16)
        part_floor = (dphi_part.numel() * 4 + dphi.numel() * 2) / bw * 1e6
        bias_floor = (dalpha_part.numel() + dbias_part.numel()) * 4 / bw * 1e6

        tensors = (dphi_part, dphi, dalpha_part, dalpha, dbias_part, dbias)
        for bk in (16, 32, 64):
            progs = cdiv(kdim, bk)
            for name, grid, k, floor in (("whole", (progs + 1,), kdim, part_floor + bias_floor),
                                         ("dphi programs only", (progs,), kdim, part_floor),
                                         ("alpha/bias program only", (1,), 0, bias_floor)):
                if name.startswith("alpha") and bk != 16:
                    continue
                us = time_us(functools.partial(launch, grid, tensors, k, splits, m, bk))
                print(f"| {t} | {c} | {name} | {bk} | {grid[0]} | {us:.1f} | {floor:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
