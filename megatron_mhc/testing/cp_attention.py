"""Causal core attention with context parallelism for CPU tests (Megatron-Core's own CP path
needs Transformer-Engine's attention).

Megatron shards a sequence over the CP ranks in 2*CP chunks, rank r holding chunks r and
2*CP-1-r (load balancing for causal attention; ``cp_chunk_indices``). This module all-gathers
keys and values over the CP group (backward: the summed gradient of each rank's own chunk),
restores the global token order and applies the causal mask on global positions, so each rank's
queries see exactly the keys they would without CP.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def cp_chunk_indices(seq_length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global token positions held by ``cp_rank`` (Megatron's load-balanced CP split)."""
    chunk = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, torch.arange(second_start, second_start + chunk)])


class _GatherSequence(torch.autograd.Function):
    """All-gather ``[s_local, ...]`` over the CP group (rank order); backward: summed grad slice."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(group.size())]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        size = grad.shape[0] // ctx.group.size()
        rank = ctx.group.rank()
        return grad[rank * size:(rank + 1) * size], None


class CPCoreAttention(MegatronModule):
    """Drop-in for Megatron's ``DotProductAttention`` (causal self-attention) with CP."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal or attention_type != "self":
            raise ValueError("CPCoreAttention supports causal self-attention only")
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """``[s_local, b, heads, d]`` q/k/v -> ``[s_local, b, heads * d]``."""
        cp_size = parallel_state.get_context_parallel_world_size()
        s_local = query.shape[0]
        seq = s_local * cp_size
        if cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            order = torch.cat([cp_chunk_indices(seq, cp_size, r) for r in range(cp_size)])
            inverse = torch.argsort(order)  # gathered (rank-major) -> global order
            key = _GatherSequence.apply(key, group)[inverse]
            value = _GatherSequence.apply(value, group)[inverse]
            q_pos = cp_chunk_indices(seq, cp_size, parallel_state.get_context_parallel_rank())
        else:
            q_pos = torch.arange(seq)
        allowed = q_pos[:, None] >= torch.arange(seq)[None, :]  # [s_local, seq]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s_local, query.shape[1], -1)
