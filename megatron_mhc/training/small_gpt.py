"""Small Megatron-Core GPT models (plain or mHC) for tests and the demo."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mhc.core.config import MHCConfig
from megatron_mhc.core.specs import get_gpt_layer_with_mhc_spec
from megatron_mhc.training.generate import causal_mask, position_ids
from megatron_mhc.training.model_from_args import EAGER_CONFIG_KWARGS


@dataclass
class TinyGPTSettings:
    """Shape and parallelism of a tiny GPT."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None
    vocab_size: int = 256
    seq_length: int = 32
    sequence_parallel: bool = False
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    params_dtype: torch.dtype = torch.float32
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    num_moe_experts: Optional[int] = None  # MoE MLP (SequentialMLP experts, top-2, aux loss)
    core_attention: Optional[type] = None  # replaces the spec's core attention (e.g. for CP)
    extra_config: dict = field(default_factory=dict)


def tiny_transformer_config(settings: TinyGPTSettings) -> TransformerConfig:
    """A ``TransformerConfig`` for CPU runs: RMSNorm, no dropout, no fusions needing CUDA."""
    kwargs = dict(
        num_layers=settings.num_layers,
        hidden_size=settings.hidden_size,
        num_attention_heads=settings.num_attention_heads,
        ffn_hidden_size=settings.ffn_hidden_size or 4 * settings.hidden_size,
        normalization="RMSNorm",
        add_bias_linear=False,
        tensor_model_parallel_size=settings.tensor_model_parallel_size,
        pipeline_model_parallel_size=settings.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=settings.virtual_pipeline_model_parallel_size,
        variable_seq_lengths=settings.pipeline_model_parallel_size > 1,
        # Megatron refuses variable_seq_lengths with the (default) allgather MoE dispatcher,
        # even for dense models.
        moe_token_dispatcher_type="alltoall",
        sequence_parallel=settings.sequence_parallel,
        params_dtype=settings.params_dtype,
        pipeline_dtype=settings.params_dtype,
        init_method_std=0.02,
        context_parallel_size=settings.context_parallel_size,
        expert_model_parallel_size=settings.expert_model_parallel_size,
        **EAGER_CONFIG_KWARGS,
    )
    if settings.num_moe_experts:
        kwargs.update(
            num_moe_experts=settings.num_moe_experts,
            moe_router_topk=2,
            moe_aux_loss_coeff=0.01,
            moe_router_load_balancing_type="aux_loss",
            moe_token_dispatcher_type="alltoall",
            moe_ffn_hidden_size=settings.ffn_hidden_size or 2 * settings.hidden_size,
        )
    kwargs.update(settings.extra_config)
    # Not a TransformerConfig field: the stream count the patched schedules read (hooks.py).
    streams = kwargs.pop("mhc_pipeline_streams", None)
    config = TransformerConfig(**kwargs)
    if streams is not None:
        config.mhc_pipeline_streams = streams
    return config


class CPURMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` that also runs under sequence parallelism (Megatron's torch norm
    refuses SP; its TE/Apex norms need CUDA): the weight is marked ``sequence_parallel`` so
    ``finalize_model_grads`` all-reduces its gradient over the TP group."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def tiny_block_spec(layer_spec, num_layers: int) -> TransformerBlockSubmodules:
    """A block spec of ``num_layers`` copies of ``layer_spec`` with CPU-friendly RMSNorms."""
    submodules = dataclasses.replace(
        layer_spec.submodules, input_layernorm=CPURMSNorm, pre_mlp_layernorm=CPURMSNorm
    )
    layer_spec = dataclasses.replace(layer_spec, submodules=submodules)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=CPURMSNorm)


def tiny_mtp_block_spec(config: TransformerConfig, num_moe_experts: Optional[int] = None,
                        vp_stage: Optional[int] = None):
    """The multi-token-prediction block spec as Megatron-LM builds it (``gpt_builders.py``):
    from Megatron's own layer spec (plain layers on the merged C-wide hidden state, also with
    mHC), with CPU-friendly RMSNorms; None without ``mtp_num_layers`` or off this stage."""
    if not config.mtp_num_layers:
        return None
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )

    layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm", num_experts=num_moe_experts)
    layer_spec = tiny_block_spec(layer_spec, 1).layer_specs[0]
    return get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False,
                                  vp_stage=vp_stage)


def build_tiny_gpt(
    settings: TinyGPTSettings,
    mhc_config: Optional[MHCConfig] = None,
    plain: bool = False,
    vp_stage: Optional[int] = None,
) -> GPTModel:
    """A ``GPTModel`` with the mHC layer spec (``plain=True``: Megatron's own local spec), for
    this rank's pipeline stage (and virtual stage ``vp_stage``)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    config = tiny_transformer_config(settings)
    spec_kwargs = dict(normalization="RMSNorm", num_experts=settings.num_moe_experts)
    if plain:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(**spec_kwargs)
    else:
        spec = get_gpt_layer_with_mhc_spec(mhc_config, **spec_kwargs)
    if settings.core_attention is not None:
        attention = spec.submodules.self_attention
        attention = dataclasses.replace(attention, submodules=dataclasses.replace(
            attention.submodules, core_attention=settings.core_attention))
        spec = dataclasses.replace(
            spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))
    num_local_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=tiny_block_spec(spec, num_local_layers),
        vocab_size=settings.vocab_size,
        max_sequence_length=settings.seq_length,
        position_embedding_type="learned_absolute",
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
        mtp_block_spec=tiny_mtp_block_spec(config, settings.num_moe_experts, vp_stage),
    )


def causal_lm_inputs(tokens: torch.Tensor):
    """``(input_ids, position_ids, labels, attention_mask)`` for next-token prediction.

    ``tokens [b, s+1]``; the attention mask is Megatron's boolean "True = masked" causal mask.
    """
    input_ids = tokens[:, :-1].contiguous()
    labels = tokens[:, 1:].contiguous()
    b, s = input_ids.shape
    return input_ids, position_ids(0, s, b, tokens.device), labels, causal_mask(s, tokens.device)


def lm_loss(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``tokens [b, s+1]``."""
    input_ids, position_ids, labels, mask = causal_lm_inputs(tokens)
    per_token = model(input_ids, position_ids, mask, labels=labels)
    return per_token.float().mean()


def train_on_batch(model: GPTModel, tokens: torch.Tensor, steps: int, lr: float = 3e-3,
                   optimizer_class=torch.optim.AdamW) -> List[float]:
    """``steps`` optimizer steps of ``lm_loss`` on one batch; returns the loss before each step."""
    optimizer = optimizer_class(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
