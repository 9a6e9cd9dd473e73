"""Rebuild a dense mHC GPT from a checkpoint's stored training args (for ``gain-report --batch``).

Covers the dense GPT options of ``pretrain_gpt.py`` that change the parameters: sizes, GQA,
SwiGLU, biases, QK-layernorm, normalisation, position embedding, tied embeddings. One process,
tensor/pipeline parallel size 1, Megatron-Core local layers; CUDA when available, else CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch

from megatron_mhc.training.checkpoint_io import (
    CheckpointError,
    ensure_process_group,
    load_sharded,
    read_common_state,
)

#: TransformerConfig settings for an eager, deterministic rebuild on any device: no dropout, CPU
#: initialisation, none of the fusions that need CUDA / Apex / Transformer-Engine.
EAGER_CONFIG_KWARGS = dict(
    use_cpu_initialization=True,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    gradient_accumulation_fusion=False,
    persist_layer_norm=False,
    apply_rope_fusion=False,
)


def _config_from_args(args, dtype: torch.dtype):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=getattr(args, "kv_channels", None),
        normalization=getattr(args, "normalization", "LayerNorm"),
        layernorm_epsilon=getattr(args, "norm_epsilon", 1e-5),
        add_bias_linear=getattr(args, "add_bias_linear", True),
        add_qkv_bias=getattr(args, "add_qkv_bias", False),
        qk_layernorm=getattr(args, "qk_layernorm", False),
        gated_linear_unit=getattr(args, "swiglu", False),
        params_dtype=dtype,
        **EAGER_CONFIG_KWARGS,
    )
    if getattr(args, "swiglu", False):
        kwargs["activation_func"] = F.silu
    if getattr(args, "group_query_attention", False):
        kwargs["num_query_groups"] = args.num_query_groups
    if getattr(args, "num_experts", None):
        raise CheckpointError("gain-report --batch rebuilds dense GPT models only; for MoE models "
                              "use the gains logged during training (--mhc-log-interval)")
    return TransformerConfig(**kwargs)


def build_model_from_checkpoint(path: Path) -> Tuple[torch.nn.Module, object]:
    """``(model in eval mode with the checkpoint's weights, stored args)``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_mhc.core.specs import get_gpt_layer_with_mhc_spec
    from megatron_mhc.training.hooks import mhc_config_from_args

    iter_dir, _, common = read_common_state(path)
    args = common.get("args")
    if args is None or not getattr(args, "enable_mhc", False):
        raise CheckpointError(f"{path}: no megatron-mhc training args in the checkpoint "
                              "(--batch needs a checkpoint written by an mHC training run)")
    cuda = torch.cuda.is_available()
    if not cuda:
        if getattr(args, "position_embedding_type", "learned_absolute") == "rope":
            raise CheckpointError("--batch on a model with RoPE needs a GPU (Megatron-Core's "
                                  "rotary embedding builds its tables on CUDA)")
        from megatron_mhc.training.cpu import patch_megatron_for_cpu

        patch_megatron_for_cpu()
    ensure_process_group()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    if cuda:  # the attention's dropout region forks Megatron's CUDA RNG tracker
        from megatron.core import tensor_parallel

        torch.cuda.set_device(0)
        tensor_parallel.model_parallel_cuda_manual_seed(getattr(args, "seed", 1234))
    mhc_config = mhc_config_from_args(args)
    dtype = (torch.bfloat16 if getattr(args, "bf16", False)
             else torch.float16 if getattr(args, "fp16", False) else torch.float32)
    config = _config_from_args(args, dtype)
    spec = get_gpt_layer_with_mhc_spec(
        mhc_config, normalization=config.normalization, qk_layernorm=config.qk_layernorm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        position_embedding_type=getattr(args, "position_embedding_type", "learned_absolute"),
        rotary_percent=getattr(args, "rotary_percent", 1.0),
        rotary_base=getattr(args, "rotary_base", 10000),
        share_embeddings_and_output_weights=not getattr(
            args, "untie_embeddings_and_output_weights", False),
    )
    state = load_sharded(model.sharded_state_dict(), iter_dir, path)
    model.load_state_dict(state, strict=False)
    model = model.cuda() if cuda else model.float()
    return model.eval(), args
