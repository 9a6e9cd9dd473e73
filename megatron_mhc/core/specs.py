"""Layer specs: Megatron's own GPT layer specs with the mHC layer and the residual-free BDA."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mhc.core.backends import transformer_engine_availability
from megatron_mhc.core.config import MHCConfig
from megatron_mhc.core.layer import MHCLayerMixin, MHCTransformerLayer, get_bias_dropout


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


def _is_layer_spec(spec) -> bool:
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return (
        isinstance(spec, ModuleSpec)
        and isinstance(spec.module, type)
        and issubclass(spec.module, TransformerLayer)
    )


def with_mhc_any(spec: Any, mhc_config: MHCConfig) -> Any:
    """``with_mhc`` over whatever a Megatron builder produces.

    * a ``TransformerLayer`` ``ModuleSpec`` (dense or MoE MLP);
    * a block spec (``TransformerBlockSubmodules``, or a ``ModuleSpec`` of ``TransformerBlock``):
      every layer spec is wrapped, the final norm kept;
    * a ``HybridStack`` spec: its transformer-layer entries (attention, MLA, DSA, MLP, MoE) are
      wrapped; Mamba and gated-delta-net layers are not ``TransformerLayer``s and stay as they are
      (``check_hybrid_pattern`` refuses patterns that use them).

    Anything else raises a ``TypeError`` naming the module.
    """
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
    )

    if _is_layer_spec(spec):
        return with_mhc(spec, mhc_config, layer_class=mhc_layer_class(spec.module))
    if isinstance(spec, TransformerBlockSubmodules):
        return dataclasses.replace(
            spec, layer_specs=[with_mhc_any(s, mhc_config) for s in spec.layer_specs]
        )
    if isinstance(spec, ModuleSpec) and isinstance(spec.module, type):
        if issubclass(spec.module, TransformerBlock):
            return dataclasses.replace(
                spec, submodules=with_mhc_any(spec.submodules, mhc_config)
            )
        hybrid_stack = _hybrid_stack_class()
        if hybrid_stack is not None and issubclass(spec.module, hybrid_stack):
            return dataclasses.replace(
                spec, submodules=_with_mhc_hybrid(spec.submodules, mhc_config)
            )
    name = getattr(getattr(spec, "module", None), "__name__", type(spec).__name__)
    raise TypeError(
        f"--enable-mhc: cannot wrap a {name} spec; mHC wraps Megatron TransformerLayer specs "
        "(GPT dense/MoE layers, transformer blocks, HybridModel attention/MLP/MoE layers)"
    )


#: HybridStack spec fields holding TransformerLayer specs that mHC wraps.
HYBRID_WRAPPED_LAYERS = ("attention_layer", "dsa_layer", "mla_layer", "mlp_layer", "moe_layer")
#: HybridStack spec fields mHC does not cover (not TransformerLayers: no attention/MLP sublayer).
HYBRID_UNCOVERED_LAYERS = ("mamba_layer", "gdn_layer")


def _hybrid_stack_class():
    try:
        from megatron.core.models.hybrid.hybrid_block import HybridStack
    except ImportError:  # pragma: no cover - present in megatron-core 0.19
        return None
    return HybridStack


def _with_mhc_hybrid(submodules, mhc_config: MHCConfig):
    changes = {}
    for name in HYBRID_WRAPPED_LAYERS:
        layer_spec = getattr(submodules, name, None)
        if _is_layer_spec(layer_spec):
            changes[name] = with_mhc_any(layer_spec, mhc_config)
    return dataclasses.replace(submodules, **changes)


def mhc_layer_class(layer_class: type) -> type:
    """The mHC version of a ``TransformerLayer`` subclass (``MHCTransformerLayer`` for the base)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    if layer_class is TransformerLayer or issubclass(layer_class, MHCTransformerLayer):
        return MHCTransformerLayer if layer_class is TransformerLayer else layer_class
    if layer_class not in _MHC_CLASSES:
        _MHC_CLASSES[layer_class] = type(
            "MHC" + layer_class.__name__,
            (MHCLayerMixin, layer_class),
            {"__doc__": f"{layer_class.__name__} with manifold-constrained hyper-connections."},
        )
    return _MHC_CLASSES[layer_class]


_MHC_CLASSES: dict = {}


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
    return with_mhc_any(base, mhc_config if mhc_config is not None else MHCConfig())
