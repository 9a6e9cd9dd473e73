"""Keep every parameter's gradient buffer aligned in Megatron's DDP when mHC is on.

Megatron-Core packs the parameters of a model chunk into one contiguous gradient buffer. With the
distributed optimizer each parameter starts on a 64-element boundary; without it (Megatron-Core
0.19's ``_compute_default_per_buffer_param_layout``) parameters follow each other unpadded. Plain
GPT weights all have sizes that keep 16-byte alignment, but mHC adds small parameters per sublayer
(``alpha`` 3 and ``bias`` n*n + 2n elements: 27 at n = 4), so every later parameter's ``main_grad``
loses it: with n = 4 every other layer's weights sit 8 bytes off. Under
``--gradient-accumulation-fusion`` Transformer-Engine writes its weight-grad GEMMs straight into
``main_grad``, and cuBLAS then falls back to 2-element-aligned kernels (H100, 12-layer C = 768
example: +11 ms per step; benchmarks/RESULTS.md, issue 14 seventh part).

``align_grad_buffers()`` makes the default layout start every parameter on a 64-element boundary,
the distributed optimizer's own rule. Only the padding changes: the parameter order, the buckets'
boundaries (a bucket still closes after the parameter that reaches ``bucket_size``) and the
gradients are the same. The layout the distributed optimizer computes is left alone.
``unalign_grad_buffers()`` restores Megatron-Core's own layout (the test fixtures undo it).
"""

from __future__ import annotations

from typing import List, Optional

import torch

# Megatron-Core's own default layout, kept by align_grad_buffers() for unalign_grad_buffers().
_ORIGINAL_LAYOUT = None


def padded_param_layout(params: List[torch.nn.Parameter], bucket_size: Optional[int]):
    """The non-distributed-optimizer buffer layout of ``params`` (laid out in reverse, backprop
    order, bucketed every ``bucket_size`` elements or in one bucket for None), each parameter
    starting where the distributed optimizer's layout would start it (Megatron-Core's
    ``pad_param_start``: a 64-element boundary). Returns Megatron's ``PerBufferParamLayout``."""
    from megatron.core.optimizer.param_layout import PerBufferParamLayout, pad_param_start

    index_map, buckets, unpadded = {}, [], []
    start = bucket_start = bucket_id = 0
    bucket_open = False
    for param in params[::-1]:
        start = pad_param_start(start)
        end = start + param.data.nelement()
        index_map[param] = (start, end, bucket_id)
        bucket_open = True
        if bucket_size is not None and end - bucket_start >= bucket_size:
            buckets.append((bucket_start, end))
            unpadded.append(end - bucket_start)
            bucket_start, bucket_id, bucket_open = end, bucket_id + 1, False
        start = end
    if bucket_open:
        buckets.append((bucket_start, start))
        unpadded.append(start - bucket_start)
    return PerBufferParamLayout(param_index_map=index_map, bucket_indices=buckets,
                                per_bucket_numel_unpadded=unpadded)


def align_grad_buffers() -> bool:
    """Make Megatron-Core's default (non-distributed-optimizer) gradient-buffer layout pad every
    parameter start to 64 elements (``padded_param_layout``). Idempotent; returns whether the
    layout is now padded (False where this Megatron-Core has no such function: nothing changed)."""
    global _ORIGINAL_LAYOUT
    from megatron.core.distributed import param_and_grad_buffer as buffers

    current = getattr(buffers, "_compute_default_per_buffer_param_layout", None)
    if current is None:
        return False
    if current is not padded_param_layout:
        _ORIGINAL_LAYOUT = current
        buffers._compute_default_per_buffer_param_layout = padded_param_layout
    return True


def unalign_grad_buffers() -> bool:
    """Undo ``align_grad_buffers()``: Megatron-Core's own default layout again (idempotent).
    Returns whether anything was restored."""
    global _ORIGINAL_LAYOUT
    import sys

    buffers = sys.modules.get("megatron.core.distributed.param_and_grad_buffer")
    if buffers is None or _ORIGINAL_LAYOUT is None:
        return False
    current = getattr(buffers, "_compute_default_per_buffer_param_layout", None)
    restored = current is padded_param_layout
    if restored:
        buffers._compute_default_per_buffer_param_layout = _ORIGINAL_LAYOUT
    _ORIGINAL_LAYOUT = None
    return restored
