"""Benchmark of the mHC ops on a GPU: eager PyTorch vs TileKernels vs this project's Triton kernels.

    python benchmarks/bench_kernels.py [--tokens 8192] [--n 4] [--hidden 4096 7168]

For each op, forward and backward: the median time (triton.testing.do_bench), the floor (the
fewest bytes the op must move, each input read once and each output written once, divided by the
measured device-to-device copy bandwidth) and the fraction of the floor reached (floor / time).
TileKernels (DeepSeek's ``tile-kernels``) is timed where it has the same op and is installed.
"""

from __future__ import annotations

import argparse
import sys

import torch


def copy_bandwidth() -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    import triton

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bench(fn) -> float:
    """Median milliseconds of ``fn`` after warm-up."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def backward_timer(fn, inputs, grads):
    """A callable timing only the backward of ``fn`` (graph built once, retained)."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    wrt = [leaf for leaf in leaves if leaf.requires_grad]

    def run():
        torch.autograd.grad(outs, wrt, grads, retain_graph=True)

    return run


def tile_kernels_ops():
    """TileKernels' matching ops, or the reason they cannot run here."""
    try:
        from tile_kernels import mhc as tk
    except Exception as exc:  # not installed, or no usable TileLang
        return None, f"{type(exc).__name__}: {exc}"
    return tk, ""


def run(tokens: int, n: int, hidden: int, bandwidth: float, rows: list) -> None:
    from megatron_mhc.core.ops import reference
    from megatron_mhc.kernels.triton_ops import TRITON_OPS

    dt, t, c = torch.bfloat16, tokens, hidden
    m = n * n + 2 * n
    gen = torch.Generator(device="cuda").manual_seed(hidden)
    x = torch.randn(t, n, c, device="cuda", dtype=dt, generator=gen)
    y = torch.randn(t, c, device="cuda", dtype=dt, generator=gen)
    phi = (torch.randn(n * c, m, device="cuda", generator=gen) * 0.01).to(dt)
    alpha = torch.full((3,), 0.01, device="cuda")
    bias = torch.randn(m, device="cuda", generator=gen)
    h_pre = torch.rand(t, n, device="cuda", generator=gen)
    h_post = 2 * torch.rand(t, n, device="cuda", generator=gen)
    h_res = reference.sinkhorn(torch.randn(t, n, n, device="cuda", generator=gen))
    d_streams = torch.randn(t, n, c, device="cuda", dtype=dt, generator=gen)
    d_c = torch.randn(t, c, device="cuda", dtype=dt, generator=gen)
    d_maps = (torch.randn(t, n, device="cuda"), torch.randn(t, n, device="cuda"),
              torch.randn(t, n, n, device="cuda"))
    b = dt.itemsize
    # Fewest bytes per op (inputs once, outputs once; fp32 mapping tensors counted too).
    floors = {
        ("mappings (norm+proj+Sinkhorn)", "fwd"): t * (n * c * b + 4 * (m + 1)),
        ("mappings (norm+proj+Sinkhorn)", "bwd"): t * (2 * n * c * b + 4 * m),
        ("entry (mappings + pre-apply, fused)", "fwd"): t * (n * c * b + c * b + 4 * (m + 1)),
        ("entry (mappings + pre-apply, fused)", "bwd"): t * (2 * n * c * b + c * b + 4 * m),
        ("pre-apply", "fwd"): t * (n * c * b + c * b + 4 * n),
        ("pre-apply", "bwd"): t * (2 * n * c * b + c * b + 8 * n),
        ("post/res merge", "fwd"): t * (2 * n * c * b + c * b + 4 * (n + n * n)),
        ("post/res merge", "bwd"): t * (3 * n * c * b + 2 * c * b + 8 * (n + n * n)),
    }
    ops = {
        "mappings (norm+proj+Sinkhorn)": (
            lambda o: (lambda x, p, a, bb: o.compute_mappings(x, p, a, bb, "mhc", 20, 1e-6)),
            [x, phi, alpha, bias], d_maps),
        "entry (mappings + pre-apply, fused)": (
            lambda o: (lambda x, p, a, bb: o.enter(x, p, a, bb, "mhc", 20, 1e-6)),
            [x, phi, alpha, bias], (d_c,) + d_maps[1:]),
        "pre-apply": (lambda o: o.pre_apply, [x, h_pre], (d_c,)),
        "post/res merge": (lambda o: o.post_res_merge, [x, y, h_post, h_res], (d_streams,)),
    }
    tk, tk_reason = tile_kernels_ops()
    tk_timers = {}
    if tk is not None:
        o_pre = torch.empty(t, c, device="cuda", dtype=dt)
        x_grad = torch.empty_like(x)
        x4, y3 = x.view(1, t, n, c), y.view(1, t, c)
        hp4, hr4 = h_post.view(1, t, n, 1).contiguous(), h_res.view(1, t, n, n).contiguous()
        tk_timers = {
            ("pre-apply", "fwd"): lambda: tk.mhc_pre_apply_mix_fwd(x, h_pre, o_pre),
            ("pre-apply", "bwd"): lambda: tk.mhc_pre_apply_mix_bwd(d_c, x, h_pre, x_grad),
            ("post/res merge", "fwd"): lambda: tk.mhc_post_fwd(y3, x4, hp4, hr4),
            ("post/res merge", "bwd"): lambda: tk.mhc_post_bwd(
                y3, x4, hp4, hr4, d_streams.view(1, t, n, c)),
        }
    for name, (make, inputs, grads) in ops.items():
        timers = {}
        for backend, o in (("eager", reference), ("triton", TRITON_OPS)):
            fn = make(o)
            timers[(backend, "fwd")] = lambda fn=fn, inputs=inputs: fn(*inputs)
            timers[(backend, "bwd")] = backward_timer(fn, inputs, grads)
        for direction in ("fwd", "bwd"):
            floor_ms = floors[(name, direction)] / bandwidth * 1e3
            eager = bench(timers[("eager", direction)])
            ours = bench(timers[("triton", direction)])
            tk_fn = tk_timers.get((name, direction))
            tk_ms = bench(tk_fn) if tk_fn is not None else None
            rows.append((c, name, direction, eager, tk_ms, ours, floor_ms))
    if tk is None:
        print(f"TileKernels not timed: {tk_reason}", file=sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 7168])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    bandwidth = copy_bandwidth()
    rows: list = []
    for hidden in args.hidden:
        run(args.tokens, args.n, hidden, bandwidth, rows)
    print(f"device: {torch.cuda.get_device_name()} | copy bandwidth {bandwidth / 1e12:.2f} TB/s "
          f"(read + write) | T={args.tokens} n={args.n} bf16 | times in microseconds (median)")
    print("| C | op | dir | eager torch | TileKernels | triton (ours) | floor | ours % of floor "
          "| TK % of floor | speed-up vs eager |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c, name, direction, eager, tk_ms, ours, floor_ms in rows:
        tk_txt = f"{tk_ms * 1e3:.1f}" if tk_ms is not None else "n/a"
        tk_pct = f"{100 * floor_ms / tk_ms:.0f}%" if tk_ms is not None else "n/a"
        print(f"| {c} | {name} | {direction} | {eager * 1e3:.1f} | {tk_txt} | {ours * 1e3:.1f} | "
              f"{floor_ms * 1e3:.1f} | {100 * floor_ms / ours:.0f}% | {tk_pct} | "
              f"{eager / ours:.1f}x |")


if __name__ == "__main__":
    main()
