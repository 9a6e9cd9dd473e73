"""Autograd-wired Triton mHC ops with the reference ops' signatures (``TRITON_OPS``).

Each op is one ``torch.autograd.Function`` whose forward and backward are fused Triton kernels;
every one is tested against ``megatron_mhc.core.ops.reference`` in float64 terms under
``TRITON_INTERPRET=1`` on CPU. Stream expand/merge stay on PyTorch (a single copy kernel and a
single reduction kernel each, already at copy bandwidth).

One module per op, its kernels beside its autograd wiring:

============== ===========================================================================
module         what it holds
============== ===========================================================================
``projection`` norm + projection of the stream: split-K partials forward, the dx/dphi pass
               and the parameter-grad reduction backward; ``StreamProjection``,
               ``project_stream``, ``projection_plan``, ``dx_pass_splits``,
               ``BACKWARD_DOT_OPERANDS`` (``MHC_BACKWARD_DOT_OPERANDS``)
``mappings``   gates + Sinkhorn per token, forward and backward (also the entry's variants
               with the pre-apply folded in); ``compute_mappings``, the mapping tiles
``entry``      ``enter``, ``enter_linked``, ``SublayerLink`` (autograd only: its kernels are
               those of ``projection`` and ``mappings``)
``pre_apply``  ``pre_apply``
``merge``      ``post_res_merge``, ``merge_linked``, ``merge_linked_project``, ``merge_into``,
               ``merge_tile``
``_launch``    shared: dtype rules, launch arithmetic, ``_dot_acc``
============== ===========================================================================

The public names are re-exported here. A module-level setting is read where it is defined:
change ``BACKWARD_DOT_OPERANDS`` on ``megatron_mhc.kernels.triton.projection``, not here.
"""

from megatron_mhc.core.ops import reference
from megatron_mhc.core.ops.opset import MHCOps
from megatron_mhc.kernels.triton._launch import _env_switch
from megatron_mhc.kernels.triton.entry import SublayerLink, enter, enter_linked
from megatron_mhc.kernels.triton.mappings import (
    MAPPINGS_BWD_TILE,
    MAPPINGS_FWD_TILE,
    MAPPINGS_PRE_BLOCK,
    PRE_MAPPINGS_BWD_TILE,
    compute_mappings,
)
from megatron_mhc.kernels.triton.merge import (
    merge_into,
    merge_linked,
    merge_linked_project,
    merge_tile,
    post_res_merge,
)
from megatron_mhc.kernels.triton.pre_apply import pre_apply
from megatron_mhc.kernels.triton.projection import (
    PROJECTION_SMALL_GRID,
    StreamProjection,
    dx_pass_splits,
    project_stream,
    projection_plan,
)

__all__ = [
    "CROSS_SUBLAYER_FUSION", "MAPPINGS_BWD_TILE", "MAPPINGS_FWD_TILE", "MAPPINGS_PRE_BLOCK",
    "PRE_MAPPINGS_BWD_TILE", "PROJECTION_SMALL_GRID", "StreamProjection", "SublayerLink",
    "TRITON_OPS", "compute_mappings", "dx_pass_splits", "enter", "enter_linked", "merge_into",
    "merge_linked", "merge_linked_project", "merge_tile", "post_res_merge", "pre_apply",
    "project_stream", "projection_plan",
]

#: Cross-sublayer fusion in the layer (``MHC_CROSS_SUBLAYER_FUSION=1``): off by default. Its
#: Triton merge + projection kernel is slower than the merge and projection kernels it replaces
#: (H100, T = 8192, C = 4096: 640 us against 318 us for the two, one run); on Hopper the CUDA
#: kernel (``kernels/cuda/merge_project.cu``) takes its place and is faster than the two (293 us;
#: C = 7168: 475 against 547 us). End to end with it the fusion is no faster: TE block C = 4096
#: +13.6 % vs +13.7 %, the graphed 12-layer C = 768 example ~1 % slower (benchmarks/RESULTS.md),
#: so the default stays. The ops themselves are always available here (``merge_linked_project``,
#: ``enter_linked(..., projection=...)``).
CROSS_SUBLAYER_FUSION = _env_switch("MHC_CROSS_SUBLAYER_FUSION")

TRITON_OPS = MHCOps(
    name="triton",
    compute_mappings=compute_mappings,
    enter=enter,
    pre_apply=pre_apply,
    post_res_merge=post_res_merge,
    expand_streams=reference.expand_streams,
    merge_streams=reference.merge_streams,
    enter_linked=enter_linked,
    merge_linked=merge_linked,
    merge_linked_project=merge_linked_project if CROSS_SUBLAYER_FUSION == "1" else None,
    merge_into=merge_into,
)
