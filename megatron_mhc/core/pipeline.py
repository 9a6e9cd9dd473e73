"""Pipeline widths: what stages exchange when the residual stream is n*C wide.

Between mHC layers the hidden states are ``[s, b, n*C]``. Megatron-Core 0.19's schedules size the
stage-to-stage tensors as ``[s, b, hidden_size]``; the patch set (``patches/core_v0.19.0``) makes
them call ``pipeline_hidden_size(config)`` instead. An mHC model's ``TransformerConfig`` carries
its stream count under ``PIPELINE_STREAMS_ATTR`` (set by ``megatron_mhc.training.hooks``).
"""

from __future__ import annotations

from typing import Any

#: Attribute set on the TransformerConfig of an mHC model: the width multiplier of the tensors
#: pipeline stages exchange (n for mhc/hc, 1 for residual).
PIPELINE_STREAMS_ATTR = "mhc_pipeline_streams"


def pipeline_hidden_size(config: Any) -> int:
    """Width of the tensors pipeline stages exchange: ``hidden_size * n`` for an mHC model."""
    return config.hidden_size * int(getattr(config, PIPELINE_STREAMS_ATTR, 1) or 1)


def schedules_are_hooked() -> bool:
    """True when Megatron's pipeline schedules call ``pipeline_hidden_size`` (patch applied)."""
    try:
        from megatron.core.pipeline_parallel import schedules
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return False
    return getattr(schedules, "_mhc_pipeline_hidden_size", None) is pipeline_hidden_size
