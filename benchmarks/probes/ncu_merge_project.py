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
from _probe import require_gpu  # also puts benchmarks/ on sys.path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192x4x4096")
    parser.add_argument("--launches", type=int, default=3)
    args = parser.parse_args(argv)
    require_gpu("ncu_merge_project.py")
    from bench_merge_project import merge_project_inputs

    from megatron_mhc.kernels.cuda import merge_project as cuda_mp
    from megatron_mhc.kernels.triton import merge as triton_merge

    t, n, c = (int(v) for v in args.shape.split("x"))
    x, y, hp, hr, phi = merge_project_inputs(t, n, c)
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
