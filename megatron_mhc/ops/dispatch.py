"""One op set per kernel backend, behind the same calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_mhc.ops import reference


@dataclass(frozen=True)
class MHCOps:
    """The mHC operations of one backend (signatures as in ``megatron_mhc.ops.reference``)."""

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


def get_backend_ops(name: str) -> MHCOps:
    """The op set of a *resolved* backend name (``torch``, ``triton`` or ``tilelang``).

    Use ``megatron_mhc.backends.resolve_backend`` first to turn ``auto`` into a name and to get a
    clear error for a backend that is not installed.
    """
    if name == "torch":
        return TORCH_OPS
    if name == "triton":
        from megatron_mhc.kernels.triton_ops import TRITON_OPS

        return TRITON_OPS
    if name == "tilelang":
        from megatron_mhc.kernels.tilelang_ops import TILELANG_OPS

        return TILELANG_OPS
    raise ValueError(f"unknown mHC kernel backend {name!r}; allowed: torch, triton, tilelang")
