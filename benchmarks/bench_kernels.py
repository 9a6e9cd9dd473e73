"""Benchmark of the mHC ops on a GPU: eager PyTorch vs TileKernels vs this project's Triton kernels.

    python benchmarks/bench_kernels.py [--tokens 8192] [--n 4] [--hidden 4096 7168] [--rounds 5]
                                       [--only ops|sublayer]

For each op, forward and backward: the median time (triton.testing.do_bench), the floor (the
fewest bytes the op must move, each input read once and each output written once, divided by the
measured device-to-device copy bandwidth) and the fraction of the floor reached (floor / time).
TileKernels (DeepSeek's ``tile-kernels``) is timed where it has the same op and is installed.

A second table times one sublayer's whole mHC work (entry + merge around an identity sublayer,
fwd + bwd) with its peak memory: this project's linked pair with cross-sublayer fusion (the entry
takes the previous merge's projection, the merge makes the next one's), without it (bf16 and tf32
backward GEMMs), with the opt-in "dx once" backward (``MHC_BACKWARD_DX_ONCE``), the unlinked
composition, and the peers users could pick instead — Transformer-Engine's
``transformer_engine.pytorch.triton.mhc`` (with and without its ``fused_grad_x_acc_buffer``,
allocated once and not re-zeroed between steps: timing only, its values are not checked) and
Liger-Kernel's ``liger_mhc_*`` — in interleaved rounds of one run.
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
    from megatron_mhc.kernels.triton import TRITON_OPS

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
        # Cross-sublayer fusion: the entry given the previous merge's projection reads x once
        # (the pre-apply), the merge that also projects its output writes the partials too.
        ("entry given the merge's projection", "fwd"): t * (n * c * b + c * b + 4 * (m + 1)),
        ("entry given the merge's projection", "bwd"): t * (2 * n * c * b + c * b + 4 * m),
        ("post/res merge + next projection", "fwd"):
            t * (2 * n * c * b + c * b + 4 * (n + n * n) + 4 * (m + 1)),
    }
    from megatron_mhc.kernels import triton as T

    projection = T.project_stream(x, phi)
    phi_next = (torch.randn(n * c, m, device="cuda", generator=gen) * 0.01).to(dt)

    def entry_given(o):
        if o is reference:
            return lambda x, p, a, bb: o.enter(x, p, a, bb, "mhc", 20, 1e-6)
        return lambda x, p, a, bb: T.enter_linked(
            x, p, a, bb, projection=T.StreamProjection(projection.proj_part, projection.ss_part,
                                                       p))[:3]

    def merge_project(o):
        if o is reference:
            def eager(x, y, hp, hr):
                out = o.post_res_merge(x, y, hp, hr)
                flat = out.flatten(-2)
                return out, flat @ phi_next, flat.float().square().sum(-1)
            return eager
        return lambda x, y, hp, hr: T.merge_linked_project(x, y, hp, hr, T.SublayerLink(),
                                                           phi_next)
    ops = {
        "mappings (norm+proj+Sinkhorn)": (
            lambda o: (lambda x, p, a, bb: o.compute_mappings(x, p, a, bb, "mhc", 20, 1e-6)),
            [x, phi, alpha, bias], d_maps),
        "entry (mappings + pre-apply, fused)": (
            lambda o: (lambda x, p, a, bb: o.enter(x, p, a, bb, "mhc", 20, 1e-6)),
            [x, phi, alpha, bias], (d_c,) + d_maps[1:]),
        "pre-apply": (lambda o: o.pre_apply, [x, h_pre], (d_c,)),
        "post/res merge": (lambda o: o.post_res_merge, [x, y, h_post, h_res], (d_streams,)),
        "entry given the merge's projection": (entry_given, [x, phi, alpha, bias],
                                               (d_c,) + d_maps[1:]),
        "post/res merge + next projection": (merge_project, [x, y, h_post, h_res], None),
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
            if grads is not None:  # (the merge + projection's backward is the merge's)
                timers[(backend, "bwd")] = backward_timer(fn, inputs, grads)
        for direction in ("fwd", "bwd") if grads is not None else ("fwd",):
            floor_ms = floors[(name, direction)] / bandwidth * 1e3
            eager = bench(timers[("eager", direction)])
            ours = bench(timers[("triton", direction)])
            tk_fn = tk_timers.get((name, direction))
            tk_ms = bench(tk_fn) if tk_fn is not None else None
            rows.append((c, name, direction, eager, tk_ms, ours, floor_ms))
            print_op_row(rows[-1])
    if tk is None:
        print(f"TileKernels not timed: {tk_reason}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# One sublayer's whole mHC work (entry + merge, identity sublayer, fwd + bwd) vs the peers.
# ---------------------------------------------------------------------------------------------
def sublayer_floor_bytes(t: int, n: int, c: int, b: int) -> int:
    """The sum of the four op floors (entry fwd/bwd, merge fwd/bwd; mapping tensors omitted):
    (8 n C + 5 C) bytes-per-element per token, as in the issue's table."""
    return t * (8 * n * c + 5 * c) * b


def sublayer_steps(t: int, n: int, c: int) -> dict:
    """name -> (step closure running fwd + bwd on fresh leaves, or None, reason)."""
    from megatron_mhc.kernels import triton as T
    from megatron_mhc.kernels.triton import _launch  # BACKWARD_DX_ONCE, read at every backward
    from megatron_mhc.kernels.triton import projection as proj_module  # BACKWARD_DOT_OPERANDS

    dt, m = torch.bfloat16, n * n + 2 * n
    gen = torch.Generator(device="cuda").manual_seed(c + 1)
    x0 = torch.randn(t, n, c, device="cuda", dtype=dt, generator=gen)
    phi0 = torch.randn(n * c, m, device="cuda", generator=gen) * 0.01
    alpha0 = torch.full((3,), 0.01, device="cuda")
    bias0 = torch.randn(m, device="cuda", generator=gen)
    grad = torch.randn(t, n, c, device="cuda", dtype=dt, generator=gen)

    def leaves(*tensors):
        return [v.detach().clone().requires_grad_(True) for v in tensors]

    def ours(linked: bool, dot: str, dx_once: bool = False):
        x, phi, alpha, bias = leaves(x0, phi0.to(dt), alpha0.to(dt), bias0.to(dt))

        def step():
            proj_module.BACKWARD_DOT_OPERANDS = dot
            default_dx_once = _launch.BACKWARD_DX_ONCE
            _launch.BACKWARD_DX_ONCE = "1" if dx_once else "0"
            try:
                if linked:
                    agg, hp, hr, x_link, link = T.enter_linked(x, phi, alpha, bias)
                    out = T.merge_linked(x_link, agg, hp, hr, link)
                else:
                    agg, hp, hr = T.enter(x, phi, alpha, bias)
                    out = T.post_res_merge(x, agg, hp, hr)
                out.backward(grad)
            finally:
                proj_module.BACKWARD_DOT_OPERANDS = "input"
                _launch.BACKWARD_DX_ONCE = default_dx_once
            for v in (x, phi, alpha, bias):
                v.grad = None
        return step, ""

    def ours_fused():
        # The steady state of cross-sublayer fusion: this sublayer's entry takes the projection
        # the previous merge made, and its merge makes the next sublayer's.
        x, phi, alpha, bias, phi_next = leaves(x0, phi0.to(dt), alpha0.to(dt), bias0.to(dt),
                                               phi0.flip(0).to(dt))
        projection = T.project_stream(x, phi)

        def step():
            agg, hp, hr, x_link, link = T.enter_linked(x, phi, alpha, bias, projection=projection)
            out, _ = T.merge_linked_project(x_link, agg, hp, hr, link, phi_next)
            out.backward(grad)
            for v in (x, phi, alpha, bias):
                v.grad = None
        return step, ""

    steps = {
        "ours, linked + cross-sublayer fusion": ours_fused(),
        "ours, linked (bf16 bwd GEMMs)": ours(True, "input"),
        "ours, linked (tf32 bwd GEMMs)": ours(True, "tf32"),
        "ours, linked, dx-once backward": ours(True, "input", dx_once=True),
        "ours, unlinked (enter + merge, autograd dx add)": ours(False, "input"),
    }
    try:
        from transformer_engine.pytorch.triton import mhc as te_mhc
    except Exception as exc:  # not installed / not built here
        te_mhc, te_reason = None, f"{type(exc).__name__}: {exc}"
    else:
        te_reason = "" if n == 4 else "TE's kernels support n = 4 only"
    for name, use_buffer in (("Transformer-Engine 2.20", False),
                             ("Transformer-Engine 2.20, fused_grad_x_acc_buffer", True)):
        if te_mhc is None or te_reason:
            steps[name] = (None, te_reason)
            continue
        # TE's layout and recipe: x (s, b, C, n) bf16; phi (N, nC), alpha, beta fp32.
        x, phi, alpha, beta = leaves(x0.transpose(1, 2).reshape(t, 1, c, n).contiguous(),
                                     phi0.t().contiguous(), alpha0, bias0.view(1, m))
        buf = torch.empty(x.numel(), device="cuda", dtype=torch.float32) if use_buffer else None
        g_te = grad.transpose(1, 2).reshape(t, 1, c, n).contiguous()

        def te_step(x=x, phi=phi, alpha=alpha, beta=beta, buf=buf, g_te=g_te):
            agg, hp, hr = te_mhc.mhc_generate_mix_and_aggregate(
                x, phi, alpha, beta, fused_grad_x_acc_buffer=buf)
            out = te_mhc.mhc_fused_expand_combine(agg, None, hp, x, hr, n,
                                                  fused_grad_x_acc_buffer=buf)
            out.backward(g_te)
            for v in (x, phi, alpha, beta):
                v.grad = None
        steps[name] = (te_step, "")
    try:
        from liger_kernel.transformers.functional import (
            liger_mhc_coeffs,
            liger_mhc_post_res,
            liger_mhc_pre,
        )
    except Exception as exc:
        steps["Liger-Kernel"] = (None, f"{type(exc).__name__}: {exc}")
    else:
        x, phi, bias, a_pre, a_post, a_res = leaves(x0, phi0.to(dt), bias0, alpha0[0], alpha0[1],
                                                    alpha0[2])

        def liger_step():
            hp_, hpost, hres = liger_mhc_coeffs(x, phi, bias, a_pre, a_post, a_res)
            agg = liger_mhc_pre(x, hp_)
            out = liger_mhc_post_res(x, agg, hpost, hres)
            out.backward(grad)
            for v in (x, phi, bias, a_pre, a_post, a_res):
                v.grad = None
        steps["Liger-Kernel"] = (liger_step, "")
    return steps


def run_sublayer(tokens: int, n: int, hidden: int, bandwidth: float, rounds: int, rows: list):
    """Interleaved rounds of every available sublayer variant: median time and peak memory."""
    steps = sublayer_steps(tokens, n, hidden)
    live = {name: fn for name, (fn, _) in steps.items() if fn is not None}
    peaks = {}
    for name, fn in live.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    times = {name: [] for name in live}
    for _ in range(rounds):
        for name, fn in live.items():
            times[name].append(bench(fn))
    floor_ms = sublayer_floor_bytes(tokens, n, hidden, 2) / bandwidth * 1e3
    for name, (fn, reason) in steps.items():
        if fn is None:
            rows.append((hidden, name, None, None, floor_ms, reason))
        else:
            ts = sorted(times[name])
            rows.append((hidden, name, ts[len(ts) // 2], peaks[name], floor_ms, ""))


def print_sublayer(rows, tokens: int, n: int, rounds: int) -> None:
    print(f"\nOne sublayer's whole mHC work: entry + merge, identity sublayer, fwd + bwd, T={tokens} "
          f"n={n} bf16 x; median of {rounds} interleaved rounds; floor = sum of the four op floors "
          "(8nC + 5C elements per token); peak = memory above the inputs during one step")
    print("| C | implementation | time (us) | % of floor | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    for c, name, ms, peak, floor_ms, reason in rows:
        if ms is None:
            print(f"| {c} | {name} | not run: {reason[:120]} | | |")
        else:
            print(f"| {c} | {name} | {ms * 1e3:.0f} | {100 * floor_ms / ms:.0f}% | "
                  f"{peak / 2**20:.0f} |")


def print_op_row(row) -> None:
    """One row of the per-op table (printed as soon as it is measured)."""
    c, name, direction, eager, tk_ms, ours, floor_ms = row
    tk_txt = f"{tk_ms * 1e3:.1f}" if tk_ms is not None else "n/a"
    tk_pct = f"{100 * floor_ms / tk_ms:.0f}%" if tk_ms is not None else "n/a"
    print(f"| {c} | {name} | {direction} | {eager * 1e3:.1f} | {tk_txt} | {ours * 1e3:.1f} | "
          f"{floor_ms * 1e3:.1f} | {100 * floor_ms / ours:.0f}% | {tk_pct} | "
          f"{eager / ours:.1f}x |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 7168])
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds of the whole-sublayer comparison")
    parser.add_argument("--only", choices=["ops", "sublayer"], default=None,
                        help="run only the per-op table or only the whole-sublayer table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()} | copy bandwidth {bandwidth / 1e12:.2f} TB/s "
          f"(read + write) | T={args.tokens} n={args.n} bf16 | times in microseconds (median)")
    if args.only != "sublayer":
        print("| C | op | dir | eager torch | TileKernels | triton (ours) | floor | "
              "ours % of floor | TK % of floor | speed-up vs eager |")
        print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for hidden in args.hidden:
            run(args.tokens, args.n, hidden, bandwidth, [])
    if args.only != "ops":
        for hidden in args.hidden:
            sublayer_rows: list = []
            run_sublayer(args.tokens, args.n, hidden, bandwidth, args.rounds, sublayer_rows)
            print_sublayer(sublayer_rows, args.tokens, args.n, args.rounds)


if __name__ == "__main__":
    main()
