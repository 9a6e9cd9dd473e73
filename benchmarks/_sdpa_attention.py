"""A core-attention module on ``torch.nn.functional.scaled_dot_product_attention``.

Drop-in for Megatron's ``DotProductAttention`` in a layer spec (same constructor and forward
signature, causal self-attention only) where Transformer-Engine is absent: on a GPU, SDPA picks
its flash / memory-efficient kernels, so benchmarks compare mHC against a realistic attention cost
rather than Megatron's unfused fallback, which materialises the [b, heads, s, s] scores.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Causal self-attention through ``scaled_dot_product_attention`` (inputs ``[s, b, h, d]``)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal or attention_type != "self":
            raise ValueError("SDPACoreAttention supports causal self-attention only")
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """``[s, b, heads, d]`` query/key/value -> ``[s, b, heads * d]`` context."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1],
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
