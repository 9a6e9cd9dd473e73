"""mHC operators: the float64-testable PyTorch reference and the backend-dispatched fused ops.

The reference functions (``sinkhorn``, ``compute_mappings``, ``pre_apply``, ``post_res_merge``,
``expand_streams``, ``merge_streams``) are the oracle for every kernel. ``get_backend_ops(name)``
returns the op set the mHC layer calls for a resolved backend name.
"""

from megatron_mhc.ops.reference import (
    compute_mappings,
    enter,
    expand_streams,
    mappings_from_projection,
    merge_streams,
    post_res_merge,
    pre_apply,
    project_and_norm,
    sinkhorn,
)
from megatron_mhc.ops.dispatch import MHCOps, get_backend_ops

__all__ = [
    "MHCOps",
    "compute_mappings",
    "enter",
    "expand_streams",
    "get_backend_ops",
    "mappings_from_projection",
    "merge_streams",
    "post_res_merge",
    "pre_apply",
    "project_and_norm",
    "sinkhorn",
]
