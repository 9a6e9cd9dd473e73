"""Signal-gain analysis of the residual mappings, as in the paper's stability figures.

For a residual mapping H (per token), the *forward gain* is its max absolute row sum (how much
the residual signal can grow going forward) and the *backward gain* its max absolute column sum
(how much a gradient can grow going back). The *composite* mapping of layers 1..L is the product
H_L ... H_1. HC's composite gain explodes with depth (~3000 at 27B in the paper); mHC's doubly
stochastic H_res keeps it near 1.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Sequence

import torch
from torch import Tensor

from megatron_mhc.hyper_connection import HyperConnection


def forward_gain(h: Tensor) -> Tensor:
    """Max absolute row sum of ``h [..., n, n]`` over the last two dims (one value per matrix)."""
    return h.abs().sum(dim=-1).amax(dim=-1)


def backward_gain(h: Tensor) -> Tensor:
    """Max absolute column sum of ``h [..., n, n]`` (one value per matrix)."""
    return h.abs().sum(dim=-2).amax(dim=-1)


@dataclass
class GainReport:
    """Per-sublayer and composite gains, each the max over tokens."""

    layer_forward: List[float]
    layer_backward: List[float]
    composite_forward: List[float]  # gain of H_k ... H_1, for k = 1..L
    composite_backward: List[float]

    @property
    def max_composite_forward(self) -> float:
        """The largest composite forward gain over all depths."""
        return max(self.composite_forward) if self.composite_forward else float("nan")

    @property
    def max_composite_backward(self) -> float:
        """The largest composite backward gain over all depths."""
        return max(self.composite_backward) if self.composite_backward else float("nan")


def gain_report(h_res_per_sublayer: Sequence[Tensor]) -> GainReport:
    """Gains of a stack of residual mappings, given in forward order, each ``[..., n, n]``.

    All entries must cover the same tokens (same leading shape); products run in float64.
    """
    layer_fwd, layer_bwd, comp_fwd, comp_bwd = [], [], [], []
    composite = None
    for h in h_res_per_sublayer:
        h = h.detach().to(torch.float64)
        h = h.reshape(-1, h.shape[-2], h.shape[-1])
        composite = h if composite is None else h @ composite
        layer_fwd.append(forward_gain(h).max().item())
        layer_bwd.append(backward_gain(h).max().item())
        comp_fwd.append(forward_gain(composite).max().item())
        comp_bwd.append(backward_gain(composite).max().item())
    return GainReport(layer_fwd, layer_bwd, comp_fwd, comp_bwd)


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
