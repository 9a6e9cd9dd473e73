"""Probe: can the entry backward's dx pass apply H_resᵀ to the upstream gradient itself?

Today one linked sublayer's backward moves 64·C bytes per token (bf16, n = 4): the merge backward
reads g = dL/dx_{l+1}, x and y and writes dx_merge = H_resᵀ·g and dy; the dx/dφ pass reads x,
d_agg and dx_merge and writes dx over it. "dx written once" (benchmarks/NOTES_kernels.md, "After
v16") moves H_resᵀ·g into the dx pass, which then reads g instead of dx_merge; the merge backward
no longer reads x nor writes dx_merge, and dH_res = g·xᵀ joins the per-token dH_pre pass: 56·C.
The catch is the dx pass: its program owns one stream's channel block, and H_resᵀ·g needs all n
streams of that block, so it loads n tiles of g where it loaded one of dx_merge. Whether L2
absorbs the n-fold reads (the n programs of a channel block run side by side) decides the plan.

This times the dx pass both ways on the same code (``G_RES`` off: today's ``ADD_DX`` load of one
dx tile; on: n tiles of g and H_res per token), every tile shape of the production autotune list,
L2 flushed before every run, against the floor of the bytes each must move (both: read x, d_agg
and one n·C-wide gradient, write dx). ``--check`` runs a small case against PyTorch (also on CPU
under ``TRITON_INTERPRET=1``).

A third layout answers the question after that: a program owns one channel block of *all n
streams* (``all_streams_kernel``), so g is read once, not once per stream, and the dφ partial is
one dot over the n strided row blocks of φ. With ``FOLD_DY`` it also writes the previous
sublayer's merge gradient dy_prev = Σ_i H_post,prev,i·dx_i from the dx tile on chip: the "48·C"
layout of NOTES_kernels.md, where the previous merge backward disappears (its dH_post partials
move to the per-token pass). Its floor adds the C-wide dy write.

    python3 benchmarks/probes/probe_dx_once.py [--shapes 8192x4096 8192x7168 4096x768]
    TRITON_INTERPRET=1 python3 benchmarks/probes/probe_dx_once.py --check
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton
import triton.language as tl
from _probe import copy_bandwidth, require_gpu, time_us

from megatron_mhc.kernels.triton.projection import _norm_proj_bwd_configs


@triton.jit
def _projection_terms(x_ptr, dproj_ptr, coef_ptr, phi_t, dphi, rows, row_ok, ks, cols_m, m_ok,
                      K, M: tl.constexpr):
    """The terms both layouts share for one token tile at columns ``ks``: the x tile, its
    dx = dproj·φᵀ + coef·x (fp32) and the dφ partial plus xᵀ·dproj."""
    xt = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None], other=0.0)
    dp = tl.load(dproj_ptr + rows[:, None] * M + cols_m[None, :],
                 mask=row_ok[:, None] & m_ok[None, :], other=0.0).to(xt.dtype)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    dphi = tl.dot(tl.trans(xt), dp, dphi)
    dxt = tl.dot(dp, tl.trans(phi_t)) + coef[:, None] * xt.to(tl.float32)
    return xt, dxt, dphi


@triton.jit
def dx_pass_kernel(x_ptr, phi_ptr, dproj_ptr, coef_ptr, h_pre_ptr, d_agg_ptr, grad_ptr,
                   h_res_ptr, dx_ptr, dphi_part_ptr, T, K, C, rows_per_split,
                   N: tl.constexpr, M: tl.constexpr, BM: tl.constexpr, G_RES: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr):
    """dx = dproj·φᵀ + coef·x + H_pre·d_agg + (G_RES ? Σ_j H_res[t, j, i]·g_j : dx_merge), and
    the dφ partial; the K-block lies in one stream i (C % BK == 0). bf16 dots, fp32 sums."""
    kb = tl.program_id(0)
    split = tl.program_id(1)
    ks = kb * BK + tl.arange(0, BK)
    stream = (kb * BK) // C
    cs = (kb * BK) % C + tl.arange(0, BK)
    cols_m = tl.arange(0, BM)
    m_ok = cols_m < M
    phi_t = tl.load(phi_ptr + ks[:, None] * M + cols_m[None, :], mask=m_ok[None, :],
                    other=0.0).to(x_ptr.dtype.element_ty)
    dphi = tl.zeros([BK, BM], dtype=tl.float32)
    t_begin = split * rows_per_split
    for t0 in range(t_begin, t_begin + rows_per_split, BT):
        rows = t0 + tl.arange(0, BT)
        row_ok = rows < T
        xt, dxt, dphi = _projection_terms(x_ptr, dproj_ptr, coef_ptr, phi_t, dphi, rows, row_ok,
                                          ks, cols_m, m_ok, K, M)
        da = tl.load(d_agg_ptr + rows[:, None] * C + cs[None, :], mask=row_ok[:, None], other=0.0)
        hp = tl.load(h_pre_ptr + rows * N + stream, mask=row_ok, other=0.0)
        dxt += hp[:, None] * da.to(tl.float32)
        if G_RES:
            for j in tl.static_range(N):
                hr = tl.load(h_res_ptr + rows * (N * N) + j * N + stream, mask=row_ok, other=0.0)
                gj = tl.load(grad_ptr + rows[:, None] * K + (j * C + cs)[None, :],
                             mask=row_ok[:, None], other=0.0)
                dxt += hr[:, None] * gj.to(tl.float32)
        else:
            dxt += tl.load(grad_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None],
                           other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * K + ks[None, :], dxt.to(xt.dtype), mask=row_ok[:, None])
    tl.store(dphi_part_ptr + split * K * M + ks[:, None] * M + cols_m[None, :], dphi,
             mask=m_ok[None, :])


@triton.jit
def all_streams_kernel(x_ptr, phi_ptr, dproj_ptr, coef_ptr, h_pre_ptr, d_agg_ptr, grad_ptr,
                       h_res_ptr, h_post_prev_ptr, dx_ptr, dy_prev_ptr, dphi_part_ptr, T, K, C,
                       rows_per_split, N: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
                       FOLD_DY: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """dx_i = dproj·φ_iᵀ + coef·x_i + H_pre,i·d_agg + Σ_j H_res[t, j, i]·g_j for every stream i of
    one channel block (columns i·C + c0 + k, stream-major), the dφ partial of those n·BK rows,
    and with FOLD_DY dy_prev = Σ_i H_post,prev[t, i]·dx_i. bf16 dots, fp32 sums."""
    cb = tl.program_id(0)
    split = tl.program_id(1)
    c0 = cb * BK
    lane = tl.arange(0, N * BK)
    stream_of = lane // BK
    cs = c0 + lane % BK                          # channel of each lane
    ks = stream_of * C + cs                      # its column in the n·C row
    kb = c0 + tl.arange(0, BK)
    streams = tl.arange(0, N)
    cols_m = tl.arange(0, BM)
    m_ok = cols_m < M
    phi_t = tl.load(phi_ptr + ks[:, None] * M + cols_m[None, :], mask=m_ok[None, :],
                    other=0.0).to(x_ptr.dtype.element_ty)
    dphi = tl.zeros([N * BK, BM], dtype=tl.float32)
    t_begin = split * rows_per_split
    for t0 in range(t_begin, t_begin + rows_per_split, BT):
        rows = t0 + tl.arange(0, BT)
        row_ok = rows < T
        xt, dxt, dphi = _projection_terms(x_ptr, dproj_ptr, coef_ptr, phi_t, dphi, rows, row_ok,
                                          ks, cols_m, m_ok, K, M)
        da = tl.load(d_agg_ptr + rows[:, None] * C + kb[None, :], mask=row_ok[:, None], other=0.0)
        hp = tl.load(h_pre_ptr + rows[:, None] * N + streams[None, :], mask=row_ok[:, None],
                     other=0.0)
        mix = hp[:, :, None] * da.to(tl.float32)[:, None, :]          # [BT, N, BK]
        for j in tl.static_range(N):
            hr_j = tl.load(h_res_ptr + rows[:, None] * (N * N) + j * N + streams[None, :],
                           mask=row_ok[:, None], other=0.0)          # H_res[t, j, i] over i
            g_j = tl.load(grad_ptr + rows[:, None] * K + (j * C + kb)[None, :],
                          mask=row_ok[:, None], other=0.0)
            mix += hr_j[:, :, None] * g_j.to(tl.float32)[:, None, :]
        dxt += tl.reshape(mix, [BT, N * BK])
        tl.store(dx_ptr + rows[:, None] * K + ks[None, :], dxt.to(xt.dtype), mask=row_ok[:, None])
        if FOLD_DY:
            hq = tl.load(h_post_prev_ptr + rows[:, None] * N + streams[None, :],
                         mask=row_ok[:, None], other=0.0)
            dx3 = tl.reshape(dxt.to(xt.dtype).to(tl.float32), [BT, N, BK])
            dy = tl.sum(hq[:, :, None] * dx3, axis=1)
            tl.store(dy_prev_ptr + rows[:, None] * C + kb[None, :], dy.to(xt.dtype),
                     mask=row_ok[:, None])
    tl.store(dphi_part_ptr + split * K * M + ks[:, None] * M + cols_m[None, :], dphi,
             mask=m_ok[None, :])


#: Tile shapes of the all-streams layout: its K width is n·BK, so BK is smaller than the
#: per-stream pass's (64-128).
ALL_STREAMS_TILES = ((16, 64, 4, 3), (16, 128, 4, 3), (32, 32, 4, 3), (32, 64, 4, 3),
                     (32, 64, 8, 3), (32, 128, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2))


def make_inputs(t: int, n: int, c: int, device: str, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = n * n + 2 * n

    def rand(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=g).to(dt).to(device)

    return dict(x=rand(t, n * c, dt=dtype), phi=rand(n * c, m, dt=dtype) * 0.2, dproj=rand(t, m),
                coef=rand(t), h_pre=rand(t, n).sigmoid(), d_agg=rand(t, c, dt=dtype),
                grad=rand(t, n * c, dt=dtype), h_res=rand(t, n, n).softmax(-1),
                h_post_prev=2 * rand(t, n).sigmoid())


def _token_splits(inp, m, splits):
    """``(rows per split, splits, dx, dφ partials)`` of a dx pass over ``inp``."""
    t, kdim = inp["x"].shape
    rows = triton.cdiv(triton.cdiv(t, splits), 128) * 128
    splits = triton.cdiv(t, rows)
    dx = torch.empty_like(inp["x"])
    return rows, splits, dx, torch.empty(splits, kdim, m, device=dx.device)


def launch(inp, n, c, g_res, bk, bt, warps=4, stages=2, splits=8):
    """The per-stream dx pass: (launch closure, dx, dφ partials)."""
    t, kdim = inp["x"].shape
    m = n * n + 2 * n
    rows, splits, dx, part = _token_splits(inp, m, splits)
    fn = functools.partial(
        dx_pass_kernel[(kdim // bk, splits)], inp["x"], inp["phi"], inp["dproj"], inp["coef"],
        inp["h_pre"], inp["d_agg"], inp["grad"], inp["h_res"], dx, part, t, kdim, c, rows,
        N=n, M=m, BM=triton.next_power_of_2(max(m, 16)), G_RES=g_res, BT=bt, BK=bk,
        num_warps=warps, num_stages=stages)
    return fn, dx, part


def launch_all_streams(inp, n, c, fold_dy, bk, bt, warps=4, stages=2, splits=8):
    """The all-streams dx pass: (launch closure, dx, dy_prev, dφ partials)."""
    t, kdim = inp["x"].shape
    m = n * n + 2 * n
    rows, splits, dx, part = _token_splits(inp, m, splits)
    dy_prev = torch.empty(t, c, device=dx.device, dtype=dx.dtype)
    fn = functools.partial(
        all_streams_kernel[(c // bk, splits)], inp["x"], inp["phi"], inp["dproj"], inp["coef"],
        inp["h_pre"], inp["d_agg"], inp["grad"], inp["h_res"], inp["h_post_prev"], dx, dy_prev,
        part, t, kdim, c, rows, N=n, M=m, BM=triton.next_power_of_2(max(m, 16)),
        FOLD_DY=fold_dy, BT=bt, BK=bk, num_warps=warps, num_stages=stages)
    return fn, dx, dy_prev, part


def check(device: str) -> None:
    """Every layout against PyTorch in float64, on a small case."""
    n, c, t = 4, 128, 300
    inp = make_inputs(t, n, c, device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    d = {k: v.double() for k, v in inp.items()}
    base = (d["dproj"] @ d["phi"].T + d["coef"][:, None] * d["x"]
            + (d["h_pre"][:, :, None] * d["d_agg"][:, None, :]).reshape(t, n * c))
    g3 = d["grad"].view(t, n, c)
    want = {False: base + d["grad"],
            True: base + torch.einsum("tji,tjc->tic", d["h_res"], g3).reshape(t, n * c)}
    dphi_want = d["x"].T @ d["dproj"]
    dy_want = torch.einsum("ti,tic->tc", d["h_post_prev"], want[True].view(t, n, c))

    def rel(got, ref):
        return ((got.double() - ref).norm() / ref.norm()).item()

    for g_res in (False, True):
        fn, dx, part = launch(inp, n, c, g_res, bk=64, bt=32)
        fn()
        err, derr = rel(dx, want[g_res]), rel(part.sum(0), dphi_want)
        print(f"G_RES={g_res}: dx relative error {err:.2e}, dphi {derr:.2e}")
        assert err < 2e-2 and derr < 2e-2, (g_res, err, derr)
    for fold_dy in (False, True):
        fn, dx, dy, part = launch_all_streams(inp, n, c, fold_dy, bk=32, bt=32)
        fn()
        err, derr = rel(dx, want[True]), rel(part.sum(0), dphi_want)
        yerr = rel(dy, dy_want) if fold_dy else 0.0
        print(f"all streams, FOLD_DY={fold_dy}: dx relative error {err:.2e}, dphi {derr:.2e}, "
              f"dy_prev {yerr:.2e}")
        assert err < 2e-2 and derr < 2e-2 and yerr < 2e-2, (fold_dy, err, derr, yerr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8192x4096", "8192x7168", "4096x768"],
                        help="TOKENSxHIDDEN pairs")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--check", action="store_true", help="only the correctness check")
    args = parser.parse_args()
    if args.check:
        check("cuda" if torch.cuda.is_available() else "cpu")
        return
    require_gpu("probe_dx_once.py")
    check("cuda")
    bw = copy_bandwidth()
    n = args.n
    print(f"{torch.cuda.get_device_name()} | copy bandwidth {bw / 1e12:.2f} TB/s | n={n} | bf16, "
          "L2 flushed before every run; floor: read x, d_agg, one n·C gradient, write dx")
    print("| T | C | dx pass | BK | BT | warps | stages | us | % of floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        t, c = (int(v) for v in shape.lower().split("x"))
        inp = make_inputs(t, n, c, "cuda")
        floor_us = t * (3 * n * c + c) * 2 / bw * 1e6
        best = {}
        for g_res in (False, True):
            for cfg in _norm_proj_bwd_configs():
                bk, bt = cfg.kwargs["BK"], cfg.kwargs["BT"]
                if c % bk:
                    continue
                fn, _, _ = launch(inp, n, c, g_res, bk, bt, cfg.num_warps, cfg.num_stages)
                us = time_us(fn)
                best[g_res] = min(best.get(g_res, us), us)
                name = "n tiles of g, H_res applied" if g_res else "dx_merge added (today)"
                print(f"| {t} | {c} | {name} | {bk} | {bt} | {cfg.num_warps} | "
                      f"{cfg.num_stages} | {us:.1f} | {100 * floor_us / us:.0f}% |", flush=True)
        for fold_dy in (False, True):
            fold_floor_us = floor_us + (t * c * 2 / bw * 1e6 if fold_dy else 0.0)
            for bk, bt, warps, stages in ALL_STREAMS_TILES:
                if c % bk:
                    continue
                fn, _, _, _ = launch_all_streams(inp, n, c, fold_dy, bk, bt, warps, stages)
                us = time_us(fn)
                best[("all", fold_dy)] = min(best.get(("all", fold_dy), us), us)
                name = "all streams per program" + (", + dy_prev" if fold_dy else "")
                print(f"| {t} | {c} | {name} | {bk} | {bt} | {warps} | {stages} | {us:.1f} | "
                      f"{100 * fold_floor_us / us:.0f}% |", flush=True)
        print(f"| {t} | {c} | best: today {best[False]:.1f}, H_res applied {best[True]:.1f} "
              f"({100 * (best[True] / best[False] - 1):+.1f} %), all streams "
              f"{best[('all', False)]:.1f}, + dy_prev {best[('all', True)]:.1f} | | | | | | |",
              flush=True)


if __name__ == "__main__":
    main()
