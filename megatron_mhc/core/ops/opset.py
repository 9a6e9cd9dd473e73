"""``MHCOps``: the op set of one kernel backend, behind the same calls; ``TORCH_OPS`` is the
PyTorch reference set. Kernel packages build their own ``MHCOps``; choosing one is
``megatron_mhc.core.backends.get_backend_ops``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_mhc.core.ops import reference


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


TORCH_OPS = MHCOps(
    name="torch",
    compute_mappings=reference.compute_mappings,
    enter=reference.enter,
    pre_apply=reference.pre_apply,
    post_res_merge=reference.post_res_merge,
    expand_streams=reference.expand_streams,
    merge_streams=reference.merge_streams,
)
