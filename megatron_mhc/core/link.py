"""A linked entry/merge pair for op sets that have none (the PyTorch reference set).

Megatron-Core's expert-parallel overlap schedule runs one MLP sublayer in several schedule nodes,
each with its own autograd graph: the entry (mappings + pre-aggregate, before the router) in the
``pre_dispatch_computation`` node and the merge ``H_res x + H_post^T y`` in ``moe_combine``.
A node's backward must not reach into another node's graph, so only tensors the schedule detaches
itself may cross: the stream ``x`` does (it is the layer's residual), but ``H_post`` and ``H_res``
are not tensors Megatron knows about. The kernel sets' linked pair (``enter_linked`` /
``merge_linked``) already sends the merge's dH_post / dH_res to the entry's backward through a
``SublayerLink`` instead of autograd; this module gives any op set the same contract:

* ``GenericLink.enter(ops_enter, x, ...)`` runs the set's ``enter`` and returns, besides its
  outputs, ``x_link``: ``x`` through an identity function whose backward also hands the mappings'
  gradients, left in the link by the merge, to their producers;
* ``GenericLink.merge(ops_merge, x_link, y, h_post, h_res)`` merges with ``H_post`` / ``H_res``
  cut from the entry's graph (fresh leaves) and ``x_link`` passed through the function that
  collects their gradients: its backward leaves them in the link and hands the stream's gradient
  on to ``x_link``.

The collector sits on the stream's own path (merge -> collector -> ``x_link`` -> entry), so its
backward runs before the entry's by data dependency, in one graph and across schedule nodes, and
also under ``torch.autograd.grad(..., inputs=...)`` (which runs only the nodes leading to the
named inputs, as the local CUDA-graph capture does). Values are those of the plain composition.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor


class GenericLink:
    """The mappings' gradients on their way from the merge's backward to the entry's."""

    __slots__ = ("dh_post", "dh_res", "merged", "stream")

    def __init__(self):
        self.dh_post: Optional[Tensor] = None
        self.dh_res: Optional[Tensor] = None
        #: Whether a merge was built on this link (its backward then owes the gradients).
        self.merged = False
        #: The CUDA stream the merge's backward ran on (None on CPU).
        self.stream = None

    def enter(self, ops_enter: Callable, x: Tensor, *args) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``ops_enter(x, *args) -> (agg, h_post, h_res)`` plus ``x_link`` for ``merge``."""
        agg, h_post, h_res = ops_enter(x, *args)
        x_link = _ReceiveMappingGrads.apply(x, h_post, h_res, self)
        return agg, h_post, h_res, x_link

    def merge(self, ops_merge: Callable, x_link: Tensor, y: Tensor, h_post: Tensor,
              h_res: Tensor) -> Tensor:
        """``ops_merge(x_link, y, H_post, H_res)`` whose mapping gradients go to the link."""
        self.merged = True
        x_link, h_post, h_res = _SendMappingGrads.apply(
            x_link, h_post.detach().requires_grad_(), h_res.detach().requires_grad_(), self)
        return ops_merge(x_link, y, h_post, h_res)


class _SendMappingGrads(torch.autograd.Function):
    """Identity on ``(x_link, H_post, H_res)`` (the mappings detached); the backward stores the
    mappings' gradients in the link and passes the stream's gradient on."""

    @staticmethod
    def forward(ctx, x_link, h_post, h_res, link):
        ctx.set_materialize_grads(False)
        ctx.link = link
        return x_link.view_as(x_link), h_post.view_as(h_post), h_res.view_as(h_res)

    @staticmethod
    def backward(ctx, dx, dh_post, dh_res):
        link = ctx.link
        if dh_post is not None:
            link.dh_post = dh_post if link.dh_post is None else link.dh_post + dh_post
            link.stream = torch.cuda.current_stream(dh_post.device) if dh_post.is_cuda else None
        if dh_res is not None:
            link.dh_res = dh_res if link.dh_res is None else link.dh_res + dh_res
        return dx, None, None, None


class _ReceiveMappingGrads(torch.autograd.Function):
    """Identity on the stream ``x``; the backward also returns the gradients the merge left for
    ``H_post`` / ``H_res`` (so the entry's graph receives them as if the merge had used them)."""

    @staticmethod
    def forward(ctx, x, h_post, h_res, link):
        ctx.set_materialize_grads(False)
        ctx.link = link
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx):
        link = ctx.link
        if link.merged and link.dh_post is None and link.dh_res is None:
            raise RuntimeError(
                "mHC: the entry's backward ran before its merge's backward had sent the "
                "mappings' gradients (a schedule that runs the entry and merge backward out of "
                "order); refusing to drop dH_post / dH_res")
        dh_post, dh_res = link.dh_post, link.dh_res
        if link.stream is not None and dh_post is not None:
            # Made on the merge's stream (the EP-overlap schedule's communication stream),
            # consumed here: keep their memory until this stream is done with them.
            current = torch.cuda.current_stream(dh_post.device)
            if current != link.stream:
                for grad in (dh_post, dh_res):
                    if grad is not None:
                        grad.record_stream(current)
        link.dh_post = link.dh_res = link.stream = None
        return dx, dh_post, dh_res, None
