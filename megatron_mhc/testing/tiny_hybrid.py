"""Small Megatron-Core ``HybridModel``s (attention, MLP and MoE layers) for CPU tests."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mhc.config import MHCConfig
from megatron_mhc.testing.tiny_gpt import CPURMSNorm, TinyGPTSettings, tiny_transformer_config


def tiny_hybrid_stack_spec(num_experts: int = 4) -> ModuleSpec:
    """A ``HybridStack`` spec on Megatron-Core's local modules (no Transformer-Engine): attention
    layers (``*``), dense MLP layers (``-``) and MoE layers (``E``), CPU-friendly RMSNorms."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer

    dense = get_gpt_layer_local_spec(normalization="RMSNorm").submodules
    moe = get_gpt_layer_local_spec(normalization="RMSNorm", num_experts=num_experts).submodules
    attention_only = dict(pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp,
                          input_layernorm=CPURMSNorm)
    mlp_only = dict(input_layernorm=IdentityOp, self_attention=IdentityOp,
                    self_attn_bda=IdentityFuncOp, pre_mlp_layernorm=CPURMSNorm)
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(
            attention_layer=ModuleSpec(TransformerLayer,
                                       submodules=dataclasses.replace(dense, **attention_only)),
            mlp_layer=ModuleSpec(MLPLayer, submodules=dataclasses.replace(dense, **mlp_only)),
            moe_layer=ModuleSpec(MoETransformerLayer,
                                 submodules=dataclasses.replace(moe, **mlp_only)),
        ),
    )


def build_tiny_hybrid(settings: TinyGPTSettings, pattern: str,
                      mhc_config: Optional[MHCConfig] = None):
    """A ``HybridModel`` of ``pattern`` (e.g. ``"*-*E"``); with ``mhc_config`` its transformer
    layers are wrapped by ``with_mhc_any`` as ``megatron-mhc``'s hook does."""
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_mhc.backends import transformer_engine_availability
    from megatron_mhc.specs import with_mhc_any

    if not transformer_engine_availability().available:
        # HybridStack builds its final norm as TENorm (Transformer-Engine only).
        hybrid_block.TENorm = CPURMSNorm
    settings = dataclasses.replace(settings, num_layers=len(pattern),
                                   num_moe_experts=settings.num_moe_experts or 4)
    config = tiny_transformer_config(settings)
    spec = tiny_hybrid_stack_spec(settings.num_moe_experts)
    if mhc_config is not None:
        spec = with_mhc_any(spec, mhc_config)
    return HybridModel(
        config=config,
        hybrid_stack_spec=spec,
        vocab_size=settings.vocab_size,
        max_sequence_length=settings.seq_length,
        hybrid_layer_pattern=pattern,
        position_embedding_type="learned_absolute",
    )
