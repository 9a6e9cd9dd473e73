"""Reference mHC math in plain PyTorch: the oracle every fused kernel is tested against.

Shapes: ``x`` is the widened residual stream ``[..., n, C]`` (n streams of width C per token);
``phi`` is ``[n*C, n*n + 2*n]``; the mapping vector is laid out ``[pre (n) | post (n) | res (n*n)]``
with the res block row-major (``res[i, j]`` at ``2n + i*n + j``). All mapping math runs in at least
float32 (float64 stays float64, so ``torch.autograd.gradcheck`` applies to every op).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype mapping math runs in: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: Sinkhorn logits are clamped to [-limit, limit] first: +inf / -inf become their limits (the
#: entry takes all the mass its row and column allow / none), NaN stays NaN. Finite logits of
#: this size never arise in training (|H~| <= |alpha| * |x~ phi| + |b|), and beyond ~100 apart
#: float32 exp has saturated anyway, so the clamp changes nothing else.
SINKHORN_LOGIT_LIMIT = 1.0e4


def _sinkhorn_iterations(logits: Tensor, num_iters: int) -> Tensor:
    # Log domain: subtracting a row's logsumexp is exp-with-row-max-shift followed by the row
    # normalisation, exactly; it keeps every intermediate finite (no 0/0 for columns whose
    # entries underflow, no underflowing denominators in the backward).
    log_m = logits.clamp(-SINKHORN_LOGIT_LIMIT, SINKHORN_LOGIT_LIMIT)  # NaN propagates
    for _ in range(num_iters):
        log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)
        log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)
    return torch.exp(log_m)


class _SinkhornFunction(torch.autograd.Function):
    """Sinkhorn-Knopp whose backward recomputes the iterations instead of storing them.

    Backward of one half-step ``v' = v - logsumexp(v)`` along an axis:
    ``dv = dv' - softmax(v) * sum(dv')`` with ``softmax(v) = exp(v')``, applied in reverse over
    the recomputed iterates (the same recurrence the Triton kernel runs on chip)."""

    @staticmethod
    def forward(ctx, logits: Tensor, num_iters: int) -> Tensor:
        logits = logits.to(compute_dtype(logits.dtype))
        ctx.save_for_backward(logits)
        ctx.num_iters = num_iters
        return _sinkhorn_iterations(logits, num_iters)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (logits,) = ctx.saved_tensors
        iterate = logits.clamp(-SINKHORN_LOGIT_LIMIT, SINKHORN_LOGIT_LIMIT)
        iterates = []
        for _ in range(ctx.num_iters):
            for axis in (-1, -2):
                iterate = iterate - torch.logsumexp(iterate, dim=axis, keepdim=True)
                iterates.append((iterate, axis))
        grad = grad_out.to(logits.dtype) * torch.exp(iterate)
        for iterate, axis in reversed(iterates):
            grad = grad - torch.exp(iterate) * grad.sum(dim=axis, keepdim=True)
        # The clamp passes gradients only inside the limits (NaN stays NaN: NaN > x is False).
        grad = torch.where(logits.abs() > SINKHORN_LOGIT_LIMIT, torch.zeros_like(grad), grad)
        return grad, None


def sinkhorn(logits: Tensor, num_iters: int = 20) -> Tensor:
    """Project ``exp(logits)`` (shape ``[..., n, n]``) towards the doubly stochastic matrices.

    Exponentiates with a row-max shift, then alternates row and column normalisation
    ``num_iters`` times (one iteration = rows then columns), in float32 (float64 for float64
    input) whatever the input dtype. The normalisations run in the log domain (``logsumexp``),
    which is the same function in exact arithmetic and stays finite for any finite logits.
    Non-finite logits: ``+inf`` / ``-inf`` are taken as their limits (clamped to
    ``±SINKHORN_LOGIT_LIMIT``; gradient 0 there), so the result stays doubly stochastic; ``NaN``
    is never hidden: it makes that token's matrix NaN (the training-log gain metrics then name the
    sublayer). The backward pass recomputes the iterations from the saved logits.
    """
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn expects [..., n, n] logits, got shape {tuple(logits.shape)}")
    if num_iters < 1:
        raise ValueError(f"sinkhorn needs num_iters >= 1, got {num_iters}")
    return _SinkhornFunction.apply(logits, num_iters)


def project_and_norm(x: Tensor, phi: Tensor, eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """The projection ``vec(x) @ phi`` and the reciprocal RMS of ``vec(x)``.

    The divide-by-RMS is applied *after* the projection (``x~ @ phi = (x @ phi) / rms(x)``), so one
    read of x gives both terms. Returns ``(proj [..., n*n+2n], inv_rms [...])`` in compute dtype.
    """
    cd = compute_dtype(x.dtype)
    flat = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1]).to(cd)
    proj = flat @ phi.to(cd)
    inv_rms = torch.rsqrt(flat.square().mean(dim=-1) + eps)
    return proj, inv_rms


def mappings_from_projection(
    proj: Tensor,
    inv_rms: Tensor,
    alpha: Tensor,
    bias: Tensor,
    n: int,
    variant: str = "mhc",
    sinkhorn_iters: int = 20,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Turn the projection into ``(H_pre [..., n], H_post [..., n], H_res [..., n, n])``.

    ``mhc``: H~ = alpha * proj * inv_rms + bias; H_pre = sigmoid, H_post = 2*sigmoid,
    H_res = Sinkhorn(exp(.)). ``hc``: H = alpha * tanh(proj * inv_rms) + bias, no constraint.
    """
    cd = proj.dtype
    dyn = proj * inv_rms.unsqueeze(-1)
    alpha = alpha.to(cd)
    bias = bias.to(cd)
    gates = torch.cat(
        [alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)]
    )  # per-column gate
    if variant == "mhc":
        logits = dyn * gates + bias
        h_pre = torch.sigmoid(logits[..., :n])
        h_post = 2.0 * torch.sigmoid(logits[..., n : 2 * n])
        h_res = sinkhorn(logits[..., 2 * n :].unflatten(-1, (n, n)), sinkhorn_iters)
    elif variant == "hc":
        values = torch.tanh(dyn) * gates + bias
        h_pre = values[..., :n]
        h_post = values[..., n : 2 * n]
        h_res = values[..., 2 * n :].unflatten(-1, (n, n))
    else:
        raise ValueError(f"mappings are defined for variant 'mhc' or 'hc', got {variant!r}")
    return h_pre, h_post, h_res


def check_phi_shape(x: Tensor, phi: Tensor, name: str = "phi") -> None:
    """Raise ``ValueError`` (naming ``name``) unless ``phi`` is ``[n*C, n*n+2n]`` for the streams
    ``x [..., n, C]``."""
    n = x.shape[-2]
    if phi.shape != (n * x.shape[-1], n * n + 2 * n):
        raise ValueError(f"{name} must be [n*C, n*n+2n] = {[n * x.shape[-1], n * n + 2 * n]}, "
                         f"got {list(phi.shape)}")


def compute_mappings(
    x: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    variant: str = "mhc",
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-token mappings ``(H_pre, H_post, H_res)`` of the streams ``x [..., n, C]``.

    ``phi [n*C, n*n+2n]``, ``alpha [3]`` (pre, post, res gates), ``bias [n*n+2n]``.
    """
    check_phi_shape(x, phi)
    proj, inv_rms = project_and_norm(x, phi, eps)
    return mappings_from_projection(proj, inv_rms, alpha, bias, x.shape[-2], variant, sinkhorn_iters)


def enter(
    x: Tensor,
    phi: Tensor,
    alpha: Tensor,
    bias: Tensor,
    variant: str = "mhc",
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
) -> Tuple[Tensor, Tensor, Tensor]:
    """What a sublayer needs on entry: ``(pre_apply(x, H_pre), H_post, H_res)``.

    The composition of ``compute_mappings`` and ``pre_apply``; fused backends implement it as one
    op so their backward writes dx in a single pass.
    """
    h_pre, h_post, h_res = compute_mappings(x, phi, alpha, bias, variant, sinkhorn_iters, eps)
    return pre_apply(x, h_pre), h_post, h_res


def pre_apply(x: Tensor, h_pre: Tensor) -> Tensor:
    """Aggregate the streams into the sublayer input: ``sum_i H_pre[i] * x[i]`` -> ``[..., C]``."""
    cd = compute_dtype(x.dtype)
    out = torch.einsum("...n,...nc->...c", h_pre.to(cd), x.to(cd))
    return out.to(x.dtype)


def post_res_merge(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """The next residual state ``H_res @ x + H_post^T y`` -> ``[..., n, C]``.

    ``x [..., n, C]``, ``y [..., C]`` (the sublayer output), ``h_post [..., n]``,
    ``h_res [..., n, n]``; output in x's dtype.
    """
    cd = compute_dtype(x.dtype)
    mixed = torch.einsum("...ij,...jc->...ic", h_res.to(cd), x.to(cd))
    out = mixed + h_post.to(cd).unsqueeze(-1) * y.to(cd).unsqueeze(-2)
    return out.to(x.dtype)


def expand_streams(h: Tensor, n: int) -> Tensor:
    """Replicate the embedding output ``[..., C]`` into ``n`` identical streams ``[..., n, C]``."""
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1]).contiguous()


def merge_streams(x: Tensor) -> Tensor:
    """Merge ``[..., n, C]`` back to ``[..., C]`` by the stream mean (before the final norm).

    The mean keeps a function-preserving model identical to the plain one; under the final RMSNorm
    it equals the sum of the streams up to the norm's epsilon.
    """
    cd = compute_dtype(x.dtype)
    return x.to(cd).mean(dim=-2).to(x.dtype)
