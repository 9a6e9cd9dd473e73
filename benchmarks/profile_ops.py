"""Per-kernel GPU time of one forward + backward of each Triton mHC op (torch.profiler).

    python benchmarks/profile_ops.py [--tokens 8192] [--n 4] [--hidden 4096 7168]
                                     [--path fused|linked|unlinked] [--ops-module MODULE ...]

A diagnostic companion to bench_kernels.py: it shows which kernel of an op takes the time.
``--ops-module`` profiles other copies of the Triton ops too (e.g. a previous commit's
``kernels/`` importable as ``base_kernels``: ``--ops-module base_kernels.triton
megatron_mhc.kernels.triton``; a commit from before the split into one module per op has them in
``base_kernels.triton_ops``), one after the other per shape, for a before/after in one run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import defaultdict

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--path", choices=["fused", "linked", "unlinked"], default="fused",
                        help="fused: linked pair with cross-sublayer fusion (steady state); "
                             "linked: enter_linked + merge_linked; unlinked: enter + merge")
    parser.add_argument("--ops-module", nargs="+", default=["megatron_mhc.kernels.triton"],
                        help="modules with the Triton ops' interface to profile, in turn")
    parser.add_argument("--rounds", type=int, default=1,
                        help="profile every module this many times, interleaved")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"{__file__.rsplit('/', 1)[-1]} needs a CUDA GPU")
    modules = [importlib.import_module(name) for name in args.ops_module]
    for hidden in args.hidden:
        for round_ in range(args.rounds):
            for name, ops in zip(args.ops_module, modules):
                label = f"{name}, round {round_ + 1}" if len(modules) > 1 or args.rounds > 1 else ""
                profile(args.tokens, args.n, hidden, args.repeat, args.path, ops, label)


def _kernel(ops, name: str):
    """The Triton kernel ``name`` of an ops module: in one of its op modules (``kernels/triton/``)
    or, in a copy from before the split into one module per op, in its ``K`` (triton_kernels)."""
    holders = [getattr(ops, "K", None)] + [getattr(ops, m, None) for m in ("projection", "merge")]
    for holder in holders:
        if holder is not None and hasattr(holder, name):
            return getattr(holder, name)
    return None


def profile(tokens, n, hidden, repeat, path, ops, label=""):
    from megatron_mhc.core.ops import reference

    t, c, m = tokens, hidden, n * n + 2 * n
    dt = torch.bfloat16
    x = torch.randn(t, n, c, device="cuda", dtype=dt, requires_grad=True)
    y = torch.randn(t, c, device="cuda", dtype=dt, requires_grad=True)
    phi = (torch.randn(n * c, m, device="cuda") * 0.01).to(dt).requires_grad_(True)
    alpha = torch.full((3,), 0.01, device="cuda", requires_grad=True)
    bias = torch.randn(m, device="cuda", requires_grad=True)

    d_agg = torch.randn(t, c, device="cuda", dtype=dt)
    d_out = torch.randn(t, n, c, device="cuda", dtype=dt)

    phi_next = phi.detach().flip(0).requires_grad_(True)
    projection = ops.project_stream(x, phi)

    def step():
        # One sublayer's mHC work; y stands in for the sublayer output F(agg).
        if path == "unlinked":
            agg, h_post, h_res = ops.enter(x, phi, alpha, bias, "mhc", 20, 1e-6)
            out = ops.post_res_merge(x, y, h_post, h_res)
        elif path == "linked":
            agg, h_post, h_res, x_link, link = ops.enter_linked(x, phi, alpha, bias)
            out = ops.merge_linked(x_link, y, h_post, h_res, link)
        else:
            agg, h_post, h_res, x_link, link = ops.enter_linked(x, phi, alpha, bias,
                                                                projection=projection)
            out, _ = ops.merge_linked_project(x_link, y, h_post, h_res, link, phi_next)
        torch.autograd.backward([agg, out], [d_agg, d_out])
        for leaf in (x, y, phi, alpha, bias):  # no gradient-accumulation adds in the profile
            leaf.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            step()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    counts = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time
            counts[event.name] += 1
    print(f"\nT={t} n={n} C={c} bf16, {path} path{', ' + label if label else ''}: GPU time per "
          f"step by kernel (microseconds), total {sum(totals.values()) / repeat:.1f}")
    print("| kernel | us per step | calls per step |")
    print("|---|---|---|")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {name[:90]} | {us / repeat:.1f} | {counts[name] / repeat:.0f} |")
    for kernel_name in ("norm_proj_bwd_kernel", "post_res_proj_fwd_kernel"):
        tuned = getattr(_kernel(ops, kernel_name), "cache", None)
        if tuned:  # the autotuner's pick per key (it can differ between runs and modules)
            picks = "; ".join(str(cfg) for cfg in tuned.values())
            print(f"{kernel_name} autotuned: {picks}")
    del reference


if __name__ == "__main__":
    main()
