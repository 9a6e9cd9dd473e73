"""Triton kernels of mHC (forward and backward), launched from ``triton_ops``.

Layout: tokens are rows. ``x`` is ``[T, n, C]`` contiguous (row stride n*C), the mapping vector is
``[pre (n) | post (n) | res (n*n, row-major)]`` (M = n*n + 2n values per token). ``NP`` is n padded
to a power of two; padded lanes are masked (Sinkhorn uses -inf there). All arithmetic is float32.
"""

import os

import triton
import triton.language as tl

from megatron_mhc.core.ops.reference import SINKHORN_LOGIT_LIMIT

#: The reference's clamp of the Sinkhorn logits (+-inf -> their limits, NaN kept).
LOGIT_LIMIT = tl.constexpr(SINKHORN_LOGIT_LIMIT)


# ----------------------------------------------------------------------------------------------
# Norm + projection (+ mappings) forward: one read of x gives x @ phi and sum(x^2) (split over K
# for parallelism), then a small per-token kernel reduces the splits and computes the mappings.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _lse(v, axis: tl.constexpr):
    """logsumexp along ``axis`` (kept as a broadcastable dim); -inf for an all -inf slice."""
    m = tl.max(v, axis=axis, keep_dims=True)
    m = tl.where(m > float("-inf"), m, 0.0)
    return m + tl.log(tl.sum(tl.exp(v - m), axis=axis, keep_dims=True))


@triton.jit
def _dot_acc(a, a_f32, b, acc, DOT_MODE: tl.constexpr):
    """``acc + a @ b`` per DOT_MODE: 0 on ``a``'s 16-bit dtype (``b`` cast by the caller); 1
    float32 ieee; 2 float32 via tf32 (``a_f32`` is ``a`` in float32)."""
    if DOT_MODE == 0:
        return tl.dot(a, b, acc)
    elif DOT_MODE == 1:
        return tl.dot(a_f32, b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a_f32, b.to(tl.float32), acc, input_precision="tf32")


@triton.jit
def proj_partial_kernel(
    x_ptr, phi_ptr, proj_part_ptr, ss_part_ptr, T, K, k_per_split,
    M: tl.constexpr, BM: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """Partial x @ phi and sum(x^2) over one K-split: [SPLIT, T, M] and [SPLIT, T].

    DOT_MODE 0: operands in x's 16-bit dtype (phi cast by the caller); 1: float32 ieee;
    2: float32 via tf32 (16-bit x under the interpreter, which has no 16-bit dot).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BT + tl.arange(0, BT)
    row_ok = rows < T
    cols_m = tl.arange(0, BM)
    acc = tl.zeros([BT, BM], dtype=tl.float32)
    sq = tl.zeros([BT, BK], dtype=tl.float32)
    k_begin = split * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        xt = tl.load(x_ptr + rows[:, None] * K + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        pt = tl.load(phi_ptr + ks[:, None] * M + cols_m[None, :],
                     mask=k_ok[:, None] & (cols_m[None, :] < M), other=0.0)
        xf = xt.to(tl.float32)
        acc = _dot_acc(xt, xf, pt, acc, DOT_MODE)
        sq += xf * xf
    tl.store(ss_part_ptr + split * T + rows, tl.sum(sq, axis=1), mask=row_ok)
    tl.store(proj_part_ptr + split * T * M + rows[:, None] * M + cols_m[None, :], acc,
             mask=row_ok[:, None] & (cols_m[None, :] < M))


@triton.jit
def mappings_fwd_kernel(
    proj_part_ptr, ss_part_ptr, alpha_ptr, bias_ptr,
    proj_ptr, rinv_ptr, h_pre_ptr, h_post_ptr, h_res_ptr, x_ptr, agg_ptr,
    T, K, C, eps, SPLIT: tl.constexpr,
    N: tl.constexpr, NP: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
    VARIANT_MHC: tl.constexpr, ITERS: tl.constexpr, BT: tl.constexpr,
    WITH_PRE: tl.constexpr, BC: tl.constexpr,
):
    """Reduce the K-split partials, then gates, bias, sigmoid / Sinkhorn per token.

    WITH_PRE: also the pre-apply ``agg[t, c] = sum_i H_pre[t, i] x[t, i, c]`` of this program's
    tokens (x ``[T, n, C]``, agg ``[T, C]``), from H_pre still in registers: the fused entry's
    forward is this kernel after the projection's.
    """
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    cols_m = tl.arange(0, BM)
    mm = row_ok[:, None] & (cols_m[None, :] < M)
    proj = tl.zeros([BT, BM], dtype=tl.float32)
    ss = tl.zeros([BT], dtype=tl.float32)
    for sp in tl.static_range(SPLIT):
        proj += tl.load(proj_part_ptr + sp * T * M + rows[:, None] * M + cols_m[None, :],
                        mask=mm, other=0.0)
        ss += tl.load(ss_part_ptr + sp * T + rows, mask=row_ok, other=0.0)
    rinv = 1.0 / tl.sqrt(ss / K + eps)
    tl.store(rinv_ptr + rows, rinv, mask=row_ok)
    tl.store(proj_ptr + rows[:, None] * M + cols_m[None, :], proj, mask=mm)
    # Re-read this block's projection in the [token, i, j] shapes the mappings need.
    tl.debug_barrier()
    h_pre = _mappings_epilogue(proj_ptr, rinv, alpha_ptr, bias_ptr, h_pre_ptr, h_post_ptr,
                               h_res_ptr, rows, row_ok, N, NP, M, VARIANT_MHC, ITERS)
    if WITH_PRE:
        ii = tl.arange(0, NP)
        m2 = row_ok[:, None] & (ii < N)[None, :]
        for c0 in range(0, C, BC):
            cs = c0 + tl.arange(0, BC)
            c_ok = cs < C
            x3 = tl.load(x_ptr + rows[:, None, None] * (N * C) + ii[None, :, None] * C
                         + cs[None, None, :], mask=m2[:, :, None] & c_ok[None, None, :],
                         other=0.0).to(tl.float32)
            agg = tl.sum(h_pre[:, :, None] * x3, axis=1)
            tl.store(agg_ptr + rows[:, None] * C + cs[None, :], agg.to(agg_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _load_logits(proj_ptr, rinv, alpha_ptr, bias_ptr, rows, row_ok,
                 N: tl.constexpr, NP: tl.constexpr, M: tl.constexpr, VARIANT_MHC: tl.constexpr):
    """Per-token pre/post [BT, NP] and res [BT, NP, NP] pre-activations, and the dynamic terms
    (alpha and bias are read in their own dtype and computed with in float32)."""
    ii = tl.arange(0, NP)
    i_ok = ii < N
    m2 = row_ok[:, None] & i_ok[None, :]
    m3 = m2[:, :, None] & i_ok[None, None, :]
    res_off = 2 * N + ii[:, None] * N + ii[None, :]
    dyn_pre = tl.load(proj_ptr + rows[:, None] * M + ii[None, :], mask=m2, other=0.0) * rinv[:, None]
    dyn_post = tl.load(proj_ptr + rows[:, None] * M + N + ii[None, :], mask=m2,
                       other=0.0) * rinv[:, None]
    dyn_res = tl.load(proj_ptr + rows[:, None, None] * M + res_off[None, :, :], mask=m3,
                      other=0.0) * rinv[:, None, None]
    a_pre = tl.load(alpha_ptr + 0).to(tl.float32)
    a_post = tl.load(alpha_ptr + 1).to(tl.float32)
    a_res = tl.load(alpha_ptr + 2).to(tl.float32)
    b_pre = tl.load(bias_ptr + ii, mask=i_ok, other=0.0).to(tl.float32)
    b_post = tl.load(bias_ptr + N + ii, mask=i_ok, other=0.0).to(tl.float32)
    b_res = tl.load(bias_ptr + res_off, mask=i_ok[:, None] & i_ok[None, :],
                    other=0.0).to(tl.float32)
    if VARIANT_MHC:
        z_pre = a_pre * dyn_pre + b_pre[None, :]
        z_post = a_post * dyn_post + b_post[None, :]
        z_res = a_res * dyn_res + b_res[None, :, :]
    else:
        z_pre = a_pre * _tanh(dyn_pre) + b_pre[None, :]
        z_post = a_post * _tanh(dyn_post) + b_post[None, :]
        z_res = a_res * _tanh(dyn_res) + b_res[None, :, :]
    return z_pre, z_post, z_res, dyn_pre, dyn_post, dyn_res, m2, m3


@triton.jit
def _tanh(v):
    e = tl.exp(-2.0 * tl.abs(v))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(v >= 0, t, -t)


@triton.jit
def _clamp_logits(z):
    """``clamp(z, -LOGIT_LIMIT, LOGIT_LIMIT)`` that keeps NaN (comparisons with NaN are false)."""
    return tl.where(z > LOGIT_LIMIT, LOGIT_LIMIT, tl.where(z < -LOGIT_LIMIT, -LOGIT_LIMIT, z))


@triton.jit
def _sinkhorn_half_step(v, m3, axis: tl.constexpr):
    v = v - _lse(v, axis)
    return tl.where(m3, v, float("-inf"))


@triton.jit
def _mappings_epilogue(proj_ptr, rinv, alpha_ptr, bias_ptr, h_pre_ptr, h_post_ptr, h_res_ptr,
                       rows, row_ok, N: tl.constexpr, NP: tl.constexpr, M: tl.constexpr,
                       VARIANT_MHC: tl.constexpr, ITERS: tl.constexpr):
    z_pre, z_post, z_res, _a, _b, _c, m2, m3 = _load_logits(
        proj_ptr, rinv, alpha_ptr, bias_ptr, rows, row_ok, N, NP, M, VARIANT_MHC)
    ii = tl.arange(0, NP)
    if VARIANT_MHC:
        h_pre = tl.sigmoid(z_pre)
        h_post = 2.0 * tl.sigmoid(z_post)
        v = tl.where(m3, _clamp_logits(z_res), float("-inf"))
        for _ in range(ITERS):
            v = _sinkhorn_half_step(v, m3, 2)
            v = _sinkhorn_half_step(v, m3, 1)
        h_res = tl.exp(v)
    else:
        h_pre = z_pre
        h_post = z_post
        h_res = z_res
    tl.store(h_pre_ptr + rows[:, None] * N + ii[None, :], h_pre, mask=m2)
    tl.store(h_post_ptr + rows[:, None] * N + ii[None, :], h_post, mask=m2)
    tl.store(h_res_ptr + rows[:, None, None] * (N * N) + ii[None, :, None] * N + ii[None, None, :],
             h_res, mask=m3)
    return tl.where(m2, h_pre, 0.0)


# ----------------------------------------------------------------------------------------------
# Mappings backward: per token, from dH to d(proj), d(rinv) and per-token alpha/bias grads.
# The Sinkhorn backward recomputes the iterations on chip, keeping only the per-step logsumexp
# vectors (NP floats each) in a scratch row of this token; v_{k-1} = v_k + lse_k rebuilds the
# iterates in reverse, and softmax(v_{k-1}) = exp(v_k).
# ----------------------------------------------------------------------------------------------
@triton.jit
def mappings_bwd_kernel(
    proj_ptr, rinv_ptr, alpha_ptr, bias_ptr,
    dh_pre_ptr, dh_post_ptr, dh_res_ptr,
    dproj_ptr, coef_ptr, dalpha_part_ptr, dbias_part_ptr, lse_scratch_ptr,
    T, K, CB,
    N: tl.constexpr, NP: tl.constexpr, M: tl.constexpr,
    VARIANT_MHC: tl.constexpr, ITERS: tl.constexpr, BT: tl.constexpr,
):
    """dH -> d(proj), the norm coefficient per token, and this block's alpha/bias partials.

    dH_post and dH_res arrive as CB partials per token ([T, CB, n] and [T, CB, n, n], summed here:
    the post/res merge backward's per-C-block results, or CB = 1); the alpha and bias gradients
    leave as sums over this program's BT tokens ([T/BT, 3] and [T/BT, M]) for ``param_grads_kernel``.
    """
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    row_ok = rows < T
    ii = tl.arange(0, NP)
    dh_pre = tl.load(dh_pre_ptr + rows[:, None] * N + ii[None, :],
                     mask=row_ok[:, None] & (ii < N)[None, :], other=0.0)
    _mappings_bwd_tile(pid, rows, row_ok, dh_pre, proj_ptr, rinv_ptr, alpha_ptr, bias_ptr,
                       dh_post_ptr, dh_res_ptr, dproj_ptr, coef_ptr, dalpha_part_ptr,
                       dbias_part_ptr, lse_scratch_ptr, K, CB, N, NP, M, VARIANT_MHC, ITERS, BT)


@triton.jit
def pre_mappings_bwd_kernel(
    x_ptr, d_agg_ptr, proj_ptr, rinv_ptr, alpha_ptr, bias_ptr,
    dh_post_ptr, dh_res_ptr,
    dproj_ptr, coef_ptr, dalpha_part_ptr, dbias_part_ptr, lse_scratch_ptr,
    T, K, C, CB,
    N: tl.constexpr, NP: tl.constexpr, M: tl.constexpr,
    VARIANT_MHC: tl.constexpr, ITERS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    """The entry backward's dH_pre pass and mapping backward in one launch: each program sums
    ``dH_pre[t, i] = sum_c x[t, i, c] d_agg[t, c]`` over its BT whole token rows (x ``[T, n, C]``,
    d_agg ``[T, C]``; as ``pre_apply_bwd_kernel``), then runs ``mappings_bwd_kernel``'s per-token
    work on those rows with dH_pre still in registers (same outputs; partial rows per BT tokens)."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    row_ok = rows < T
    # No dx here (WRITE_DX False): the h and dx arguments are unused placeholders.
    dh_pre = _pre_apply_dh(x_ptr, d_agg_ptr, 0.0, x_ptr, rows, row_ok, C, N, NP, BT, BC, False)
    _mappings_bwd_tile(pid, rows, row_ok, dh_pre, proj_ptr, rinv_ptr, alpha_ptr, bias_ptr,
                       dh_post_ptr, dh_res_ptr, dproj_ptr, coef_ptr, dalpha_part_ptr,
                       dbias_part_ptr, lse_scratch_ptr, K, CB, N, NP, M, VARIANT_MHC, ITERS, BT)


@triton.jit
def _mappings_bwd_tile(pid, rows, row_ok, dh_pre, proj_ptr, rinv_ptr, alpha_ptr, bias_ptr,
                       dh_post_ptr, dh_res_ptr, dproj_ptr, coef_ptr, dalpha_part_ptr,
                       dbias_part_ptr, lse_scratch_ptr, K, CB,
                       N: tl.constexpr, NP: tl.constexpr, M: tl.constexpr,
                       VARIANT_MHC: tl.constexpr, ITERS: tl.constexpr, BT: tl.constexpr):
    """The mapping backward of tokens ``rows`` (block ``pid``) given their dH_pre [BT, NP]."""
    rinv = tl.load(rinv_ptr + rows, mask=row_ok, other=0.0)
    z_pre, z_post, z_res, dyn_pre, dyn_post, dyn_res, m2, m3 = _load_logits(
        proj_ptr, rinv, alpha_ptr, bias_ptr, rows, row_ok, N, NP, M, VARIANT_MHC)
    ii = tl.arange(0, NP)
    dh_post = tl.zeros([BT, NP], dtype=tl.float32)
    dh_res = tl.zeros([BT, NP, NP], dtype=tl.float32)
    res_in_row = ii[None, :, None] * N + ii[None, None, :]
    for cb in range(CB):
        dh_post += tl.load(dh_post_ptr + (rows[:, None] * CB + cb) * N + ii[None, :], mask=m2,
                           other=0.0)
        dh_res += tl.load(dh_res_ptr + (rows[:, None, None] * CB + cb) * (N * N) + res_in_row,
                          mask=m3, other=0.0)
    a_pre = tl.load(alpha_ptr + 0).to(tl.float32)
    a_post = tl.load(alpha_ptr + 1).to(tl.float32)
    a_res = tl.load(alpha_ptr + 2).to(tl.float32)
    if VARIANT_MHC:
        s_pre = tl.sigmoid(z_pre)
        s_post = tl.sigmoid(z_post)
        dz_pre = dh_pre * s_pre * (1.0 - s_pre)
        dz_post = dh_post * 2.0 * s_post * (1.0 - s_post)
        # Forward recompute, saving each half-step's logsumexp vector.
        scratch = lse_scratch_ptr + rows * (2 * ITERS * NP)
        v = tl.where(m3, _clamp_logits(z_res), float("-inf"))
        for it in range(ITERS):
            lse_r = _lse(v, 2)
            v = tl.where(m3, v - lse_r, float("-inf"))
            tl.store(scratch[:, None, None] + (2 * it) * NP + ii[None, :, None], lse_r,
                     mask=row_ok[:, None, None])
            lse_c = _lse(v, 1)
            v = tl.where(m3, v - lse_c, float("-inf"))
            tl.store(scratch[:, None, None] + (2 * it + 1) * NP + ii[None, None, :], lse_c,
                     mask=row_ok[:, None, None])
        tl.debug_barrier()
        p = tl.exp(v)
        dv = dh_res * p
        for it2 in range(ITERS):
            it = ITERS - 1 - it2
            # Column half-step (2*it + 1): v_out = v_in - lse_c(v_in).
            dv = tl.where(m3, dv - p * tl.sum(dv, axis=1, keep_dims=True), 0.0)
            lse_c = tl.load(scratch[:, None, None] + (2 * it + 1) * NP + ii[None, None, :],
                            mask=row_ok[:, None, None], other=0.0)
            v = tl.where(m3, v + lse_c, float("-inf"))
            p = tl.exp(v)
            # Row half-step (2*it).
            dv = tl.where(m3, dv - p * tl.sum(dv, axis=2, keep_dims=True), 0.0)
            lse_r = tl.load(scratch[:, None, None] + (2 * it) * NP + ii[None, :, None],
                            mask=row_ok[:, None, None], other=0.0)
            v = tl.where(m3, v + lse_r, float("-inf"))
            p = tl.exp(v)
        dz_res = tl.where(tl.abs(z_res) > LOGIT_LIMIT, 0.0, dv)  # the clamp's gradient
        # d(dyn) and the gate grads: z = a * dyn + b.
        g_pre = dz_pre * a_pre
        g_post = dz_post * a_post
        g_res = dz_res * a_res
        da_pre = tl.sum(dz_pre * dyn_pre, axis=1)
        da_post = tl.sum(dz_post * dyn_post, axis=1)
        da_res = tl.sum(tl.sum(dz_res * dyn_res, axis=2), axis=1)
    else:
        # z = a * tanh(dyn) + b.
        t_pre = _tanh(dyn_pre)
        t_post = _tanh(dyn_post)
        t_res = _tanh(dyn_res)
        dz_pre = dh_pre
        dz_post = dh_post
        dz_res = dh_res
        g_pre = dz_pre * a_pre * (1.0 - t_pre * t_pre)
        g_post = dz_post * a_post * (1.0 - t_post * t_post)
        g_res = dz_res * a_res * (1.0 - t_res * t_res)
        da_pre = tl.sum(dz_pre * t_pre, axis=1)
        da_post = tl.sum(dz_post * t_post, axis=1)
        da_res = tl.sum(tl.sum(dz_res * t_res, axis=2), axis=1)
    # dyn = proj * rinv: d(proj) = g * rinv, d(rinv) = sum(g * proj) = sum(g * dyn) / rinv.
    dproj_pre = g_pre * rinv[:, None]
    dproj_post = g_post * rinv[:, None]
    dproj_res = g_res * rinv[:, None, None]
    # Per token: drinv = sum_m g_m * proj_m, and proj_m = dyn_m / rinv (rinv > 0 always).
    d_rinv = (tl.sum(g_pre * dyn_pre, axis=1) + tl.sum(g_post * dyn_post, axis=1)
              + tl.sum(tl.sum(g_res * dyn_res, axis=2), axis=1)) / rinv
    # rinv = (sum(x^2)/K + eps)^(-1/2): d rinv / dx = -rinv^3 x / K, so dx gets coef * x.
    tl.store(coef_ptr + rows, -d_rinv * rinv * rinv * rinv / K, mask=row_ok)
    res_off = 2 * N + ii[:, None] * N + ii[None, :]
    tl.store(dproj_ptr + rows[:, None] * M + ii[None, :], dproj_pre, mask=m2)
    tl.store(dproj_ptr + rows[:, None] * M + N + ii[None, :], dproj_post, mask=m2)
    tl.store(dproj_ptr + rows[:, None, None] * M + res_off[None, :, :], dproj_res, mask=m3)
    # This block's sums over its tokens (rows past T contribute exact zeros).
    i_ok = ii < N
    tl.store(dbias_part_ptr + pid * M + ii, tl.sum(tl.where(m2, dz_pre, 0.0), axis=0), mask=i_ok)
    tl.store(dbias_part_ptr + pid * M + N + ii, tl.sum(tl.where(m2, dz_post, 0.0), axis=0),
             mask=i_ok)
    tl.store(dbias_part_ptr + pid * M + res_off, tl.sum(tl.where(m3, dz_res, 0.0), axis=0),
             mask=i_ok[:, None] & i_ok[None, :])
    tl.store(dalpha_part_ptr + pid * 3 + 0, tl.sum(tl.where(row_ok, da_pre, 0.0), axis=0))
    tl.store(dalpha_part_ptr + pid * 3 + 1, tl.sum(tl.where(row_ok, da_post, 0.0), axis=0))
    tl.store(dalpha_part_ptr + pid * 3 + 2, tl.sum(tl.where(row_ok, da_res, 0.0), axis=0))


# ----------------------------------------------------------------------------------------------
# Norm + projection backward: dx = dproj @ phi^T + coef * x, dphi = x^T @ dproj (per T-split).
# ----------------------------------------------------------------------------------------------
def _norm_proj_bwd_configs():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BK": 64, "BT": 32}, num_warps=4)]
    # The four best of ten tile shapes measured on an H100 (benchmarks/probe_norm_proj_bwd.py;
    # T=8192, n=4, C=4096/7168: 128x64 with 4 warps and 4 stages first, the rest within 20 %).
    return [
        triton.Config({"BK": bk, "BT": bt}, num_warps=w, num_stages=st)
        for bk, bt, w, st in ((128, 64, 4, 4), (64, 128, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3))
    ]


@triton.autotune(configs=_norm_proj_bwd_configs(),
                 key=["K", "C", "M", "WITH_PRE", "ADD_DX", "DOT_MODE"],
                 reset_to_zero=[], restore_value=["dx_ptr"])
@triton.jit
def norm_proj_bwd_kernel(
    x_ptr, phi_ptr, dproj_ptr, coef_ptr, dx_ptr, dphi_part_ptr, h_pre_ptr, d_agg_ptr, dx_add_ptr,
    dalpha_part_ptr, dbias_part_ptr, dalpha_split_ptr, dbias_split_ptr,
    T, K, C, rows_per_split, G,
    N: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
    DOT_MODE: tl.constexpr, WITH_PRE: tl.constexpr, ADD_DX: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr,
):
    """dx = dproj @ phi^T + coef * x (+ pre-apply term, + dx_add), dphi partial = x^T @ dproj.

    The programs of the first K-block also sum one share of the mapping backward's alpha / bias
    partials (``[G, 3]`` / ``[G, M]``, one row per token block) into ``[SPLITS, 3]`` /
    ``[SPLITS, M]``: a few rows each here, where one program summing all G rows (thousands at
    T = 8192) took 15-30 us on an H100 (benchmarks/probe_param_grads.py).

    WITH_PRE: also add the pre-apply gradient h_pre[t, i] * d_agg[t, c] (k = i*C + c), so the
    fused entry op writes its whole dx in this one pass. ADD_DX: also add ``dx_add`` (the post/res
    merge's dx of the same stream; ``dx_add_ptr`` may be ``dx_ptr`` itself: each element is read
    before it is written by the same program). DOT_MODE 0: both GEMMs on x's 16-bit dtype
    (dproj and phi rounded to it, fp32 accumulation); 1: float32 ieee; 2: float32 via tf32.
    """
    kb = tl.program_id(0)
    split = tl.program_id(1)
    ks = kb * BK + tl.arange(0, BK)
    k_ok = ks < K
    cols_m = tl.arange(0, BM)
    m_ok = cols_m < M
    phi_t = tl.load(phi_ptr + ks[:, None] * M + cols_m[None, :],
                    mask=k_ok[:, None] & m_ok[None, :], other=0.0)  # [BK, BM]
    if DOT_MODE == 0:
        phi_t = phi_t.to(x_ptr.dtype.element_ty)
    else:
        phi_t = phi_t.to(tl.float32)
    dphi = tl.zeros([BK, BM], dtype=tl.float32)
    t_begin = split * rows_per_split
    for t0 in range(t_begin, t_begin + rows_per_split, BT):
        rows = t0 + tl.arange(0, BT)
        row_ok = rows < T
        xt = tl.load(x_ptr + rows[:, None] * K + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xf = xt.to(tl.float32)
        dp = tl.load(dproj_ptr + rows[:, None] * M + cols_m[None, :],
                     mask=row_ok[:, None] & m_ok[None, :], other=0.0)  # [BT, BM] fp32
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        if DOT_MODE == 0:
            dp16 = dp.to(xt.dtype)
            dxt = tl.dot(dp16, tl.trans(phi_t))
            dphi = tl.dot(tl.trans(xt), dp16, dphi)
        elif DOT_MODE == 1:
            dxt = tl.dot(dp, tl.trans(phi_t), input_precision="ieee")
            dphi = tl.dot(tl.trans(xf), dp, dphi, input_precision="ieee")
        else:
            dxt = tl.dot(dp, tl.trans(phi_t), input_precision="tf32")
            dphi = tl.dot(tl.trans(xf), dp, dphi, input_precision="tf32")
        dxt += coef[:, None] * xf
        if ADD_DX:
            dxt += tl.load(dx_add_ptr + rows[:, None] * K + ks[None, :],
                           mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if WITH_PRE:
            m2 = row_ok[:, None] & k_ok[None, :]
            da = tl.load(d_agg_ptr + rows[:, None] * C + (ks % C)[None, :], mask=m2, other=0.0)
            if C % BK == 0:  # the block lies in one stream, (kb * BK) // C
                hp = tl.load(h_pre_ptr + rows * N + (kb * BK) // C, mask=row_ok, other=0.0)
                dxt += hp[:, None] * da.to(tl.float32)
            else:
                hp2 = tl.load(h_pre_ptr + rows[:, None] * N + (ks // C)[None, :], mask=m2,
                              other=0.0)
                dxt += hp2 * da.to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * K + ks[None, :], dxt.to(xt.dtype),
                 mask=row_ok[:, None] & k_ok[None, :])
    tl.store(dphi_part_ptr + split * K * M + ks[:, None] * M + cols_m[None, :], dphi,
             mask=k_ok[:, None] & m_ok[None, :])
    if kb == 0:
        _sum_rows_share(dalpha_part_ptr, dbias_part_ptr, dalpha_split_ptr, dbias_split_ptr,
                        G, split, tl.num_programs(1), M, BM)


@triton.jit
def _sum_rows_share(dalpha_part_ptr, dbias_part_ptr, dalpha_split_ptr, dbias_split_ptr,
                    G, share, SHARES, M: tl.constexpr, BM: tl.constexpr):
    """Chunk ``share`` of SHARES equal chunks of the rows of ``[G, 3]`` / ``[G, M]``, summed
    (in a fixed order: deterministic) into row ``share`` of ``[SHARES, 3]`` / ``[SHARES, M]``."""
    BG: tl.constexpr = 64
    cols = tl.arange(0, BM)
    m_ok = cols < M
    a3 = tl.arange(0, 4)
    per_share = tl.cdiv(G, SHARES)
    g_begin = share * per_share
    g_end = tl.minimum(g_begin + per_share, G)
    bias_acc = tl.zeros([BG, BM], dtype=tl.float32)
    alpha_acc = tl.zeros([BG, 4], dtype=tl.float32)
    for g0 in range(g_begin, g_end, BG):
        gs = g0 + tl.arange(0, BG)
        g_ok = gs < g_end
        bias_acc += tl.load(dbias_part_ptr + gs[:, None] * M + cols[None, :],
                            mask=g_ok[:, None] & m_ok[None, :], other=0.0)
        alpha_acc += tl.load(dalpha_part_ptr + gs[:, None] * 3 + a3[None, :],
                             mask=g_ok[:, None] & (a3 < 3)[None, :], other=0.0)
    tl.store(dbias_split_ptr + share * M + cols, tl.sum(bias_acc, axis=0), mask=m_ok)
    tl.store(dalpha_split_ptr + share * 3 + a3, tl.sum(alpha_acc, axis=0), mask=a3 < 3)


# ----------------------------------------------------------------------------------------------
# Pre-apply: out[t, c] = sum_i h_pre[t, i] x[t, i, c]  (reads n*C, writes C per token).
# ----------------------------------------------------------------------------------------------
@triton.jit
def pre_apply_fwd_kernel(x_ptr, h_ptr, out_ptr, T, C,
                         N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    row_ok = rows < T
    mask = row_ok[:, None] & (cs[None, :] < C)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(N):
        h = tl.load(h_ptr + rows * N + i, mask=row_ok, other=0.0)
        xi = tl.load(x_ptr + rows[:, None] * (N * C) + i * C + cs[None, :], mask=mask, other=0.0)
        acc += h[:, None] * xi.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * C + cs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _pre_apply_dh(x_ptr, dout_ptr, h, dx_ptr, rows, row_ok, C,
                  N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                  WRITE_DX: tl.constexpr):
    """``dh[t, i] = sum_c x[t, i, c] dout[t, c]`` of tokens ``rows`` ([BT, NP] float32), one pass
    over their whole rows; WRITE_DX: also ``dx[t, i, c] = h[t, i] dout[t, c]`` (h ``[BT, NP]``)."""
    ii = tl.arange(0, NP)
    i_ok = ii < N
    dh = tl.zeros([BT, NP], dtype=tl.float32)
    for c0 in range(0, C, BC):
        cs = c0 + tl.arange(0, BC)
        c_ok = cs < C
        m3 = row_ok[:, None, None] & i_ok[None, :, None] & c_ok[None, None, :]
        d = tl.load(dout_ptr + rows[:, None] * C + cs[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        offs = rows[:, None, None] * (N * C) + ii[None, :, None] * C + cs[None, None, :]
        x3 = tl.load(x_ptr + offs, mask=m3, other=0.0).to(tl.float32)
        dh += tl.sum(x3 * d[:, None, :], axis=2)
        if WRITE_DX:
            tl.store(dx_ptr + offs, (h[:, :, None] * d[:, None, :]).to(dx_ptr.dtype.element_ty),
                     mask=m3)
    return dh


@triton.jit
def pre_apply_bwd_kernel(x_ptr, h_ptr, dout_ptr, dx_ptr, dh_ptr, T, C,
                         N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                         WRITE_DX: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    ii = tl.arange(0, NP)
    m2 = row_ok[:, None] & (ii < N)[None, :]
    h = tl.load(h_ptr + rows[:, None] * N + ii[None, :], mask=m2, other=0.0)  # [BT, NP]
    dh = _pre_apply_dh(x_ptr, dout_ptr, h, dx_ptr, rows, row_ok, C, N, NP, BT, BC, WRITE_DX)
    tl.store(dh_ptr + rows[:, None] * N + ii[None, :], dh, mask=m2)


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
    # The two best of eleven shapes measured on an H100 (benchmarks/probe_merge_project.py,
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
                        N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    # One [BT tokens, BC channels] tile per program, as in the forward:
    # dx[j] = sum_i H_res[i, j] dout[i]; dy = sum_i H_post[i] dout[i] (written directly);
    # dH_res[i, j] = <dout[i], x[j]>, dH_post[i] = <dout[i], y> as per-C-block partials
    # [T, CB, ...] that the caller sums over CB.
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


# ----------------------------------------------------------------------------------------------
# Parameter gradients: the partial sums of dphi (per T-split), dalpha and dbias (per token block)
# reduced and written in the parameters' own dtypes, in one launch.
# ----------------------------------------------------------------------------------------------
@triton.jit
def param_grads_kernel(dphi_part_ptr, dphi_ptr, dalpha_part_ptr, dalpha_ptr, dbias_part_ptr,
                       dbias_ptr, K, SPLITS,
                       M: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, SP: tl.constexpr,
                       ACCUMULATE: tl.constexpr):
    """Programs 0 .. cdiv(K, BK)-1: dphi rows [BK, M] summed over SPLITS (<= SP; all partials
    loaded at once, one memory latency); the last program: dalpha [3] and dbias [M] summed over
    their SPLITS rows (``[SPLITS, 3]`` / ``[SPLITS, M]``, from the dx pass). ACCUMULATE: add the
    sums (in float32) to what the outputs hold (Megatron's ``main_grad`` buffers) instead of
    overwriting them."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BM)
    m_ok = cols < M
    sp = tl.arange(0, SP)
    sp_ok = sp < SPLITS
    if pid < tl.cdiv(K, BK):
        ks = pid * BK + tl.arange(0, BK)
        mask = (ks < K)[:, None] & m_ok[None, :]
        offs = ks[:, None] * M + cols[None, :]
        parts = tl.load(dphi_part_ptr + sp[:, None, None] * (K * M) + offs[None, :, :],
                        mask=sp_ok[:, None, None] & mask[None, :, :], other=0.0)
        acc = tl.sum(parts, axis=0)
        if ACCUMULATE:
            acc += tl.load(dphi_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dphi_ptr + offs, acc.to(dphi_ptr.dtype.element_ty), mask=mask)
    else:
        a3 = tl.arange(0, 4)
        bias_sum = tl.sum(tl.load(dbias_part_ptr + sp[:, None] * M + cols[None, :],
                                  mask=sp_ok[:, None] & m_ok[None, :], other=0.0), axis=0)
        alpha_sum = tl.sum(tl.load(dalpha_part_ptr + sp[:, None] * 3 + a3[None, :],
                                   mask=sp_ok[:, None] & (a3 < 3)[None, :], other=0.0), axis=0)
        if ACCUMULATE:
            bias_sum += tl.load(dbias_ptr + cols, mask=m_ok, other=0.0).to(tl.float32)
            alpha_sum += tl.load(dalpha_ptr + a3, mask=a3 < 3, other=0.0).to(tl.float32)
        tl.store(dbias_ptr + cols, bias_sum.to(dbias_ptr.dtype.element_ty), mask=m_ok)
        tl.store(dalpha_ptr + a3, alpha_sum.to(dalpha_ptr.dtype.element_ty), mask=a3 < 3)
