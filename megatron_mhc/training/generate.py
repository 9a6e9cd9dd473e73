"""Greedy generation through Megatron-Core's static inference path (KV cache), and its check.

The static engine (``StaticInferenceEngine`` → ``TextGenerationController`` →
``GPTInferenceWrapper``) calls the model with a ``StaticInferenceContext``: one prefill forward
over the prompt, then one forward per new token of shape ``[b, 1]`` that reads the keys and values
of the earlier positions from the context's cache, advancing ``sequence_len_offset`` after each
call. ``greedy_generate`` drives a ``GPTModel`` (plain or mHC) exactly that way;
``incremental_decoding_report`` compares each step's logits with those of one full-sequence
forward over the generated tokens, which is what an evaluation harness relies on.

Shapes: ``prompt [b, P]`` token ids (int64), logits ``[b, V]`` per generated step (float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch


def causal_mask(length: int, device) -> torch.Tensor:
    """Megatron's boolean causal mask (True = masked), ``[1, 1, length, length]``."""
    mask = torch.triu(torch.ones(length, length, device=device, dtype=torch.bool), diagonal=1)
    return mask.view(1, 1, length, length)


def position_ids(start: int, stop: int, batch: int, device) -> torch.Tensor:
    """Positions ``start .. stop-1`` for each of ``batch`` rows, ``[batch, stop - start]``."""
    return torch.arange(start, stop, device=device).unsqueeze(0).expand(batch, -1)


@torch.no_grad()
def full_forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, s, V]`` (float32) of one forward over ``tokens [b, s]``, no cache."""
    batch, length = tokens.shape
    logits = model(tokens, position_ids(0, length, batch, tokens.device),
                   causal_mask(length, tokens.device))
    return logits.float()


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, new_tokens: int):
    """Greedy decoding with the KV cache: ``(tokens [b, P + new_tokens], [logits [b, V]] * new)``.

    Step k's logits are those that chose token ``P + k``: the prefill's last position for k = 0,
    then the ``[b, 1]`` decode forwards.
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids, got {tuple(prompt.shape)}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    batch, length = prompt.shape
    total = length + new_tokens
    context = StaticInferenceContext(max_batch_size=batch, max_sequence_length=total)
    device = prompt.device
    tokens = prompt
    step_logits: List[torch.Tensor] = []
    mask = causal_mask(total, device)
    start = 0
    while tokens.shape[1] < total:
        stop = tokens.shape[1]
        logits = model(tokens[:, start:stop], position_ids(start, stop, batch, device),
                       mask[..., start:stop, :stop], inference_context=context)
        context.increment_sequence_len_offset(stop - start)
        last = logits[:, -1].float()
        step_logits.append(last)
        tokens = torch.cat([tokens, last.argmax(dim=-1, keepdim=True)], dim=1)
        if start == 0:
            context.enable_decode_mode()
        start = stop
    return tokens, step_logits


@dataclass
class DecodingReport:
    """How incremental decoding compares with the full-sequence forward."""

    tokens_equal: bool  # the full forward's argmax is the generated token at every step
    max_abs_diff: float  # largest |logit difference| over all steps
    max_rel_diff: float  # largest per-step ||diff|| / ||full logits||
    steps: int
    #: Steps (x batch rows) whose token differs at a near-tie: the full forward prefers another
    #: token by less than twice that step's largest logit difference (rounding can flip it).
    near_tie_mismatches: int = 0
    #: Steps whose token differs by more than that: a real disagreement.
    decisive_mismatches: int = 0


@torch.no_grad()
def incremental_decoding_report(model, prompt: torch.Tensor, new_tokens: int) -> DecodingReport:
    """Generate greedily with the cache, then compare every step with one full forward over the
    generated tokens (teacher-forced, so later steps stay aligned after a near-tie flip)."""
    tokens, step_logits = greedy_generate(model, prompt, new_tokens)
    full = full_forward_logits(model, tokens[:, :-1])
    length = prompt.shape[1]
    result = DecodingReport(True, 0.0, 0.0, len(step_logits))
    for k, logits in enumerate(step_logits):
        reference = full[:, length - 1 + k]
        diff = logits - reference
        step_abs = diff.abs().max().item()
        result.max_abs_diff = max(result.max_abs_diff, step_abs)
        result.max_rel_diff = max(
            result.max_rel_diff, (diff.norm() / reference.norm().clamp_min(1e-30)).item())
        generated = tokens[:, length + k]
        preferred = reference.argmax(-1)
        for row in torch.nonzero(preferred != generated).flatten().tolist():
            result.tokens_equal = False
            margin = (reference[row, preferred[row]] - reference[row, generated[row]]).item()
            if margin <= 2 * step_abs:
                result.near_tie_mismatches += 1
            else:
                result.decisive_mismatches += 1
    return result
