"""``MHCOps``: the op set of one kernel backend, behind the same calls; ``TORCH_OPS`` is the
PyTorch reference set. Kernel packages build their own ``MHCOps``; choosing one is
``megatron_mhc.core.backends.get_backend_ops``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from megatron_mhc.core.ops import reference

#: Set True by the layer on phi / alpha / bias under Megatron's ``gradient_accumulation_fusion``:
#: a backend may then add their gradients to DDP's ``main_grad`` itself (and set
#: ``grad_added_to_main_grad``) instead of returning them, as Transformer-Engine does for weights.
FUSE_GRAD_ACCUMULATION_ATTR = "mhc_fuse_grad_accumulation"


@dataclass(frozen=True)
class MHCOps:
    """The mHC operations of one backend (signatures as in ``megatron_mhc.core.ops.reference``)."""

    name: str
    compute_mappings: Callable
    enter: Callable
    pre_apply: Callable
    post_res_merge: Callable
    expand_streams: Callable
    merge_streams: Callable
    #: Optional linked pair (``enter_linked(x, ...) -> (agg, h_post, h_res, x_link, link)``,
    #: ``merge_linked(x_link, y, h_post, h_res, link)``): the same values as ``enter`` and
    #: ``post_res_merge``, with one backward pass writing the stream's whole dx. Without it the
    #: layer composes ``enter`` and ``post_res_merge`` (autograd adds their two dx).
    enter_linked: Optional[Callable] = None
    merge_linked: Optional[Callable] = None
    #: Optional cross-sublayer fusion (needs the linked pair): ``merge_linked_project(x_link, y,
    #: h_post, h_res, link, next_phi) -> (out, projection)`` is ``merge_linked`` whose pass over
    #: the new stream also makes the next sublayer's norm/projection partials; the next entry
    #: takes them as ``enter_linked(out, next_phi, ..., projection=projection)`` and does not
    #: read the stream for them. Without it each entry projects its own stream.
    merge_linked_project: Optional[Callable] = None
    #: Optional ``merge_into(x, y, h_post, h_res, out) -> out``: ``post_res_merge``'s value
    #: (bit for bit) written into ``out``, which may be ``x`` itself; no autograd. The mHC
    #: recompute rebuilds a chain of streams in one buffer with it. Without it every rebuilt
    #: stream is a new tensor.
    merge_into: Optional[Callable] = None


TORCH_OPS = MHCOps(
    name="torch",
    compute_mappings=reference.compute_mappings,
    enter=reference.enter,
    pre_apply=reference.pre_apply,
    post_res_merge=reference.post_res_merge,
    expand_streams=reference.expand_streams,
    merge_streams=reference.merge_streams,
)
