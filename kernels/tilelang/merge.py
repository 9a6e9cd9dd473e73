"""The post/residual merge on DeepSeek's TileKernels (``tile-kernels``): its TileLang kernels for
the forward and backward. TileKernels' merge computes ``out = comb^T @ residual + post * x``: it is
given ``comb = H_res^T``.
"""

from __future__ import annotations

import torch


def _tile_kernels_mhc():
    from tile_kernels import mhc

    return mhc


def _check(x: torch.Tensor, c: int) -> None:
    if x.dtype != torch.bfloat16:
        raise TypeError(
            f"--mhc-kernel-backend tilelang: TileKernels' merge takes bfloat16 only, got {x.dtype}; "
            "use --mhc-kernel-backend triton"
        )
    if c % 128:
        raise ValueError(
            f"--mhc-kernel-backend tilelang: TileKernels' merge needs a hidden size that is a "
            f"multiple of 128, got {c}; use --mhc-kernel-backend triton"
        )


class _PostResTileKernels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, h_post, h_res):
        lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
        t = x.numel() // (n * c)
        residual = x.reshape(1, t, n, c).contiguous()
        y3 = y.reshape(1, t, c).contiguous()
        post = h_post.reshape(1, t, n, 1).to(torch.float32).contiguous()
        comb = h_res.reshape(1, t, n, n).to(torch.float32).transpose(-1, -2).contiguous()
        out = _tile_kernels_mhc().mhc_post_fwd(y3, residual, post, comb)
        ctx.save_for_backward(residual, y3, post, comb)
        ctx.meta = (lead, n, c, h_post.dtype, h_res.dtype)
        return out.view(*lead, n, c)

    @staticmethod
    def backward(ctx, dout):
        residual, y3, post, comb = ctx.saved_tensors
        lead, n, c, hp_dtype, hr_dtype = ctx.meta
        t = residual.shape[1]
        d_y, d_x, d_post, d_comb = _tile_kernels_mhc().mhc_post_bwd(
            y3, residual, post, comb, dout.reshape(1, t, n, c).contiguous())
        d_res = d_comb.reshape(t, n, n).transpose(-1, -2)
        return (d_x.view(*lead, n, c), d_y.view(*lead, c),
                d_post.reshape(*lead, n).to(hp_dtype), d_res.reshape(*lead, n, n).to(hr_dtype))


def post_res_merge(x, y, h_post, h_res):
    """TileKernels ``post_res_merge`` (see ``megatron_mhc.core.ops.reference.post_res_merge``)."""
    _check(x, x.shape[-1])
    return _PostResTileKernels.apply(x, y.to(x.dtype), h_post, h_res)
