"""Which Megatron-Core 0.19 features run with the mHC layer, and which are refused by name.

The mHC layer does its stream work (expansion, entry mappings, pre-aggregate, post/residual
merge, contraction) in its ``forward()`` and gives Megatron's ``_forward_attention`` /
``_forward_mlp`` only the aggregated C-wide input, with bias-dropout modules that add no
residual. A Megatron-Core caller that runs those sublayer methods (or the MoE pieces) itself,
around ``forward()``, would therefore train a network with neither mHC nor a residual. Every such
caller is listed in ``REFUSED_FEATURES`` and stops twice: at argument validation
(``megatron_mhc.training.hooks.validate_mhc_args``) and at layer construction
(``megatron_mhc.core.layer.check_transformer_config``); and the layer refuses a direct call of
its sublayer methods from outside its ``forward()`` (``MHCLayerMixin``), so a caller this table
missed fails loudly instead of silently.

Callers that go through ``forward()`` (``TransformerBlock``, Megatron's full and selective
activation recompute, ``--mlp-chunks-for-training``, the local CUDA graphs of whole layers, the
static inference engine, HybridModel's attention / MLP / MoE layers) run mHC; README's table
"Which Megatron-Core paths run mHC" lists each with its test.

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


_SKIPS_FORWARD = ("its schedule calls the layer's attention and MoE pieces itself, around the "
                  "layer's forward(), so the mHC streams and merges would be skipped and the "
                  "model would train without mHC and without a residual")

#: Megatron-Core 0.19 features refused with ``--enable-mhc`` (any variant: the residual ablation
#: runs through the same layer). An attribute is "on" when truthy.
REFUSED_FEATURES: Tuple[RefusedFeature, ...] = (
    RefusedFeature(("overlap_moe_expert_parallel_comm",), "--overlap-moe-expert-parallel-comm",
                   _SKIPS_FORWARD),
    RefusedFeature(("delay_wgrad_compute",), "--delay-wgrad-compute",
                   "the delayed weight gradients belong to the expert-parallel overlap schedule, "
                   "which skips the mHC forward()"),
    RefusedFeature(("ep_overlap_early_attn_memory_release",),
                   "--ep-overlap-early-attn-memory-release",
                   "it is part of the expert-parallel overlap schedule, which skips the mHC "
                   "forward()"),
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
    return problems
