"""mHC operators: the float64-testable PyTorch reference and the backend-dispatched fused ops.

The reference functions (``sinkhorn``, ``compute_mappings``, ``pre_apply``, ``post_res_merge``,
``expand_streams``, ``merge_streams``) are the oracle for every kernel. ``MHCOps`` is the op-set type every
backend fills (``TORCH_OPS`` here, ``TRITON_OPS`` in ``megatron_mhc.kernels``);
``megatron_mhc.core.backends.get_backend_ops`` picks one.
"""

from megatron_mhc.core.ops.opset import TORCH_OPS, MHCOps
from megatron_mhc.core.ops.reference import (
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

__all__ = [
    "MHCOps",
    "TORCH_OPS",
    "compute_mappings",
    "enter",
    "expand_streams",
    "mappings_from_projection",
    "merge_streams",
    "post_res_merge",
    "pre_apply",
    "project_and_norm",
    "sinkhorn",
]
