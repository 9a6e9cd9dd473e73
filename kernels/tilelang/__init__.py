"""The ``tilelang`` backend: DeepSeek's TileKernels (``tile-kernels``) where it has the op.

TileKernels ships TileLang kernels for the post/residual merge (forward and backward), which this
backend uses (``merge``); for the fused entry op (mappings + pre-apply, with the Sinkhorn on chip)
TileKernels has no single matching op, so the project's Triton kernels serve it
(``megatron_mhc.kernels.triton``).

============ ==============================================================================
module       what it holds
============ ==============================================================================
``merge``    ``post_res_merge`` on TileKernels' ``mhc_post_fwd`` / ``mhc_post_bwd``
============ ==============================================================================
"""

from megatron_mhc.core.ops import reference
from megatron_mhc.core.ops.opset import MHCOps
from megatron_mhc.kernels import triton as triton_ops
from megatron_mhc.kernels.tilelang.merge import post_res_merge

__all__ = ["TILELANG_OPS", "post_res_merge"]

TILELANG_OPS = MHCOps(
    name="tilelang",
    compute_mappings=triton_ops.compute_mappings,
    enter=triton_ops.enter,
    pre_apply=triton_ops.pre_apply,
    post_res_merge=post_res_merge,
    expand_streams=reference.expand_streams,
    merge_streams=reference.merge_streams,
)
