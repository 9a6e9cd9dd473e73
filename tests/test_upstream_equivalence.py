"""How closely a model converted with ``convert from-upstream`` computes Megatron-LM main's
``HyperConnectionModule`` function: upstream's formulas written out here (from its definition:
mappings from ``x * 1/(rms(x) + eps)``, Sinkhorn-Knopp in the linear domain on
``exp(H - rowmax)`` with sums clamped at 1e-6), against this project's reference ops with the
converted parameters. The bounds asserted here are the ones ``megatron_mhc.tools.convert`` and
README state.
"""

import math

import pytest
import torch

from megatron_mhc.core.ops import reference
from megatron_mhc.tools.convert import UPSTREAM_BOUNDS

N, C, T = 4, 64, 16


def upstream_mappings(x, weight, alpha_pre, alpha_post, alpha_res, bias, iters=20, eps=1e-6):
    """Upstream's mappings of ``x [T, n*C]``: ``weight [n*n+2n, n*C]`` (its mapping_proj)."""
    n = N
    r = 1.0 / (x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1]) + eps)
    gates = torch.cat([alpha_pre.expand(n), alpha_post.expand(n), alpha_res.expand(n * n)])
    h = r * (x @ weight.T) * gates + bias
    h_pre, h_post = h[..., :n].sigmoid(), 2 * h[..., n:2 * n].sigmoid()
    logits = h[..., 2 * n:].unflatten(-1, (n, n))
    m = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True).clamp(min=1e-6)
        m = m / m.sum(dim=-2, keepdim=True).clamp(min=1e-6)
    return h_pre, h_post, m


def _params(seed, bias_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(N * N + 2 * N, N * C, generator=g, dtype=torch.float64) * 0.02
    gates = [torch.rand(1, generator=g, dtype=torch.float64) for _ in range(3)]
    bias = torch.randn(N * N + 2 * N, generator=g, dtype=torch.float64) * bias_scale
    return weight, gates, bias


def _max_rel(ours, theirs):
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs))


def _difference(rms, bias_scale=1.0, seed=0):
    weight, gates, bias = _params(seed, bias_scale)
    x = torch.randn(T, N * C, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt() * rms
    theirs = upstream_mappings(x, weight, *gates, bias)
    # The converter's mapping: phi = weight^T, alpha = [pre, post, res], bias as is.
    ours = reference.compute_mappings(x.unflatten(-1, (N, C)), weight.T.contiguous(),
                                      torch.cat(gates), bias, "mhc", 20, 1e-6)
    return _max_rel(ours, theirs)


@pytest.mark.parametrize("rms, bound_key", [(1.0, "rms_1"), (0.02, "rms_0.02"),
                                            (1e-3, "rms_0.001")])
def test_mappings_agree_within_the_stated_bound(rms, bound_key):
    worst = max(_difference(rms, seed=s) for s in range(3))
    assert worst <= UPSTREAM_BOUNDS[bound_key], (rms, worst)


def test_large_logits_sinkhorn_bound():
    """H_res logits near ±150: upstream's clamped linear-domain iterations and our log-domain
    ones part by up to the stated bound after 20 iterations."""
    worst = max(_difference(1.0, bias_scale=150.0, seed=s) for s in range(3))
    assert worst <= UPSTREAM_BOUNDS["logits_150"], worst


def test_the_bound_is_tight_enough_to_mean_something():
    """The normalisations really differ (so the table is measured, not vacuous)."""
    assert _difference(1e-3) > 1e-2
    assert _difference(1.0) < 1e-5
