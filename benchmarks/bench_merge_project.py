"""The merge fused with the next sublayer's projection partials (the cross-sublayer fusion's
forward): the CUDA kernel (kernels/cuda/merge_project.cu) against the Triton fused kernel and the
two unfused Triton kernels (the plain merge, then the projection pass over its output), as % of
the byte floor.

Floor = (read x [T, n, C] and y [T, C], write out [T, n, C], h_post / h_res and the float32
partials) / the copy bandwidth measured in the same run (a 1 GiB device-to-device copy, bytes
read + written). Each timing is the median of `triton.testing.do_bench` (L2 flushed by do_bench
between repetitions); ROUNDS interleaved rounds, the table shows the median over rounds.

    python benchmarks/bench_merge_project.py [--shapes 8192x4x4096,8192x4x7168] [--rounds 3]
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_kernels import copy_bandwidth  # noqa: E402

from megatron_mhc.kernels.cuda import merge_project as cuda_mp  # noqa: E402
from megatron_mhc.kernels.triton import merge as triton_merge  # noqa: E402
from megatron_mhc.kernels.triton.projection import _project  # noqa: E402


def floor_bytes(t, n, c, slices):
    m = n * n + 2 * n
    return t * (2 * n * c * 2 + c * 2 + 4 * (n + n * n) + 4 * slices * (m + 1))


def merge_project_inputs(t: int, n: int, c: int):
    """Seeded operands of the merge + projection on the GPU: bf16 ``x [T, n, C]``, ``y [T, C]``,
    float32 ``h_post [T, n]`` in (0, 2), row-stochastic ``h_res [T, n, n]`` and bf16
    ``phi [n*C, n*n + 2n]``."""
    m = n * n + 2 * n
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(t, n, c, device="cuda", generator=g).bfloat16()
    y = torch.randn(t, c, device="cuda", generator=g).bfloat16()
    hp = 2 * torch.rand(t, n, device="cuda", generator=g)
    hr = torch.rand(t, n, n, device="cuda", generator=g)
    hr = hr / hr.sum(-1, keepdim=True)
    phi = (torch.randn(n * c, m, device="cuda", generator=g) / (n * c) ** 0.5).bfloat16()
    return x, y, hp, hr, phi


def run_shape(t: int, n: int, c: int, rounds: int, bandwidth: float) -> None:
    """One shape's correctness cross-check and timing table."""
    shape = f"{t}x{n}x{c}"
    m = n * n + 2 * n
    x, y, hp, hr, phi = merge_project_inputs(t, n, c)
    reason = cuda_mp.unsupported_reason(x, phi)
    if reason:
        print(f"{shape}: CUDA kernel unavailable: {reason}")
        return
    out_c, part_c, ss_c = cuda_mp.merge_project_forward(x, y, hp, hr, phi)
    out_t, part_t, ss_t = triton_merge._launch_post_res_proj_fwd(x, y, hp, hr, phi)
    diff_out = (out_c.float() - out_t.float()).abs().max().item()
    rel_proj = ((part_c.sum(0) - part_t.sum(0)).norm() / part_t.sum(0).norm()).item()
    slices = part_c.shape[0]

    def unfused():
        out = triton_merge._launch_post_res_fwd(x, y, hp, hr, torch.empty_like(x))
        return _project(out.view(t, n * c), phi, m)

    fns = {
        "CUDA merge + projection (one kernel)": lambda: cuda_mp.merge_project_forward(
            x, y, hp, hr, phi),
        "Triton merge + projection (one kernel)": lambda: triton_merge._launch_post_res_proj_fwd(
            x, y, hp, hr, phi),
        "Triton merge, then projection pass": unfused,
        "Triton merge alone": lambda: triton_merge._launch_post_res_fwd(
            x, y, hp, hr, torch.empty_like(x)),
    }
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=200,
                                                       return_mode="median"))
    floor_ms = floor_bytes(t, n, c, slices) / bandwidth * 1e3
    print(f"\nT={t} n={n} C={c} bf16: floor {floor_ms * 1e3:.1f} us ({slices} slices of "
          f"partials); CUDA vs Triton fused: max |out diff| {diff_out:.3g}, projection rel "
          f"diff {rel_proj:.2e}; median of {rounds} interleaved rounds")
    print("| kernel(s) | us | % of the merge + projection floor |")
    print("|---|---|---|")
    for name, ts in times.items():
        us = statistics.median(ts) * 1e3
        print(f"| {name} | {us:.1f} | {100 * floor_ms * 1e3 / us:.1f} % |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8192x4x4096,8192x4x7168")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for shape in args.shapes.split(","):
        run_shape(*(int(v) for v in shape.split("x")), args.rounds, bandwidth)


if __name__ == "__main__":
    main()
