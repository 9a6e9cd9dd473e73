"""Entry forward: the Triton path (projection + mapping/pre-apply kernels, `_mappings_forward(...,
with_pre=True)`) against the one-pass CUDA kernel (kernels/cuda/entry_forward.cu), as % of the
byte floor.

Floor = (one read of x + one write of agg + the per-token float32 outputs) / the copy bandwidth
measured in the same run (a 1 GiB device-to-device copy, bytes read + written). Each timing is the
median of `triton.testing.do_bench` (L2 flushed between repetitions by do_bench; x is 268+ MB, far
over L2, and NBUF input sets rotate), in ROUNDS interleaved rounds; the table shows the median over
rounds.

    python benchmarks/bench_entry_forward.py [--shapes 8192x4x4096,8192x4x7168] [--rounds 3]
        [--plans 16,6,4;16,8,6] [--iters-probe]

``--plans``: also time these CUDA launch plans (cluster, stages, distance); ``--iters-probe``: the
CUDA kernel with 1 Sinkhorn iteration as well (how much the mapping latency costs), and timing
probes without the projection loop (probe1), the pre-apply loop (probe2) or both (probe3).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_kernels import copy_bandwidth  # noqa: E402

from megatron_mhc.kernels.cuda import entry as cuda_entry  # noqa: E402
from megatron_mhc.kernels.triton.mappings import _mappings_forward  # noqa: E402

NBUF = 2


def floor_bytes(t, n, c):
    m = n * n + 2 * n
    return t * n * c * 2 + t * c * 2 + t * (m + 1 + 2 * n + n * n) * 4


class _Rotating:
    """NBUF input sets, a different one for each call."""

    def __init__(self, t, n, c):
        m = n * n + 2 * n
        self.bufs = [(torch.randn(t, n, c, device="cuda").to(torch.bfloat16),
                      (torch.randn(n * c, m, device="cuda") / (n * c) ** 0.5).to(torch.bfloat16),
                      torch.rand(3, device="cuda") + 0.5, torch.randn(m, device="cuda") * 0.5)
                     for _ in range(NBUF)]
        self.i = 0

    def __call__(self):
        self.i = (self.i + 1) % NBUF
        return self.bufs[self.i]


def bench_shape(t, n, c, bw, plans, rounds, iters_probe):
    nxt = _Rotating(t, n, c)
    variants = {
        "triton": lambda: _mappings_forward(*nxt(), True, 20, 1e-6, with_pre=True),
        "cuda": lambda: cuda_entry.entry_forward(*nxt(), True, 20, 1e-6, fallback=False),
    }
    for p in plans:
        variants[f"cuda{p}"] = (lambda p=p: cuda_entry.entry_forward(
            *nxt(), True, 20, 1e-6, plan=p, fallback=False))
    if iters_probe:
        variants["cuda iters=1"] = lambda: cuda_entry.entry_forward(*nxt(), True, 1, 1e-6,
                                                                    fallback=False)
        # timing probes (wrong results): no projection loop / no pre-apply loop / neither
        for dbg in (1, 2, 3):
            variants[f"cuda probe{dbg}"] = (lambda dbg=dbg: cuda_entry.entry_forward(
                *nxt(), True, 20, 1e-6, fallback=False, _debug=dbg))
    plan_info = {}
    for name, fn in list(variants.items()):
        try:
            fn()
        except RuntimeError as exc:  # a forced plan that does not fit this shape
            print(f"T={t} n={n} C={c} {name}: {exc}")
            del variants[name]
            continue
        if name.startswith("cuda"):
            plan_info[name] = cuda_entry.last_plan()
    torch.cuda.synchronize()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=200,
                                                       return_mode="median"))
    floor_us = floor_bytes(t, n, c) / bw * 1e6
    rows = []
    for name in variants:
        us = statistics.median(times[name]) * 1e3
        spread = (max(times[name]) - min(times[name])) * 1e3
        rows.append((t, n, c, floor_us, name, us, spread, plan_info.get(name)))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x4x4096,8192x4x7168")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plans", default="")
    ap.add_argument("--iters-probe", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    ok, reason = cuda_entry.availability()
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"triton {triton.__version__} | CUDA kernel: {reason}")
    bw = copy_bandwidth()
    print(f"copy bandwidth (1 GiB d2d, read + write): {bw / 1e12:.3f} TB/s")
    plans = [tuple(int(v) for v in p.split(",")) for p in args.plans.split(";") if p]
    rows = []
    for shape in args.shapes.split(","):
        t, n, c = (int(v) for v in shape.split("x"))
        rows += bench_shape(t, n, c, bw, plans, args.rounds, args.iters_probe)
        torch.cuda.empty_cache()
    print()
    print("| T | n | C | floor µs | path | µs (median of rounds) | spread µs | % of floor | plan |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t, n, c, floor_us, name, us, spread, plan in rows:
        plan_s = ("" if plan is None else
                  f"cluster {plan['cluster']}, {plan['stages']} stages, D={plan['distance']}, "
                  f"{plan['clusters']} clusters, {plan['smem'] // 1024} KiB")
        print(f"| {t} | {n} | {c} | {floor_us:.1f} | {name} | {us:.1f} | {spread:.1f} | "
              f"{100 * floor_us / us:.1f} % | {plan_s} |")


if __name__ == "__main__":
    main()
