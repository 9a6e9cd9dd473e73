"""Which Megatron-Core 0.19 features run with the mHC layer, and which are refused by name.

The mHC layer does its stream work inside Megatron's own sublayer methods (``_forward_attention``;
the pre-MLP norm and ``mlp_bda`` for the MLP side; ``megatron_mhc.core.layer``), so callers that
run those methods or the MoE pieces themselves run mHC too: ``TransformerBlock``, Megatron's full
and selective activation recompute, ``--mlp-chunks-for-training``, the local CUDA graphs of whole
layers, the static inference engine, HybridModel's attention / MLP / MoE layers, and the
expert-parallel overlap schedule (``--overlap-moe-expert-parallel-comm``, with
``--ep-overlap-early-attn-memory-release`` and ``--delay-wgrad-compute``: Transformer-Engine's
weight gradients deferred to the schedule's ``backward_dw`` calls, run on a GPU in
``tests/test_ep_overlap.py``; not together with Transformer-Engine's CUDA graphs, not run).
README's table "Which Megatron-Core paths run mHC" lists each with its test.

A feature that was not run with mHC, or that cannot be, is listed in ``REFUSED_FEATURES`` (or
checked in ``refused_feature_problems``) and stops twice, with its flag named: at argument
validation (``megatron_mhc.training.hooks.validate_mhc_args``) and at layer construction
(``megatron_mhc.core.layer.check_transformer_config``).

Multi-token prediction (``--mtp-num-layers``) runs with mHC as Megatron builds it: the MTP block
takes the decoder's output, which the last mHC layer has merged back to C wide (the contraction of
the n streams that the output head sees too), and its layers are Megatron's plain layers built from
Megatron's own layer spec. An mHC layer built inside an MTP block (``is_mtp_layer``) is refused
(``MHCLayerMixin``): it would widen the MTP block's C-wide hidden state to n streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Tuple

from megatron_mhc.core.config import MHCConfig, cuda_graph_problems


@dataclass(frozen=True)
class RefusedFeature:
    """A Megatron feature the mHC layer cannot run under, read from args or a TransformerConfig."""

    attributes: Tuple[str, ...]  # the args / TransformerConfig attributes that switch it on
    flag: str  # the Megatron-LM command-line flag
    reason: str  # why, in a user's words


#: Megatron-Core 0.19 features refused with ``--enable-mhc`` (any variant: the residual ablation
#: runs through the same layer). An attribute is "on" when truthy.
REFUSED_FEATURES: Tuple[RefusedFeature, ...] = (
    RefusedFeature(("inference_fuse_tp_communication",), "--inference-fuse-tp-communication",
                   "the fused kernels add the residual inside the attention / MLP projections"),
    RefusedFeature(("fine_grained_activation_offloading",), "--fine-grained-activation-offloading",
                   "it offloads the norm inputs and frees the residual inside the sublayer "
                   "methods, where the mHC layer holds the aggregate; not run with mHC"),
    RefusedFeature(("cpu_offloading", "cpu_offloading_num_layers"), "--cpu-offloading-num-layers",
                   "it offloads saved activations through saved-tensor hooks, which the mHC "
                   "recompute installs too; not run with mHC"),
    RefusedFeature(("fp32_residual_connection",), "--fp32-residual-connection",
                   "the mHC streams keep the embedding's dtype and the merge mixes the residual; "
                   "an fp32 residual was not run with mHC"),
    RefusedFeature(("use_megatron_fsdp",), "--use-megatron-fsdp",
                   "not run with mHC (Megatron's DDP and distributed optimizer are)"),
    RefusedFeature(("use_torch_fsdp2",), "--use-torch-fsdp2",
                   "not run with mHC (Megatron's DDP and distributed optimizer are)"),
    RefusedFeature(("overlap_dispatch_backward_with_experts_wgrad",),
                   "--overlap-dispatch-backward-with-experts-wgrad",
                   "it defers the experts' weight gradients inside the MoE layer (needs "
                   "Transformer-Engine); not run with mHC"),
)


def refused_feature_problems(source: Any, mhc_config: MHCConfig) -> List[str]:
    """Why the Megatron features switched on in ``source`` (Megatron's parsed args or a
    ``TransformerConfig``) cannot run with mHC: one message per feature, naming its flag;
    empty when every feature present can run."""
    problems = list(cuda_graph_problems(getattr(source, "cuda_graph_impl", "none"), mhc_config,
                                        getattr(source, "cuda_graph_modules", None)))
    for feature in REFUSED_FEATURES:
        if any(getattr(source, name, None) for name in feature.attributes):
            problems.append(f"{feature.flag} is not supported with mHC: {feature.reason}")
    if (getattr(source, "delay_wgrad_compute", False)
            and getattr(source, "cuda_graph_impl", "none") == "transformer_engine"):
        problems.append(
            "--delay-wgrad-compute with --cuda-graph-impl transformer_engine is not supported "
            "with mHC: Megatron then replays the graphed sublayers' deferred weight gradients "
            "from their own graphs, which has not run with mHC; drop one of the two flags")
    if getattr(source, "overlap_moe_expert_parallel_comm", False) and _recomputes_layernorm(source):
        problems.append(
            "--recompute-modules layernorm with --overlap-moe-expert-parallel-comm is not "
            "supported with mHC: the overlap schedule recomputes the pre-MLP norm module, where "
            "the mHC MLP entry runs, without autograd; drop layernorm from --recompute-modules")
    return problems


def _recomputes_layernorm(source: Any) -> bool:
    return (getattr(source, "recompute_granularity", None) == "selective"
            and "layernorm" in (getattr(source, "recompute_modules", None) or ()))
