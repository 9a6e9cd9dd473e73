"""Time the bandwidth-bound mHC kernels over launch shapes at small and large (T, C) on a GPU.

    python3 benchmarks/probes/probe_launch_shapes.py [--shapes 4096x768 8192x4096] [--n 4]

For each kernel (merge forward / backward, dH_pre pass, mapping forward with the pre-apply, the
projection pass, the dH_pre pass + mapping backward, the dx/dphi pass) and each candidate launch
(tile, warps, splits), prints the median time (L2 flushed before every run) and the % of the
kernel's byte floor (bytes / copy bandwidth). The launch the ops make today (the launch helpers
and constants of ``megatron_mhc.kernels.triton``: ``merge_tile``, ``projection_plan``,
``PRE_MAPPINGS_BWD_TILE``, ``dx_pass_splits``) is marked "(launched)", so a shape rule can be
checked against its alternatives.
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton
from _probe import copy_bandwidth, require_gpu, time_us

from megatron_mhc.kernels import triton as O
from megatron_mhc.kernels.triton.mappings import (
    mappings_bwd_kernel,
    mappings_fwd_kernel,
    pre_mappings_bwd_kernel,
)
from megatron_mhc.kernels.triton.merge import post_res_bwd_kernel, post_res_fwd_kernel
from megatron_mhc.kernels.triton.pre_apply import pre_apply_bwd_kernel
from megatron_mhc.kernels.triton.projection import (
    _projection_splits,
    arrival_counters,
    norm_proj_bwd_kernel,
    proj_partial_kernel,
)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row(kernel, t, c, shape, us, floor_us, launched):
    mark = " (launched)" if launched else ""
    print(f"| {kernel} | {t} | {c} | {shape}{mark} | {us:.1f} | {100 * floor_us / us:.0f}% |",
          flush=True)


SECTIONS = ("merge", "pre", "proj", "mappings_fwd", "pre_mappings", "dx")


def probe_shape(t, c, n, bw, only=SECTIONS):
    dev, dt = "cuda", torch.bfloat16
    m, np_, bm = n * n + 2 * n, triton.next_power_of_2(n), 32
    kdim = n * c
    x = torch.randn(t, n, c, device=dev, dtype=dt)
    y = torch.randn(t, c, device=dev, dtype=dt)
    d_out = torch.randn(t, n, c, device=dev, dtype=dt)
    d_agg = torch.randn(t, c, device=dev, dtype=dt)
    hp = torch.rand(t, n, device=dev)
    hr = torch.rand(t, n, n, device=dev)
    out = torch.empty_like(x)
    dx = torch.empty_like(x)
    dy = torch.empty_like(y)
    per_us = 1e6 / bw  # microseconds per byte

    def floor(nbytes):
        return nbytes * per_us

    # Merge forward: read x, y, write out.
    launched = O.merge_tile(c)
    tiles = sorted({(2, 512, 4), (2, 256, 4), (4, 256, 4), (1, 512, 4), (4, 128, 4), (2, 256, 2),
                    (1, 256, 2), launched})
    for bt, bc, w in tiles if "merge" in only else ():
        if bc > triton.next_power_of_2(c):
            continue
        us = time_us(functools.partial(
            post_res_fwd_kernel[(cdiv(t, bt), cdiv(c, bc))], x, y, hp, hr, out, t, c,
            N=n, NP=np_, BT=bt, BC=bc, num_warps=w))
        row("post_res_fwd", t, c, f"BT {bt}, BC {bc}, {w} warps", us,
            floor(t * (2 * n + 1) * c * 2), (bt, bc, w) == launched)
    # Merge backward: read dout, x, y, write dx, dy (+ small dH partials).
    for bt, bc, w in tiles if "merge" in only else ():
        if bc > triton.next_power_of_2(c):
            continue
        cb = cdiv(c, bc)
        dhp = torch.empty(t, cb, n, device=dev)
        dhr = torch.empty(t, cb, n, n, device=dev)
        us = time_us(functools.partial(
            post_res_bwd_kernel[(cdiv(t, bt), cb)], x, y, hp, hr, d_out, dx, dy, dhp, dhr,
            t, c, cb, N=n, NP=np_, BT=bt, BC=bc, num_warps=w))
        row("post_res_bwd", t, c, f"BT {bt}, BC {bc}, {w} warps", us,
            floor(t * ((3 * n + 2) * c * 2 + cb * (n + n * n) * 4)), (bt, bc, w) == launched)
    # dH_pre pass: read x, d_agg.
    dh = torch.empty(t, n, device=dev)
    for bt, bc, w in tiles if "pre" in only else ():
        if bc > triton.next_power_of_2(c):
            continue
        us = time_us(functools.partial(
            pre_apply_bwd_kernel[(cdiv(t, bt),)], x, hp, d_agg, x, dh, t, c,
            N=n, NP=np_, BT=bt, BC=bc, WRITE_DX=False, num_warps=w))
        row("pre_apply_bwd (dH_pre)", t, c, f"BT {bt}, BC {bc}, {w} warps", us,
            floor(t * (n + 1) * c * 2), (bt, bc, w) == launched)
    # Projection pass: read x, write the split partials.
    phi = (0.02 * torch.randn(kdim, m, device=dev)).to(dt)
    x2 = x.view(t, kdim)
    plan = O.projection_plan(t, kdim)
    plans = sorted({(64, 128, 2048, 8, 3), (64, 128, 1024, 8, 3), (64, 128, 512, 8, 3),
                    (32, 128, 1024, 4, 3), (32, 128, 512, 4, 3), (64, 64, 512, 4, 3), plan})
    for bt, bk, per_split, w, st in plans if "proj" in only else ():
        split, k_per_split = _projection_splits(kdim, bk, per_split)
        part = torch.empty(split, t, m, device=dev)
        ss = torch.empty(split, t, device=dev)
        us = time_us(functools.partial(
            proj_partial_kernel[(cdiv(t, bt), split)], x2, phi, part, ss, t, kdim, k_per_split,
            M=m, BM=bm, BT=bt, BK=bk, DOT_MODE=0, num_warps=w, num_stages=st))
        row("proj_partial", t, c, f"BT {bt}, BK {bk}, {split} splits, {w} warps, {st} stages",
            us, floor(t * (kdim * 2 + split * (m + 1) * 4)), (bt, bk, per_split, w, st) == plan)
    # Mapping forward + pre-apply: read the partials and x, write agg (+ mappings, small).
    split, _ = _projection_splits(kdim, plan[1], plan[2])
    part = torch.randn(split, t, m, device=dev)
    ss = torch.rand(split, t, device=dev) + 1.0
    alpha, bias = torch.full((3,), 0.5, device=dev), torch.randn(m, device=dev)
    proj, rinv = torch.empty(t, m, device=dev), torch.empty(t, device=dev)
    h_pre, h_post = torch.empty(t, n, device=dev), torch.empty(t, n, device=dev)
    h_res, agg = torch.empty(t, n, n, device=dev), torch.empty(t, c, device=dev, dtype=dt)
    fwd_bc = O.MAPPINGS_PRE_BLOCK
    fwd_tiles = sorted({(2, 1, 512), (2, 1, 256), (2, 2, 256), (4, 2, 256), (1, 1, 256),
                        (*O.MAPPINGS_FWD_TILE, fwd_bc)})
    for bt, w, bc in fwd_tiles if "mappings_fwd" in only else ():
        if bc > triton.next_power_of_2(c):
            continue
        us = time_us(functools.partial(
            mappings_fwd_kernel[(cdiv(t, bt),)], part, ss, alpha, bias, proj, rinv, h_pre,
            h_post, h_res, x2, agg, t, kdim, c, 1e-6, SPLIT=split, N=n, NP=np_, M=m, BM=bm,
            VARIANT_MHC=True, ITERS=20, BT=bt, WITH_PRE=True, BC=bc, num_warps=w))
        row("mappings_fwd + pre-apply", t, c, f"BT {bt}, BC {bc}, {w} warps", us,
            floor(t * ((n + 1) * c * 2 + split * (m + 1) * 4)),
            (bt, w, bc) == (*O.MAPPINGS_FWD_TILE, fwd_bc))
    # The entry backward's dH_pre pass + mapping backward: one launch against the two it replaces
    # (pre_apply_bwd_kernel, then mappings_bwd_kernel on MAPPINGS_BWD_TILE). Floor: read x, d_agg.
    proj.copy_(part.sum(0))
    rinv.copy_(torch.rsqrt(ss.sum(0) / kdim + 1e-6))
    cb = cdiv(c, O.merge_tile(c)[1])
    dh_post, dh_res = torch.randn(t, cb, n, device=dev), torch.randn(t, cb, n, n, device=dev)
    dproj, coef = torch.empty(t, m, device=dev), torch.empty(t, device=dev)
    scratch = torch.empty(t, 40 * np_, device=dev)
    pre_floor = floor(t * (n + 1) * c * 2)
    mbt, mw = O.MAPPINGS_BWD_TILE
    g2 = cdiv(t, mbt)
    parts2 = (torch.empty(g2, 3, device=dev), torch.empty(g2, m, device=dev))
    pbt, pbc, pw = O.merge_tile(c)

    def two_launches():
        pre_apply_bwd_kernel[(cdiv(t, pbt),)](x, hp, d_agg, x, dh, t, c, N=n, NP=np_, BT=pbt,
                                                BC=pbc, WRITE_DX=False, num_warps=pw)
        mappings_bwd_kernel[(g2,)](proj, rinv, alpha, bias, dh, dh_post, dh_res, dproj, coef,
                                     *parts2, scratch, t, kdim, cb, N=n, NP=np_, M=m,
                                     VARIANT_MHC=True, ITERS=20, BT=mbt, num_warps=mw)
    if "pre_mappings" in only:
        row("dH_pre pass + mapping bwd, two launches", t, c,
            f"BT {pbt}, BC {pbc}, {pw} warps + BT {mbt}, {mw} warps", time_us(two_launches),
            pre_floor, False)
    launched = O.PRE_MAPPINGS_BWD_TILE
    fused_tiles = sorted({(2, pbc, pw), (2, 128, 1), (2, 256, 1), (4, 128, 1), (4, 256, 1),
                          (8, 64, 1), (8, 128, 1), (8, 256, 1), (16, 64, 1), (16, 128, 1),
                          launched})
    for bt, bc, w in fused_tiles if "pre_mappings" in only else ():
        if bc > triton.next_power_of_2(c):
            continue
        g = cdiv(t, bt)
        parts = (torch.empty(g, 3, device=dev), torch.empty(g, m, device=dev))
        us = time_us(functools.partial(
            pre_mappings_bwd_kernel[(g,)], x, d_agg, proj, rinv, alpha, bias, dh_post, dh_res,
            dproj, coef, *parts, scratch, t, kdim, c, cb, N=n, NP=np_, M=m, VARIANT_MHC=True,
            ITERS=20, BT=bt, BC=bc, num_warps=w))
        row("pre_mappings_bwd (one launch)", t, c, f"BT {bt}, BC {bc}, {w} warps", us, pre_floor,
            (bt, bc, w) == launched)
    # dx/dphi pass (WITH_PRE, ADD_DX): read x, dx_add, d_agg, write dx.
    dproj, coef = torch.randn(t, m, device=dev), torch.randn(t, device=dev)
    g = cdiv(t, O.PRE_MAPPINGS_BWD_TILE[0])  # the entry's alpha / bias partial rows
    dalpha_part, dbias_part = torch.randn(g, 3, device=dev), torch.randn(g, m, device=dev)
    launched_splits = O.dx_pass_splits(t)[0]
    for asked in sorted({4, 8, 16, 32, launched_splits}) if "dx" in only else ():
        splits, rows = O.dx_pass_splits(t, asked)
        dphi_part = torch.empty(splits, kdim, m, device=dev)
        dalpha_split, dbias_split = torch.empty(splits, 3, device=dev), torch.empty(splits, m, device=dev)
        grads = (torch.empty(kdim, m, device=dev), torch.empty(3, device=dev),
                 torch.empty(m, device=dev), arrival_counters(x2.device, kdim))
        for cfg in norm_proj_bwd_kernel.configs:
            bk, bt = cfg.kwargs["BK"], cfg.kwargs["BT"]
            us = time_us(functools.partial(
                norm_proj_bwd_kernel.fn[(cdiv(kdim, bk), splits)], x2, phi, dproj, coef, x2,
                dphi_part, hp, d_agg, x2, dalpha_part, dbias_part, dalpha_split, dbias_split,
                *grads, t, kdim, c, rows, g, N=n, M=m, BM=bm, SP=triton.next_power_of_2(splits),
                DOT_MODE=0, WITH_PRE=True, ADD_DX=True, ACCUMULATE=False,
                BT=bt, BK=bk, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            row("norm_proj_bwd (dx/dphi)", t, c,
                f"BK {bk}, BT {bt}, {cfg.num_warps} warps, {cfg.num_stages} stages, "
                f"{splits} splits", us,
                floor(t * (3 * kdim + c) * 2), splits == launched_splits)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x768", "8192x4096"],
                        help="TOKENSxHIDDEN pairs")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="kernels to probe (default: all)")
    args = parser.parse_args()
    require_gpu("probe_launch_shapes.py")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} | copy bandwidth {bw / 1e12:.2f} TB/s | n={args.n} | "
          "bf16, L2 flushed before every run")
    print("| kernel | T | C | launch | us | % of byte floor |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        t, c = (int(v) for v in shape.lower().split("x"))
        probe_shape(t, c, args.n, bw, args.only)


if __name__ == "__main__":
    main()
