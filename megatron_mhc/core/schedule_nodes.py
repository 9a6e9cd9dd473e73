"""The MLP merge of an mHC MoE layer as a node of its own in Megatron-Core's EP-overlap schedule.

Megatron-Core 0.19's combined-1F1B schedule (``--overlap-moe-expert-parallel-comm``) runs each
layer as schedule nodes, each with its own autograd graph: ``pre_dispatch_computation``
(attention, pre-MLP norm, router) and ``mlp`` on the compute stream, ``moe_dispatch`` and
``moe_combine`` (the all-to-alls) on the communication stream, and a fifth slot,
``mtp_post_process``, which only multi-token-prediction layers fill. Megatron's combine node also
runs the layer's ``mlp_bda`` after the all-to-all, on the communication stream; for an mHC layer
that is the MLP merge (and, in the model's last layer, the contraction of the streams).

``add_mhc_post_node`` moves that merge into a node of its own, ``mhc_post``, in the layer's fifth
slot (empty for a decoder layer):

* the combine node runs the all-to-all and the bias/dropout of ``mlp_bda`` and leaves the merge
  (``MHCLayerMixin.deferred_mlp_merge``); its output is the MLP output, C wide;
* the ``mhc_post`` node runs the merge, the contraction in the model's last layer and the
  decoder's final norm in the chunk's last layer: on the compute stream, or on the high-priority
  stream (``megatron_mhc.core.overlap``) with ``--mhc-overlap``;
* in ``TransformerLayerSchedulePlan.run`` the slot's forward comes after the combine forward and
  after the other micro-batch's attention backward (the compute stream does not wait for the
  combine all-to-all before that backward), its backward first, before the combine backward.

So the communication stream carries only communication, and the merge's tensors (including the
streams the mHC recompute rebuilds in its backward) are made and used on one compute stream.

Two ways in: the patch set calls ``add_mhc_post_node`` at the end of
``TransformerLayerSchedulePlan._build_callable_nodes``; for an unpatched tree
``hook_schedule_plans`` wraps that method at run time (the launcher does). Without either, the
merge stays in Megatron's combine node: the same numbers, on the communication stream.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from megatron_mhc.core.overlap import high_priority_stream

#: The schedule node's name (Megatron's memory policy treats unknown names as "keep the input").
MHC_POST_NODE = "mhc_post"


def _merge_stream(layer, comp_stream: Callable[[], Any]) -> Callable[[], Any]:
    """The stream the ``mhc_post`` node runs on: the high-priority stream with ``--mhc-overlap``,
    else the plan's compute stream (both as a function, resolved on first use like Megatron's)."""
    if layer.mhc_config.overlap:
        return lambda: high_priority_stream(torch.device("cuda", torch.cuda.current_device()))
    return comp_stream


def add_mhc_post_node(plan, event, comp_stream, extra_args: dict) -> bool:
    """Give the schedule plan of an mHC MoE layer its MLP merge as the ``mhc_post`` node (the
    plan's fifth slot); a no-op (False) for any other layer. ``event``, ``comp_stream`` and
    ``extra_args`` are those ``_build_callable_nodes`` built the plan's other nodes with."""
    # Imported here: the patched model_chunk_schedule_plan.py imports this module while
    # megatron.core is still importing.
    from megatron.core.models.common.utils import TransformerLayerNode
    from megatron.core.pipeline_parallel.utils import NoopScheduleNode
    from megatron.core.utils import make_viewless_tensor

    from megatron_mhc.core.layer import MHCLayerMixin

    layer = plan.layer
    if (not isinstance(layer, MHCLayerMixin) or layer.mlp_hc is None
            or isinstance(plan.moe_combine, NoopScheduleNode)):
        return False  # a plain or residual layer, or a dense one (its mlp node merges)
    if not isinstance(plan.mtp_post_process, NoopScheduleNode):
        raise RuntimeError(f"mHC layer {layer.layer_number}: its schedule plan's fifth slot "
                           "(mtp_post_process) is taken; mHC layers are not MTP layers")

    combine = plan.moe_combine.submodule

    def combine_leaving_the_merge(node, *args):
        with layer.deferred_mlp_merge():
            return combine(node, *args)

    plan.moe_combine.submodule = combine_leaving_the_merge
    # The decoder's final norm follows the merge (and contraction), so it moves with it.
    plan.moe_combine.is_last_layer = False

    def mhc_post(node, mlp_output):
        hidden_states = layer.run_deferred_mlp_merge(mlp_output)
        final_norm = getattr(node.chunk_state.model.decoder, "final_layernorm", None)
        if not node.is_mtp and final_norm is not None and node.is_last_layer:
            hidden_states = final_norm(hidden_states)
        out = make_viewless_tensor(hidden_states, requires_grad=True, keep_graph=True)
        if out.is_cuda and layer.mhc_config.overlap:
            # Made on the high-priority stream, read by the next node on the compute stream.
            out.record_stream(comp_stream() if callable(comp_stream) else comp_stream)
        return out

    plan.mtp_post_process = TransformerLayerNode(
        _merge_stream(layer, comp_stream), event, plan.layer_state, plan.chunk_state, mhc_post,
        name=MHC_POST_NODE, extra_args=extra_args)
    return True


def schedule_plans_are_hooked() -> bool:
    """True when ``TransformerLayerSchedulePlan`` adds the ``mhc_post`` node: the patch set is
    applied to the running tree, or ``hook_schedule_plans`` ran."""
    try:
        from megatron.core.models.common import model_chunk_schedule_plan as module
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return False
    return (getattr(module, "_mhc_add_schedule_nodes", None) is add_mhc_post_node
            or getattr(module.TransformerLayerSchedulePlan._build_callable_nodes,
                       "_mhc_wrapped", False))


def hook_schedule_plans() -> bool:
    """Wrap ``TransformerLayerSchedulePlan._build_callable_nodes`` so that it calls
    ``add_mhc_post_node``: the run-time form of the patch set's hunk, for an unpatched tree.
    Idempotent; False when the tree already does it."""
    if schedule_plans_are_hooked():
        return False
    from megatron.core.models.common.model_chunk_schedule_plan import TransformerLayerSchedulePlan

    build = TransformerLayerSchedulePlan._build_callable_nodes

    @functools.wraps(build)
    def build_callable_nodes(self, event, comp_stream, comm_stream, extra_args):
        build(self, event, comp_stream, comm_stream, extra_args)
        add_mhc_post_node(self, event, comp_stream, extra_args)

    build_callable_nodes._mhc_wrapped = True
    TransformerLayerSchedulePlan._build_callable_nodes = build_callable_nodes
    return True
