"""The fused entry op of a sublayer (``enter``: mappings + pre-apply) and the linked pair's entry
(``enter_linked`` with its ``SublayerLink`` to ``merge.py``'s ``merge_linked``).

Its kernels are the mapping kernels with the pre-apply folded in (``mappings.py``:
``mappings_fwd_kernel`` with ``WITH_PRE``, ``pre_mappings_bwd_kernel``) and the projection's two
directions (``projection.py``); this module wires them into autograd.
"""

from __future__ import annotations

import torch

from megatron_mhc.kernels.triton._launch import _contig, _grad_f32
from megatron_mhc.kernels.triton.mappings import (
    _check_mapping_args,
    _mappings_backward,
    _mappings_forward,
)
from megatron_mhc.kernels.triton.projection import _check_projection


class SublayerLink:
    """What the linked merge's backward hands to the entry's backward of the same sublayer.

    The merge backward runs first (it consumes the entry's outputs) and leaves here its dx of the
    stream (which the entry's dx pass then adds in place, so no separate dx add runs) and its
    per-C-block partials of dH_post / dH_res (which the mapping backward sums, so no reduction
    kernels run). The entry backward takes them and clears the link.
    """

    __slots__ = ("dx", "dh_post_part", "dh_res_part", "stream", "g", "h_res")

    def __init__(self):
        self.clear()

    def clear(self):
        self.dx = self.dh_post_part = self.dh_res_part = self.stream = None
        self.g = self.h_res = None  # the "dx once" backward: the merge's upstream grad, H_res


def _entry_forward(ctx, x, phi, alpha, bias, variant_mhc, iters, eps, projection=None):
    lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    saved, h_pre, h_post, h_res, agg = _mappings_forward(
        x, phi, alpha, bias, variant_mhc, iters, eps, with_pre=True, projection=projection)
    ctx.save_for_backward(*saved, h_pre)
    ctx.meta = (lead, n, c, variant_mhc, iters, (phi.dtype, alpha.dtype, bias.dtype))
    ctx.params = (phi, alpha, bias)
    return agg.view(*lead, c), h_post.view(*lead, n), h_res.view(*lead, n, n)


def _entry_backward(ctx, d_agg, dh_post, dh_res, link=None, d_stream=None):
    lead, n, c, variant_mhc, iters, param_dtypes = ctx.meta
    *saved, h_pre = ctx.saved_tensors
    x2 = saved[0]
    t, dev = x2.shape[0], x2.device
    if d_agg is None:
        d_agg = torch.zeros(t, c, device=dev, dtype=x2.dtype)
    d_agg = _contig(d_agg.reshape(t, c))
    dh_pre = None  # summed in the mapping backward's launch (pre_mappings_bwd_kernel)
    cb, dx_out = 1, None
    dx_add = None if d_stream is None else _contig(d_stream.reshape(t, n * c))
    g = h_res = None
    if link is not None and link.dh_post_part is not None:
        g, h_res = link.g, link.h_res
        if link.stream is not None and link.stream != torch.cuda.current_stream(dev):
            for buf in (link.dx, link.dh_post_part, link.dh_res_part, g, h_res):
                if buf is not None:
                    buf.record_stream(torch.cuda.current_stream(dev))
        hp_part, hr_part, cb = link.dh_post_part, link.dh_res_part, link.dh_post_part.shape[1]
        if dh_post is not None or dh_res is not None:  # H_post / H_res used elsewhere too
            hp_part = hp_part.sum(1, keepdim=True) + _grad_f32(dh_post, (t, 1, n), dev)
            hr_extra = _grad_f32(dh_res, (t, 1, n, n), dev)
            hr_part = hr_extra if hr_part is None else hr_part.sum(1, keepdim=True) + hr_extra
            cb = 1
        dh_post, dh_res = hp_part, hr_part
        # The merge's own fresh buffer comes back unchanged: dx is written over it in place.
        if (link.dx is not None and dx_add is not None
                and dx_add.data_ptr() == link.dx.data_ptr() and dx_add.dtype == x2.dtype):
            dx_out = dx_add
        link.clear()
        if g is not None:
            g = g.reshape(t, n * c)
    else:
        dh_post = _grad_f32(dh_post, (t, n), dev)
        dh_res = _grad_f32(dh_res, (t, n, n), dev)
    dx, dphi, dalpha, dbias = _mappings_backward(
        saved, n, variant_mhc, iters, param_dtypes, dh_pre, dh_post, dh_res, cb=cb,
        d_agg=d_agg, h_pre=h_pre, dx_add=dx_add, dx_out=dx_out, params=ctx.params,
        g=g, h_res=h_res)
    return dx.view(*lead, n, c), dphi, dalpha, dbias


class _EntryFunction(torch.autograd.Function):
    """Mappings + pre-apply of one sublayer: (x, phi, alpha, bias) -> (agg, H_post, H_res).

    Forward: the projection pass, then one kernel for the mappings and the pre-apply. Backward:
    one kernel for dH_pre (a pass over x and d_agg) and the per-token mapping backward, and one
    pass that writes the whole dx (projection, norm and pre-apply terms) and the parameter grads
    (its last program per channel block sums the dphi partials).
    """

    @staticmethod
    def forward(ctx, x, phi, alpha, bias, variant_mhc: bool, iters: int, eps: float):
        return _entry_forward(ctx, x, phi, alpha, bias, variant_mhc, iters, eps)

    @staticmethod
    def backward(ctx, d_agg, dh_post, dh_res):
        return (*_entry_backward(ctx, d_agg, dh_post, dh_res), None, None, None)


class _LinkedEntryFunction(torch.autograd.Function):
    """The entry op of a linked pair: also returns ``x`` itself (``x_link``), which the linked
    merge takes as its stream input. Its dx therefore arrives here as the gradient of ``x_link``
    and is added in the dx pass, and the dH partials arrive through the ``SublayerLink``."""

    @staticmethod
    def forward(ctx, x, phi, alpha, bias, variant_mhc: bool, iters: int, eps: float, link,
                projection):
        ctx.set_materialize_grads(False)
        ctx.link = link
        agg, h_post, h_res = _entry_forward(ctx, x, phi, alpha, bias, variant_mhc, iters, eps,
                                            projection)
        return agg, h_post, h_res, x

    @staticmethod
    def backward(ctx, d_agg, dh_post, dh_res, d_stream):
        grads = _entry_backward(ctx, d_agg, dh_post, dh_res, link=ctx.link, d_stream=d_stream)
        return (*grads, None, None, None, None, None)


def enter(x, phi, alpha, bias, variant="mhc", sinkhorn_iters=20, eps=1e-6):
    """Triton fused ``(pre_apply(x, H_pre), H_post, H_res)`` of one sublayer (see
    ``megatron_mhc.core.ops.reference.enter``)."""
    _check_mapping_args(x, phi, variant, "enter")
    return _EntryFunction.apply(x, phi, alpha, bias, variant == "mhc", int(sinkhorn_iters),
                                float(eps))


def enter_linked(x, phi, alpha, bias, variant="mhc", sinkhorn_iters=20, eps=1e-6,
                 projection=None):
    """``enter`` plus ``(x_link, link)`` for ``merge_linked``: the pair's backward writes the
    stream's whole dx once (entry + merge terms) with no autograd add and no dH reductions.
    ``x_link`` is ``x`` (an alias); pass it, not ``x``, to ``merge_linked``. ``projection``: the
    ``StreamProjection`` that ``merge_linked_project`` made of ``x`` with this ``phi`` (then x is
    not read for the norm and projection)."""
    _check_mapping_args(x, phi, variant, "enter_linked")
    if projection is not None:
        _check_projection(projection, x, phi)
    link = SublayerLink()
    agg, h_post, h_res, x_link = _LinkedEntryFunction.apply(
        x, phi, alpha, bias, variant == "mhc", int(sinkhorn_iters), float(eps), link, projection)
    return agg, h_post, h_res, x_link, link
