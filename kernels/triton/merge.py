"""The post/residual merge: ``post_res_merge``, the linked pair's ``merge_linked``, the
cross-sublayer fusion's ``merge_linked_project`` (the merge plus the next sublayer's projection
partials) and ``merge_into`` (no autograd, for the recompute)."""

import os

import torch
import triton
import triton.language as tl

from megatron_mhc.core.ops import reference
from megatron_mhc.kernels.triton import _launch
from megatron_mhc.kernels.triton._launch import _cdiv, _check, _contig, _dot_acc, _f32, _pow2
from megatron_mhc.kernels.triton.projection import (
    StreamProjection,
    _projection_dot,
    _projection_splits,
)


# ----------------------------------------------------------------------------------------------
# Post/residual merge: out[t, i, c] = sum_j h_res[t, i, j] x[t, j, c] + h_post[t, i] y[t, c].
# ----------------------------------------------------------------------------------------------
@triton.jit
def post_res_fwd_kernel(x_ptr, y_ptr, h_post_ptr, h_res_ptr, out_ptr, T, C,
                        N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    row_ok = rows < T
    c_ok = cs < C
    ii = tl.arange(0, NP)
    i_ok = ii < N
    m2 = row_ok[:, None] & i_ok[None, :]
    mask = row_ok[:, None] & c_ok[None, :]
    y = tl.load(y_ptr + rows[:, None] * C + cs[None, :], mask=mask, other=0.0).to(tl.float32)
    hp = tl.load(h_post_ptr + rows[:, None] * N + ii[None, :], mask=m2, other=0.0)
    acc = hp[:, :, None] * y[:, None, :]  # [BT, NP, BC]
    for j in tl.static_range(N):
        xj = tl.load(x_ptr + rows[:, None] * (N * C) + j * C + cs[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        hj = tl.load(h_res_ptr + rows[:, None] * (N * N) + ii[None, :] * N + j, mask=m2,
                     other=0.0)  # column j of H_res: [BT, NP]
        acc += hj[:, :, None] * xj[:, None, :]
    offs = rows[:, None, None] * (N * C) + ii[None, :, None] * C + cs[None, None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty),
             mask=m2[:, :, None] & c_ok[None, None, :])


def _post_res_proj_configs():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BT": 16, "BC": 64}, num_warps=4)]
    # The two best of eleven shapes measured on an H100 (benchmarks/probes/probe_merge_project.py,
    # T=8192, n=4: 16x64 with 2 warps 623 us at C=4096, 32 % of the merge's floor; 64x64 with 8
    # warps 786 us); wider channel blocks and more stages spill to shared memory (up to 70x slower).
    return [triton.Config({"BT": bt, "BC": bc}, num_warps=w, num_stages=1)
            for bt, bc, w in ((16, 64, 2), (64, 64, 8))]


@triton.autotune(configs=_post_res_proj_configs(), key=["C", "N", "M", "DOT_MODE"])
@triton.jit
def post_res_proj_fwd_kernel(
    x_ptr, y_ptr, h_post_ptr, h_res_ptr, out_ptr, phi_ptr, proj_part_ptr, ss_part_ptr,
    T, C, c_per_split,
    N: tl.constexpr, M: tl.constexpr, BM: tl.constexpr, DOT_MODE: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
):
    """The merge (as ``post_res_fwd_kernel``, same order of operations, so the same values) plus,
    from each merged tile still in registers, the next sublayer's projection partials over this
    program's C-split: ``proj_part[split, t] = sum_{i, c in split} out[t, i, c] phi[i*C + c]``
    ([SPLIT, T, M]) and ``ss_part[split, t] = sum out^2`` ([SPLIT, T]), from the rounded stored
    values (what a separate projection of ``out`` would read). ``phi`` is the next sublayer's
    ``[n*C, M]``; DOT_MODE as in ``proj_partial_kernel``. Grid: (cdiv(T, BT), SPLIT), with
    ``c_per_split`` a multiple of every BC.
    """
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    split = tl.program_id(1)
    row_ok = rows < T
    cols_m = tl.arange(0, BM)
    m_ok = cols_m < M
    proj = tl.zeros([BT, BM], dtype=tl.float32)
    ss = tl.zeros([BT], dtype=tl.float32)
    c_begin = split * c_per_split
    for c0 in range(c_begin, c_begin + c_per_split, BC):
        cs = c0 + tl.arange(0, BC)
        c_ok = cs < C
        mask = row_ok[:, None] & c_ok[None, :]
        y = tl.load(y_ptr + rows[:, None] * C + cs[None, :], mask=mask, other=0.0).to(tl.float32)
        for i in tl.static_range(N):
            hp = tl.load(h_post_ptr + rows * N + i, mask=row_ok, other=0.0)
            acc = hp[:, None] * y
            for j in tl.static_range(N):  # x_j is re-read per i from L1 (N^2 tile loads)
                xj = tl.load(x_ptr + rows[:, None] * (N * C) + j * C + cs[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                hij = tl.load(h_res_ptr + rows * (N * N) + i * N + j, mask=row_ok, other=0.0)
                acc += hij[:, None] * xj
            out16 = acc.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows[:, None] * (N * C) + i * C + cs[None, :], out16, mask=mask)
            outf = out16.to(tl.float32)
            ss += tl.sum(outf * outf, axis=1)
            phi_t = tl.load(phi_ptr + (i * C + cs)[:, None] * M + cols_m[None, :],
                            mask=c_ok[:, None] & m_ok[None, :], other=0.0)  # [BC, BM]
            proj = _dot_acc(out16, outf, phi_t, proj, DOT_MODE)
    tl.store(ss_part_ptr + split * T + rows, ss, mask=row_ok)
    tl.store(proj_part_ptr + split * T * M + rows[:, None] * M + cols_m[None, :], proj,
             mask=row_ok[:, None] & m_ok[None, :])


@triton.jit
def post_res_bwd_kernel(x_ptr, y_ptr, h_post_ptr, h_res_ptr, dout_ptr,
                        dx_ptr, dy_ptr, dh_post_part_ptr, dh_res_part_ptr, T, C, CB,
                        N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                        WITH_X: tl.constexpr = True):
    # One [BT tokens, BC channels] tile per program, as in the forward:
    # dx[j] = sum_i H_res[i, j] dout[i]; dy = sum_i H_post[i] dout[i] (written directly);
    # dH_res[i, j] = <dout[i], x[j]>, dH_post[i] = <dout[i], y> as per-C-block partials
    # [T, CB, ...] that the caller sums over CB. WITH_X False (the "dx once" backward): only dy
    # and the dH_post partials; x is not read, dx and dH_res are left to the entry's backward.
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cb = tl.program_id(1)
    cs = cb * BC + tl.arange(0, BC)
    row_ok = rows < T
    c_ok = cs < C
    ii = tl.arange(0, NP)
    i_ok = ii < N
    m2 = row_ok[:, None] & i_ok[None, :]
    mask = row_ok[:, None] & c_ok[None, :]
    m3 = m2[:, :, None] & c_ok[None, None, :]
    d3 = tl.load(dout_ptr + rows[:, None, None] * (N * C) + ii[None, :, None] * C
                 + cs[None, None, :], mask=m3, other=0.0).to(tl.float32)  # [BT, i, BC]
    y = tl.load(y_ptr + rows[:, None] * C + cs[None, :], mask=mask, other=0.0).to(tl.float32)
    hp = tl.load(h_post_ptr + rows[:, None] * N + ii[None, :], mask=m2, other=0.0)
    dy = tl.sum(hp[:, :, None] * d3, axis=1)
    tl.store(dy_ptr + rows[:, None] * C + cs[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mask)
    part = rows * CB + cb  # [BT] index of this (token, C-block) partial
    tl.store(dh_post_part_ptr + part[:, None] * N + ii[None, :], tl.sum(d3 * y[:, None, :], axis=2),
             mask=m2)
    if WITH_X:
        for j in tl.static_range(N):
            xj = tl.load(x_ptr + rows[:, None] * (N * C) + j * C + cs[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            hj = tl.load(h_res_ptr + rows[:, None] * (N * N) + ii[None, :] * N + j, mask=m2,
                         other=0.0)  # column j of H_res over i: [BT, i]
            dxj = tl.sum(hj[:, :, None] * d3, axis=1)
            tl.store(dx_ptr + rows[:, None] * (N * C) + j * C + cs[None, :],
                     dxj.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dh_res_part_ptr + part[:, None] * (N * N) + ii[None, :] * N + j,
                     tl.sum(d3 * xj[:, None, :], axis=2), mask=m2)


def merge_tile(c: int):
    """(tokens, channels, warps) of one program of the merge kernels and the dH_pre pass: 2 tokens
    and the largest power-of-two channel block (128..512) that divides C, with one warp per 128
    channels (8 values per thread and stream). A block that does not divide C leaves masked lanes
    in its last program: at C = 768 the 512-block made the merge backward 45.6 us against 40.7
    for 256 channels on 2 warps (H100, L2 flushed; benchmarks/probes/probe_launch_shapes.py)."""
    bc = 512
    while bc > 128 and c % bc:
        bc //= 2
    return 2, bc, bc // 128


def _merge_operands(x, y, h_post, h_res):
    """The merge's kernel operands: ``x3 [T, n, C]``, ``y2 [T, C]``, float32 ``hp``, ``hr``."""
    n, c = x.shape[-2], x.shape[-1]
    x3 = _contig(x.reshape(-1, n, c))
    t = x3.shape[0]
    return x3, _contig(y.reshape(t, c)), _f32(h_post.reshape(t, n)), _f32(h_res.reshape(t, n, n))


def _merge_inputs(ctx, x, y, h_post, h_res):
    """``_merge_operands``, saved for the merge's backward with the leading dims and dtypes in
    ``ctx.meta``."""
    x3, y2, hp, hr = _merge_operands(x, y, h_post, h_res)
    ctx.save_for_backward(x3, y2, hp, hr)
    ctx.meta = (x.shape[:-2], y.dtype, h_post.dtype, h_res.dtype)
    return x3, y2, hp, hr


def _launch_post_res_fwd(x3, y2, hp, hr, out):
    """The merge kernel over ``[T, n, C]`` operands. Each program loads its whole tile (every
    stream of its tokens and channels) before storing it, so ``out`` may be ``x3`` itself."""
    t, n, c = x3.shape
    bt, bc, warps = merge_tile(c)
    post_res_fwd_kernel[(_cdiv(t, bt), _cdiv(c, bc))](
        x3, y2, hp, hr, out, t, c, N=n, NP=_pow2(n), BT=bt, BC=bc, num_warps=warps)
    return out


def _post_res_forward(ctx, x, y, h_post, h_res):
    x3, y2, hp, hr = _merge_inputs(ctx, x, y, h_post, h_res)
    return _launch_post_res_fwd(x3, y2, hp, hr, torch.empty_like(x3)).view_as(x)


def _post_res_backward(ctx, dout, with_x=True):
    """dx, dy and the per-C-block partials of dH_post [T, CB, n] and dH_res [T, CB, n, n].
    ``with_x`` False (the linked pair's "dx once" backward): x is not read and no dx or dH_res is
    made; ``(g, dy, dH_post partials, H_res)`` come back instead, g the upstream gradient as the
    contiguous [T, n, C] the kernel read and H_res the saved float32 [T, n, n], which the entry's
    backward turns into dx and dH_res."""
    x3, y2, hp, hr = ctx.saved_tensors
    y_dtype = ctx.meta[1]
    t, n, c = x3.shape
    d = _contig(dout.reshape(t, n, c))
    dx = torch.empty_like(x3) if with_x else None
    dy = torch.empty(t, c, device=x3.device, dtype=y_dtype)
    bt, bc, warps = merge_tile(c)
    cb = _cdiv(c, bc)
    dhp_part = torch.empty(t, cb, n, device=x3.device, dtype=torch.float32)
    dhr_part = torch.empty(t, cb, n, n, device=x3.device, dtype=torch.float32) if with_x else None
    post_res_bwd_kernel[(_cdiv(t, bt), cb)](
        x3, y2, hp, hr, d, dx if with_x else d, dy, dhp_part, dhr_part if with_x else dhp_part,
        t, c, cb, N=n, NP=_pow2(n), BT=bt, BC=bc, WITH_X=with_x, num_warps=warps)
    if not with_x:
        return d, dy, dhp_part, hr
    return dx, dy, dhp_part, dhr_part


class _PostResFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, h_post, h_res):
        return _post_res_forward(ctx, x, y, h_post, h_res)

    @staticmethod
    def backward(ctx, dout):
        lead, _, hp_dtype, hr_dtype = ctx.meta
        dx, dy, dhp_part, dhr_part = _post_res_backward(ctx, dout)
        n, c = dx.shape[-2], dx.shape[-1]
        return (dx.view(*lead, n, c), dy.view(*lead, c),
                dhp_part.sum(1).view(*lead, n).to(hp_dtype),
                dhr_part.sum(1).view(*lead, n, n).to(hr_dtype))


class _LinkedPostResFunction(torch.autograd.Function):
    """The merge of a linked pair: its dx and dH partials go to the entry's backward (dx as the
    gradient of ``x_link``, the partials through the ``SublayerLink``); no reduction kernels."""

    @staticmethod
    def forward(ctx, x_link, y, h_post, h_res, link):
        ctx.link = link
        return _post_res_forward(ctx, x_link, y, h_post, h_res)

    @staticmethod
    def backward(ctx, dout):
        lead = ctx.meta[0]
        link = ctx.link
        if _launch.BACKWARD_DX_ONCE == "1":  # the entry's backward applies H_res^T to g and
            # sums dH_res = g x^T
            link.g, dy, link.dh_post_part, link.h_res = _post_res_backward(ctx, dout, with_x=False)
            link.dx = link.dh_res_part = None
        else:
            link.dx, dy, link.dh_post_part, link.dh_res_part = _post_res_backward(ctx, dout)
        link.stream = torch.cuda.current_stream(dy.device) if dy.is_cuda else None
        dx, c = link.dx, dy.shape[-1]
        return (None if dx is None else dx.view(*lead, -1, c)), dy.view(*lead, c), None, None, None


def _cuda_merge_project(x3, y2, hp, hr, next_phi):
    """``(out, proj_part, ss_part)`` from the CUDA kernel (``kernels/cuda/merge_project.cu``) where
    it applies (a Hopper GPU, n = 2 or 4, 16-bit x, nvcc), else None. Measured on an H100 at
    T = 8192, n = 4: 293 / 475 us at C = 4096 / 7168 against 640 / 1114 us for the Triton kernel
    below and 318 / 547 us for the unfused merge + projection pass (benchmarks/RESULTS.md)."""
    from megatron_mhc.kernels.cuda import merge_project as cuda_merge_project

    return cuda_merge_project.merge_project_forward(x3, y2, hp, hr, next_phi)


def _post_res_proj_forward(ctx, x, y, h_post, h_res, next_phi):
    """The merge's forward plus the next sublayer's projection partials of its output (the CUDA
    kernel where it applies, else the Triton one)."""
    x3, y2, hp, hr = _merge_inputs(ctx, x, y, h_post, h_res)
    fused = _cuda_merge_project(x3, y2, hp, hr, next_phi)
    out, proj_part, ss_part = fused if fused is not None else _launch_post_res_proj_fwd(
        x3, y2, hp, hr, next_phi)
    return out.view_as(x), proj_part, ss_part


def _launch_post_res_proj_fwd(x3, y2, hp, hr, next_phi):
    """Triton's merge + projection kernel on ``x3 [T, n, C]``: ``(out, proj_part, ss_part)``
    (what the CUDA kernel returns, over Triton's channel splits)."""
    t, n, c = x3.shape
    out = torch.empty_like(x3)
    m = n * n + 2 * n
    dot_mode, phi_dot = _projection_dot(x3.dtype, _contig(next_phi))
    split, c_per_split = _projection_splits(c, 128, 512)  # 128: a multiple of every tuned BC
    proj_part = torch.empty(split, t, m, device=x3.device, dtype=torch.float32)
    ss_part = torch.empty(split, t, device=x3.device, dtype=torch.float32)
    post_res_proj_fwd_kernel[lambda meta: (_cdiv(t, meta["BT"]), split)](
        x3, y2, hp, hr, out, phi_dot, proj_part, ss_part, t, c, c_per_split,
        N=n, M=m, BM=_pow2(m, 16), DOT_MODE=dot_mode)
    return out, proj_part, ss_part


class _LinkedPostResProjFunction(torch.autograd.Function):
    """``_LinkedPostResFunction`` whose forward also leaves the next sublayer's projection
    partials of the merged stream (not differentiable: the next entry's backward differentiates
    its norm and projection of the stream itself, as if it had made them)."""

    @staticmethod
    def forward(ctx, x_link, y, h_post, h_res, link, next_phi):
        ctx.set_materialize_grads(False)
        ctx.link = link
        out, proj_part, ss_part = _post_res_proj_forward(ctx, x_link, y, h_post, h_res, next_phi)
        ctx.mark_non_differentiable(proj_part, ss_part)
        return out, proj_part, ss_part

    @staticmethod
    def backward(ctx, dout, _dproj_part, _dss_part):
        return (*_LinkedPostResFunction.backward(ctx, dout), None)


def post_res_merge(x, y, h_post, h_res):
    """Triton ``post_res_merge`` (see ``megatron_mhc.core.ops.reference.post_res_merge``)."""
    _check(x, "post_res_merge")
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return _PostResFunction.apply(x, y, h_post, h_res)


def merge_into(x, y, h_post, h_res, out):
    """``post_res_merge(x, y, h_post, h_res)`` written into ``out`` (``x``'s shape, dtype and
    device, contiguous; may be ``x`` itself), without autograd: the recompute's rebuild of a
    stream in place of its parent. Returns ``out``."""
    _check(x, "merge_into")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"merge_into: out must match x {tuple(x.shape)} {x.dtype} {x.device}, "
                         f"got {tuple(out.shape)} {out.dtype} {out.device}")
    if not out.is_contiguous():
        raise ValueError("merge_into: out must be contiguous")
    x3, y2, hp, hr = _merge_operands(x, y.to(x.dtype), h_post, h_res)
    _launch_post_res_fwd(x3, y2, hp, hr, out.view(x3.shape))  # a raw launch: no autograd
    return out


def merge_linked(x_link, y, h_post, h_res, link):
    """``post_res_merge`` of the pair opened by ``enter_linked`` (``x_link``, ``h_post``, ``h_res``
    and ``link`` are what it returned)."""
    _check(x_link, "merge_linked")
    if y.dtype != x_link.dtype:
        y = y.to(x_link.dtype)
    return _LinkedPostResFunction.apply(x_link, y, h_post, h_res, link)


def merge_linked_project(x_link, y, h_post, h_res, link, next_phi):
    """``merge_linked`` that also returns the ``StreamProjection`` of its output for the next
    sublayer's ``enter_linked(out, next_phi, ..., projection=...)``: the merge's pass over the
    new stream gives the next norm and projection, so the next entry does not read it for them."""
    _check(x_link, "merge_linked_project")
    reference.check_phi_shape(x_link, next_phi, "next_phi")
    if y.dtype != x_link.dtype:
        y = y.to(x_link.dtype)
    out, proj_part, ss_part = _LinkedPostResProjFunction.apply(x_link, y, h_post, h_res, link,
                                                              next_phi)
    return out, StreamProjection(proj_part, ss_part, next_phi)
