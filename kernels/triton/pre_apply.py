"""The pre-apply (``pre_apply``): ``out[t, c] = sum_i h_pre[t, i] x[t, i, c]`` and its backward.

``_pre_apply_dh`` (the dH_pre pass over whole token rows) is also the first half of the entry's
``pre_mappings_bwd_kernel`` (``mappings.py``).
"""

import torch
import triton
import triton.language as tl

from megatron_mhc.kernels.triton._launch import _cdiv, _check, _contig, _f32, _pow2


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
                  WRITE_DX: tl.constexpr, g_ptr=None, WITH_G: tl.constexpr = False):
    """``(dh, dh_res)``: ``dh[t, i] = sum_c x[t, i, c] dout[t, c]`` of tokens ``rows`` ([BT, NP]
    float32), one pass over their whole rows; WRITE_DX: also ``dx[t, i, c] = h[t, i] dout[t, c]``
    (h ``[BT, NP]``). WITH_G (the entry's "dx once" backward): the same pass also sums
    ``dh_res[t, i, j] = sum_c g[t, i, c] x[t, j, c]`` ([BT, NP, NP]; x_j re-read per stream from
    L1, as the merge backward does) from g ``[T, n, C]``; else ``dh_res`` is zeros."""
    ii = tl.arange(0, NP)
    i_ok = ii < N
    dh = tl.zeros([BT, NP], dtype=tl.float32)
    dh_res = tl.zeros([BT, NP, NP], dtype=tl.float32)
    for c0 in range(0, C, BC):
        cs = c0 + tl.arange(0, BC)
        c_ok = cs < C
        mask = row_ok[:, None] & c_ok[None, :]
        m3 = row_ok[:, None, None] & i_ok[None, :, None] & c_ok[None, None, :]
        d = tl.load(dout_ptr + rows[:, None] * C + cs[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        offs = rows[:, None, None] * (N * C) + ii[None, :, None] * C + cs[None, None, :]
        x3 = tl.load(x_ptr + offs, mask=m3, other=0.0).to(tl.float32)
        dh += tl.sum(x3 * d[:, None, :], axis=2)
        if WRITE_DX:
            tl.store(dx_ptr + offs, (h[:, :, None] * d[:, None, :]).to(dx_ptr.dtype.element_ty),
                     mask=m3)
        if WITH_G:
            g3 = tl.load(g_ptr + offs, mask=m3, other=0.0).to(tl.float32)
            for j in tl.static_range(N):
                xj = tl.load(x_ptr + rows[:, None] * (N * C) + j * C + cs[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                col = tl.sum(g3 * xj[:, None, :], axis=2)  # dH_res[:, i, j] over i: [BT, NP]
                dh_res += tl.where((ii == j)[None, None, :], col[:, :, None], 0.0)
    return dh, dh_res


@triton.jit
def pre_apply_bwd_kernel(x_ptr, h_ptr, dout_ptr, dx_ptr, dh_ptr, T, C,
                         N: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                         WRITE_DX: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    ii = tl.arange(0, NP)
    m2 = row_ok[:, None] & (ii < N)[None, :]
    h = tl.load(h_ptr + rows[:, None] * N + ii[None, :], mask=m2, other=0.0)  # [BT, NP]
    dh, _ = _pre_apply_dh(x_ptr, dout_ptr, h, dx_ptr, rows, row_ok, C, N, NP, BT, BC,
                          WRITE_DX)
    tl.store(dh_ptr + rows[:, None] * N + ii[None, :], dh, mask=m2)


class _PreApplyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre):
        lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
        x3 = _contig(x.reshape(-1, n, c))
        h = _f32(h_pre.reshape(-1, n))
        t = x3.shape[0]
        out = torch.empty(t, c, device=x.device, dtype=x.dtype)
        bt, bc = 4, 512
        pre_apply_fwd_kernel[(_cdiv(t, bt), _cdiv(c, bc))](
            x3, h, out, t, c, N=n, BT=bt, BC=bc, num_warps=4)
        ctx.save_for_backward(x3, h)
        ctx.meta = (lead, h_pre.dtype)
        return out.view(*lead, c)

    @staticmethod
    def backward(ctx, dout):
        x3, h = ctx.saved_tensors
        lead, h_dtype = ctx.meta
        t, n, c = x3.shape
        d = _contig(dout.reshape(t, c))
        dx = torch.empty_like(x3)
        dh = torch.empty(t, n, device=x3.device, dtype=torch.float32)
        bt, bc = 2, 512
        pre_apply_bwd_kernel[(_cdiv(t, bt),)](
            x3, h, d, dx, dh, t, c, N=n, NP=_pow2(n), BT=bt, BC=bc, WRITE_DX=True, num_warps=4)
        return dx.view(*lead, n, c), dh.view(*lead, n).to(h_dtype)


def pre_apply(x, h_pre):
    """Triton ``pre_apply`` (see ``megatron_mhc.core.ops.reference.pre_apply``)."""
    _check(x, "pre_apply")
    return _PreApplyFunction.apply(x, h_pre)
