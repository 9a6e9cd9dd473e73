"""Signal-gain analysis of the residual mappings, as in the paper's stability figures.

For a residual mapping H (per token), the *forward gain* is its max absolute row sum (how much
the residual signal can grow going forward) and the *backward gain* its max absolute column sum
(how much a gradient can grow going back). The *composite* mapping of layers 1..L is the product
H_L ... H_1. HC's composite gain explodes with depth (~3000 at 27B in the paper); mHC's doubly
stochastic H_res keeps it near 1.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, List, Sequence

import torch
from torch import Tensor

from megatron_mhc.core.hyper_connection import HyperConnection


def forward_gain(h: Tensor) -> Tensor:
    """Max absolute row sum of ``h [..., n, n]`` over the last two dims (one value per matrix)."""
    return h.abs().sum(dim=-1).amax(dim=-1)


def backward_gain(h: Tensor) -> Tensor:
    """Max absolute column sum of ``h [..., n, n]`` (one value per matrix)."""
    return h.abs().sum(dim=-2).amax(dim=-1)


@dataclass
class GainReport:
    """Per-sublayer and composite gains, each the max over tokens.

    A sublayer whose H_res holds NaN or Inf for any token is listed in ``non_finite_sublayers``
    (positions in the given sequence); its gains and every composite gain from its depth on are
    NaN, so callers report the sublayer instead of a number.
    """

    layer_forward: List[float]
    layer_backward: List[float]
    composite_forward: List[float]  # gain of H_k ... H_1, for k = 1..L
    composite_backward: List[float]
    non_finite_sublayers: List[int] = field(default_factory=list)

    def as_record(self) -> dict:
        """The JSON-lines record of ``--mhc-gain-log`` and the demo (without the step)."""
        return {
            "layer_forward": self.layer_forward,
            "layer_backward": self.layer_backward,
            "composite_forward_by_depth": self.composite_forward,
            "composite_backward_by_depth": self.composite_backward,
            "composite_forward": self.max_composite_forward,
            "composite_backward": self.max_composite_backward,
            "non_finite_sublayers": self.non_finite_sublayers,
        }

    @property
    def max_composite_forward(self) -> float:
        """The largest composite forward gain over all depths."""
        if self.non_finite_sublayers or not self.composite_forward:
            return float("nan")
        return max(self.composite_forward)

    @property
    def max_composite_backward(self) -> float:
        """The largest composite backward gain over all depths."""
        if self.non_finite_sublayers or not self.composite_backward:
            return float("nan")
        return max(self.composite_backward)


def gain_report(h_res_per_sublayer: Sequence[Tensor]) -> GainReport:
    """Gains of a stack of residual mappings, given in forward order, each ``[..., n, n]``.

    All entries must cover the same tokens (same leading shape); products run in float64.
    """
    layer_fwd, layer_bwd, comp_fwd, comp_bwd, non_finite = [], [], [], [], []
    composite = None
    for index, h in enumerate(h_res_per_sublayer):
        h = h.detach().to(torch.float64)
        if not torch.isfinite(h).all():
            non_finite.append(index)
        h = h.reshape(-1, h.shape[-2], h.shape[-1])
        composite = h if composite is None else h @ composite
        layer_fwd.append(forward_gain(h).max().item())
        layer_bwd.append(backward_gain(h).max().item())
        comp_fwd.append(forward_gain(composite).max().item())
        comp_bwd.append(backward_gain(composite).max().item())
    return GainReport(layer_fwd, layer_bwd, comp_fwd, comp_bwd, non_finite)


@contextlib.contextmanager
def record_residual_mappings(model: torch.nn.Module) -> Iterator[List[Tensor]]:
    """Collect every H_res the model's hyper-connections compute while the block runs.

    Yields a list that fills, in forward order, with one detached ``[s, b, n, n]`` tensor per
    sublayer (attention then MLP of each layer).
    """
    recorded: List[Tensor] = []
    modules = [m for m in model.modules() if isinstance(m, HyperConnection)]
    for module in modules:
        module.recorded_h_res = recorded
    try:
        yield recorded
    finally:
        for module in modules:
            module.recorded_h_res = None
