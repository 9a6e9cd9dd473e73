"""Launch the CUDA merge + projection kernel (and, beside it, Triton's plain merge kernel) a few
times on one shape, for Nsight Compute to profile one launch of each:

    ncu --clock-control none --kernel-name regex:"merge_project_kernel|post_res_fwd_kernel" \
        --launch-skip 4 --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section LaunchStats --section SourceCounters -o merge_project \
        python3 benchmarks/probes/ncu_merge_project.py [--shape 8192x4x4096]

(the kernels are built with -lineinfo, so SourceCounters names the .cu lines that stall).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192x4x4096")
    parser.add_argument("--launches", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("ncu_merge_project.py needs a CUDA GPU")
    from megatron_mhc.kernels.cuda import merge_project as cuda_mp
    from megatron_mhc.kernels.triton import merge as triton_merge

    t, n, c = (int(v) for v in args.shape.split("x"))
    m = n * n + 2 * n
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(t, n, c, device="cuda", generator=g).bfloat16()
    y = torch.randn(t, c, device="cuda", generator=g).bfloat16()
    hp = 2 * torch.rand(t, n, device="cuda", generator=g)
    hr = torch.rand(t, n, n, device="cuda", generator=g)
    hr = hr / hr.sum(-1, keepdim=True)
    phi = (torch.randn(n * c, m, device="cuda", generator=g) / (n * c) ** 0.5).bfloat16()
    reason = cuda_mp.unsupported_reason(x, phi)
    if reason:
        sys.exit(f"CUDA kernel unavailable: {reason}")
    for _ in range(args.launches):
        cuda_mp.merge_project_forward(x, y, hp, hr, phi)
        triton_merge._launch_post_res_fwd(x, y, hp, hr, torch.empty_like(x))
    torch.cuda.synchronize()
    print(f"{args.launches} launches of each at T={t} n={n} C={c}")


if __name__ == "__main__":
    main()
