"""Layer specs: Megatron's own GPT layer specs with the mHC layer and the residual-free BDA."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mhc.backends import transformer_engine_availability
from megatron_mhc.config import MHCConfig
from megatron_mhc.layer import MHCTransformerLayer, get_bias_dropout


def with_mhc(
    layer_spec: ModuleSpec, mhc_config: Optional[MHCConfig] = None, layer_class=None
) -> ModuleSpec:
    """Turn a Megatron ``TransformerLayer`` spec into the mHC layer spec.

    Keeps every submodule of ``layer_spec`` (norms, attention, MLP or MoE) and replaces the layer
    class and the two bias-dropout-add modules.
    """
    submodules = dataclasses.replace(
        layer_spec.submodules, self_attn_bda=get_bias_dropout, mlp_bda=get_bias_dropout
    )
    params = dict(layer_spec.params or {})
    params["mhc_config"] = mhc_config if mhc_config is not None else MHCConfig()
    return ModuleSpec(
        module=layer_class if layer_class is not None else MHCTransformerLayer,
        submodules=submodules,
        params=params,
    )


def get_gpt_layer_with_mhc_spec(
    mhc_config: Optional[MHCConfig] = None, use_transformer_engine: bool = False, **spec_kwargs
) -> ModuleSpec:
    """The GPT layer spec with mHC, on the local or the Transformer-Engine implementation.

    ``spec_kwargs`` go to Megatron's ``get_gpt_layer_local_spec`` (e.g. ``normalization``,
    ``qk_layernorm``) or ``get_gpt_layer_with_transformer_engine_spec``.
    """
    if use_transformer_engine:
        availability = transformer_engine_availability()
        if not availability.available:
            raise RuntimeError(
                "get_gpt_layer_with_mhc_spec(use_transformer_engine=True) needs Transformer-Engine: "
                f"{availability.reason}. Install it or use the local spec "
                "(use_transformer_engine=False, i.e. --transformer-impl local)."
            )
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        base = get_gpt_layer_with_transformer_engine_spec(**spec_kwargs)
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        base = get_gpt_layer_local_spec(**spec_kwargs)
    return with_mhc(base, mhc_config)
