"""The mappings (``compute_mappings``): gates, bias, sigmoid and the Sinkhorn per token, forward
and backward, on the projection partials of ``projection.py``.

Layout: tokens are rows. ``x`` is ``[T, n, C]`` contiguous (row stride n*C), the mapping vector is
``[pre (n) | post (n) | res (n*n, row-major)]`` (M = n*n + 2n values per token). ``NP`` is n padded
to a power of two; padded lanes are masked (Sinkhorn uses -inf there). All arithmetic is float32.

The forward kernel optionally applies H_pre (the entry's pre-apply, ``WITH_PRE``) and the backward
optionally sums dH_pre from x itself (``pre_mappings_bwd_kernel``): ``_mappings_forward`` and
``_mappings_backward`` here serve both ``compute_mappings`` and the fused entry (``entry.py``).
"""

import torch
import triton
import triton.language as tl

from megatron_mhc.core.ops import reference
from megatron_mhc.core.ops.reference import SINKHORN_LOGIT_LIMIT
from megatron_mhc.kernels.triton._launch import _cdiv, _check, _contig, _grad_f32, _pow2
from megatron_mhc.kernels.triton.pre_apply import _pre_apply_dh
from megatron_mhc.kernels.triton.projection import (
    StreamProjection,
    _backward_dot_mode,
    _main_grad_targets,
    _placeholder_grad,
    _project,
    arrival_counters,
    dx_pass_splits,
    norm_proj_bwd_kernel,
)

#: The reference's clamp of the Sinkhorn logits (+-inf -> their limits, NaN kept).
LOGIT_LIMIT = tl.constexpr(SINKHORN_LOGIT_LIMIT)


@triton.jit
def _lse(v, axis: tl.constexpr):
    """logsumexp along ``axis`` (kept as a broadcastable dim); -inf for an all -inf slice."""
    m = tl.max(v, axis=axis, keep_dims=True)
    m = tl.where(m > float("-inf"), m, 0.0)
    return m + tl.log(tl.sum(tl.exp(v - m), axis=axis, keep_dims=True))


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
    leave as sums over this program's BT tokens ([T/BT, 3] and [T/BT, M]) for the dx pass
    (``norm_proj_bwd_kernel``), which reduces them.
    """
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    row_ok = rows < T
    ii = tl.arange(0, NP)
    dh_pre = tl.load(dh_pre_ptr + rows[:, None] * N + ii[None, :],
                     mask=row_ok[:, None] & (ii < N)[None, :], other=0.0)
    _mappings_bwd_tile(pid, rows, row_ok, dh_pre, proj_ptr, rinv_ptr, alpha_ptr, bias_ptr,
                       dh_post_ptr, dh_res_ptr, dproj_ptr, coef_ptr, dalpha_part_ptr,
                       dbias_part_ptr, lse_scratch_ptr, K, CB, N, NP, M, VARIANT_MHC, ITERS, BT,
                       tl.zeros([BT, NP, NP], dtype=tl.float32), True)


@triton.jit
def pre_mappings_bwd_kernel(
    x_ptr, d_agg_ptr, proj_ptr, rinv_ptr, alpha_ptr, bias_ptr,
    dh_post_ptr, dh_res_ptr,
    dproj_ptr, coef_ptr, dalpha_part_ptr, dbias_part_ptr, lse_scratch_ptr,
    T, K, C, CB,
    N: tl.constexpr, NP: tl.constexpr, M: tl.constexpr,
    VARIANT_MHC: tl.constexpr, ITERS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    g_ptr=None, WITH_G: tl.constexpr = False, RES_PARTS: tl.constexpr = True,
):
    """The entry backward's dH_pre pass and mapping backward in one launch: each program sums
    ``dH_pre[t, i] = sum_c x[t, i, c] d_agg[t, c]`` over its BT whole token rows (x ``[T, n, C]``,
    d_agg ``[T, C]``; as ``pre_apply_bwd_kernel``), then runs ``mappings_bwd_kernel``'s per-token
    work on those rows with dH_pre still in registers (same outputs; partial rows per BT tokens).

    WITH_G (the "dx once" backward): the same pass also sums ``dH_res[t, i, j] = sum_c g[t, i, c]
    x[t, j, c]`` from the merge's upstream gradient g ``[T, n, C]``, added to the ``dh_res``
    partials if RES_PARTS (else there are none)."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    row_ok = rows < T
    # No dx here (WRITE_DX False): the h and dx arguments are unused placeholders.
    dh_pre, dh_res = _pre_apply_dh(x_ptr, d_agg_ptr, 0.0, x_ptr, rows, row_ok, C, N, NP, BT, BC,
                                   False, g_ptr, WITH_G)
    _mappings_bwd_tile(pid, rows, row_ok, dh_pre, proj_ptr, rinv_ptr, alpha_ptr, bias_ptr,
                       dh_post_ptr, dh_res_ptr, dproj_ptr, coef_ptr, dalpha_part_ptr,
                       dbias_part_ptr, lse_scratch_ptr, K, CB, N, NP, M, VARIANT_MHC, ITERS, BT,
                       dh_res, RES_PARTS)


@triton.jit
def _mappings_bwd_tile(pid, rows, row_ok, dh_pre, proj_ptr, rinv_ptr, alpha_ptr, bias_ptr,
                       dh_post_ptr, dh_res_ptr, dproj_ptr, coef_ptr, dalpha_part_ptr,
                       dbias_part_ptr, lse_scratch_ptr, K, CB,
                       N: tl.constexpr, NP: tl.constexpr, M: tl.constexpr,
                       VARIANT_MHC: tl.constexpr, ITERS: tl.constexpr, BT: tl.constexpr,
                       dh_res, RES_PARTS: tl.constexpr):
    """The mapping backward of tokens ``rows`` (block ``pid``) given their dH_pre [BT, NP] and a
    first part of dH_res [BT, NP, NP] (to which the CB partials are added if RES_PARTS)."""
    rinv = tl.load(rinv_ptr + rows, mask=row_ok, other=0.0)
    z_pre, z_post, z_res, dyn_pre, dyn_post, dyn_res, m2, m3 = _load_logits(
        proj_ptr, rinv, alpha_ptr, bias_ptr, rows, row_ok, N, NP, M, VARIANT_MHC)
    ii = tl.arange(0, NP)
    dh_post = tl.zeros([BT, NP], dtype=tl.float32)
    res_in_row = ii[None, :, None] * N + ii[None, None, :]
    for cb in range(CB):
        dh_post += tl.load(dh_post_ptr + (rows[:, None] * CB + cb) * N + ii[None, :], mask=m2,
                           other=0.0)
        if RES_PARTS:
            dh_res += tl.load(dh_res_ptr + (rows[:, None, None] * CB + cb) * (N * N)
                              + res_in_row, mask=m3, other=0.0)
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


#: (tokens per program, warps) of the mapping kernels: the forward with the pre-apply and the
#: backward. The per-token Sinkhorn work is latency-bound, so few tokens on one warp win: on an
#: H100, backward 35-51 % and forward 5-12 % faster than (16, 4) / (4, 4)
#: (benchmarks/probes/probe_mappings.py, which marks these rows).
MAPPINGS_FWD_TILE = (2, 1)
MAPPINGS_BWD_TILE = (8, 1)


#: Channels per step of the pre-apply inside the mapping forward kernel (256 measured the same at
#: C = 768 and 4096; benchmarks/probes/probe_launch_shapes.py).
MAPPINGS_PRE_BLOCK = 512


#: (tokens, channels, warps) of one program of the entry backward's dH_pre pass + mapping backward
#: (``pre_mappings_bwd_kernel``): 2 tokens in 128-channel steps on one warp. The per-token
#: Sinkhorn work after the pass is latency-bound and wants one warp, as the mapping kernels do
#: (H100, L2 flushed, benchmarks/probes/probe_launch_shapes.py: 31.2 / 54.1 / 142.0 / 227.0 us at T x C =
#: 4096 x 768 / 4096 x 2048 / 8192 x 4096 / 8192 x 7168, against 36.6 / 60.3 / 144.4 / 228.4 for
#: the dH_pre pass and the mapping backward as two launches; on the dH_pre pass's own tile, 2 x
#: 256-512 on 2-4 warps, the one launch took 66.5 / 116.8 / 238.6 / 307.5).
PRE_MAPPINGS_BWD_TILE = (2, 128, 1)


def _mappings_forward(x, phi, alpha, bias, variant_mhc: bool, iters: int, eps: float,
                      with_pre: bool = False, projection: StreamProjection | None = None):
    """Launch the projection (unless ``projection`` holds it) and the mapping kernel (with the
    pre-apply when ``with_pre``); returns the tensors the backward needs, the mappings and agg."""
    n, c = x.shape[-2], x.shape[-1]
    kdim, m = n * c, n * n + 2 * n
    x2 = _contig(x.reshape(-1, kdim))
    t = x2.shape[0]
    # Parameters go to the kernels in their own dtype (the kernels compute in float32), so no
    # cast kernels run per call; only a 16-bit projection with a different-dtype phi casts it.
    phi_c = _contig(phi)  # saved for the backward
    alpha_f = _contig(alpha)
    bias_f = _contig(bias)
    dev = x2.device
    if projection is None:
        proj_part, ss_part = _project(x2, phi_c, m)
    else:
        proj_part, ss_part = projection.proj_part, projection.ss_part
    split = proj_part.shape[0]
    proj = torch.empty(t, m, device=dev, dtype=torch.float32)
    rinv = torch.empty(t, device=dev, dtype=torch.float32)
    h_pre = torch.empty(t, n, device=dev, dtype=torch.float32)
    h_post = torch.empty(t, n, device=dev, dtype=torch.float32)
    h_res = torch.empty(t, n, n, device=dev, dtype=torch.float32)
    agg = torch.empty(t, c, device=dev, dtype=x.dtype) if with_pre else None
    bt2, warps = MAPPINGS_FWD_TILE if with_pre else (16, 4)
    mappings_fwd_kernel[(_cdiv(t, bt2),)](
        proj_part, ss_part, alpha_f, bias_f, proj, rinv, h_pre, h_post, h_res,
        x2, agg if with_pre else proj, t, kdim, c, eps,
        SPLIT=split, N=n, NP=_pow2(n), M=m, BM=_pow2(m, 16), VARIANT_MHC=variant_mhc,
        ITERS=iters, BT=bt2, WITH_PRE=with_pre, BC=MAPPINGS_PRE_BLOCK, num_warps=warps,
    )
    return (x2, phi_c, alpha_f, bias_f, proj, rinv), h_pre, h_post, h_res, agg


def _mappings_backward(saved, n, variant_mhc, iters, param_dtypes, dh_pre, dh_post, dh_res,
                       cb=1, d_agg=None, h_pre=None, dx_add=None, dx_out=None, params=None,
                       g=None, h_res=None):
    """dx and the parameter grads (in ``param_dtypes``) of the mappings, in two launches.

    ``dh_pre`` None (with ``d_agg``): the entry's dH_pre is summed from x and ``d_agg`` in the
    mapping backward's own launch (``pre_mappings_bwd_kernel``).

    ``dh_post`` / ``dh_res`` are ``[T, cb, n]`` / ``[T, cb, n, n]`` partial sums (cb = 1: the
    gradients themselves). With ``d_agg`` and ``h_pre`` the pre-apply's dx term is added in the
    same pass over x (the fused entry op); with ``dx_add`` another dx of the same stream is added
    (the linked merge's); ``dx_out`` is where dx goes (may be ``dx_add`` itself). ``params``:
    the (phi, alpha, bias) parameters; where ``_main_grad_targets`` allows, their float32 sums go
    straight into ``main_grad`` and placeholders come back.

    ``g`` / ``h_res`` (the "dx once" backward, with ``dh_pre`` None): the linked merge's upstream
    gradient ``[T, n*C]`` and its float32 H_res ``[T, n, n]``; dH_res = g·xᵀ is summed in the
    mapping backward's pass (``dh_res`` None: no partials, or ``[T, cb, n, n]`` more of it) and
    ``H_resᵀ·g`` goes into dx in the dx pass.
    """
    x2, phi_c, alpha_f, bias_f, proj, rinv = saved
    t, kdim = x2.shape
    c = kdim // n
    m = n * n + 2 * n
    bm = _pow2(m, 16)
    np_ = _pow2(n)
    dev = x2.device
    dproj = torch.empty(t, m, device=dev, dtype=torch.float32)
    coef = torch.empty(t, device=dev, dtype=torch.float32)
    scratch = torch.empty(t, 2 * iters * np_ if variant_mhc else 1, device=dev,
                          dtype=torch.float32)
    if dh_pre is None:  # the dH_pre pass and the mapping backward in one launch
        bt, bc, warps = PRE_MAPPINGS_BWD_TILE
    else:
        bt, warps = MAPPINGS_BWD_TILE
    blocks = _cdiv(t, bt)
    dalpha_part = torch.empty(blocks, 3, device=dev, dtype=torch.float32)
    dbias_part = torch.empty(blocks, m, device=dev, dtype=torch.float32)
    outs = (dh_post, dh_res, dproj, coef, dalpha_part, dbias_part, scratch)
    meta = dict(N=n, NP=np_, M=m, VARIANT_MHC=variant_mhc, ITERS=iters, BT=bt, num_warps=warps)
    with_g = g is not None
    if with_g and dh_pre is not None:
        raise ValueError("_mappings_backward: g (the dx-once backward) needs dh_pre=None")
    if dh_res is None and not with_g:
        raise ValueError("_mappings_backward: dh_res may be None only with g")
    if dh_res is None:  # the dx-once backward without other uses of H_res: no partials
        outs = (dh_post, dh_post, *outs[2:])
    if dh_pre is None:
        pre_mappings_bwd_kernel[(blocks,)](x2, d_agg, proj, rinv, alpha_f, bias_f, *outs,
                                             t, kdim, c, cb, BC=bc, g_ptr=g if with_g else None,
                                             WITH_G=with_g, RES_PARTS=dh_res is not None,
                                             **meta)
    else:
        mappings_bwd_kernel[(blocks,)](proj, rinv, alpha_f, bias_f, dh_pre, *outs, t, kdim, cb,
                                         **meta)
    dx = torch.empty_like(x2) if dx_out is None else dx_out
    splits, rows_per_split = dx_pass_splits(t)
    dphi_part = torch.empty(splits, kdim, m, device=dev, dtype=torch.float32)
    dalpha_split = torch.empty(splits, 3, device=dev, dtype=torch.float32)
    dbias_split = torch.empty(splits, m, device=dev, dtype=torch.float32)
    targets = _main_grad_targets(params)
    if targets is None:
        phi_dtype, alpha_dtype, bias_dtype = param_dtypes
        dphi = torch.empty(kdim, m, device=dev, dtype=phi_dtype)
        dalpha = torch.empty(3, device=dev, dtype=alpha_dtype)
        dbias = torch.empty(m, device=dev, dtype=bias_dtype)
    else:
        dphi, dalpha, dbias = targets
    with_pre = d_agg is not None
    norm_proj_bwd_kernel[lambda meta: (_cdiv(kdim, meta["BK"]), splits)](
        x2, phi_c, dproj, coef, dx, dphi_part,
        h_pre if with_pre else coef, d_agg if with_pre else coef,
        dx_add if dx_add is not None else dx,
        dalpha_part, dbias_part, dalpha_split, dbias_split,
        dphi, dalpha, dbias, arrival_counters(dev, kdim),
        t, kdim, c, rows_per_split, blocks,
        N=n, M=m, BM=bm, SP=_pow2(splits), DOT_MODE=_backward_dot_mode(x2.dtype),
        WITH_PRE=with_pre, ADD_DX=dx_add is not None, ACCUMULATE=targets is not None,
        g_ptr=g if with_g else None, h_res_ptr=h_res if with_g else None, G_RES=with_g,
    )
    if targets is not None:
        for param in params:
            param.grad_added_to_main_grad = True
        dphi, dalpha, dbias = (_placeholder_grad(param) for param in params)
    return dx, dphi, dalpha, dbias


class _MappingsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, phi, alpha, bias, variant_mhc: bool, iters: int, eps: float):
        lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
        saved, h_pre, h_post, h_res, _ = _mappings_forward(x, phi, alpha, bias, variant_mhc,
                                                           iters, eps)
        ctx.save_for_backward(*saved)
        ctx.meta = (lead, n, c, variant_mhc, iters, (phi.dtype, alpha.dtype, bias.dtype))
        ctx.params = (phi, alpha, bias)
        return h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n)

    @staticmethod
    def backward(ctx, dh_pre, dh_post, dh_res):
        lead, n, c, variant_mhc, iters, param_dtypes = ctx.meta
        saved = ctx.saved_tensors
        t, dev = saved[0].shape[0], saved[0].device
        dx, dphi, dalpha, dbias = _mappings_backward(
            saved, n, variant_mhc, iters, param_dtypes, _grad_f32(dh_pre, (t, n), dev),
            _grad_f32(dh_post, (t, n), dev), _grad_f32(dh_res, (t, n, n), dev),
            params=ctx.params)
        return dx.view(*lead, n, c), dphi, dalpha, dbias, None, None, None


def _check_mapping_args(x, phi, variant: str, name: str) -> None:
    _check(x, name)
    if variant not in ("mhc", "hc"):
        raise ValueError(f"mappings are defined for variant 'mhc' or 'hc', got {variant!r}")
    reference.check_phi_shape(x, phi)


def compute_mappings(x, phi, alpha, bias, variant="mhc", sinkhorn_iters=20, eps=1e-6):
    """Triton ``compute_mappings`` (see ``megatron_mhc.core.ops.reference.compute_mappings``)."""
    _check_mapping_args(x, phi, variant, "compute_mappings")
    return _MappingsFunction.apply(x, phi, alpha, bias, variant == "mhc", int(sinkhorn_iters),
                                   float(eps))
