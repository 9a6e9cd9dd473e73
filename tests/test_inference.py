"""Greedy decoding through Megatron-Core's static inference path (KV cache) vs the full forward.

The n streams must survive the decode step's ``[1, b, C]`` inputs: each generated step's logits
equal the full-sequence forward's at that position (float32 on CPU: rounding only).
"""

import pytest
import torch

from megatron_mhc import MHCConfig
from megatron_mhc.training.generate import (
    full_forward_logits,
    greedy_generate,
    incremental_decoding_report,
)
from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt

CASES = {
    "plain": None,
    "mhc n=4 torch": MHCConfig(expansion_rate=4, kernel_backend="torch"),
    "mhc n=2 triton": MHCConfig(expansion_rate=2, kernel_backend="triton"),
    "hc n=4 torch": MHCConfig(expansion_rate=4, variant="hc", kernel_backend="torch"),
    "mhc recompute L_r=2": MHCConfig(expansion_rate=4, kernel_backend="torch", recompute_block=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_incremental_decoding_matches_full_forward(megatron_cpu, name):
    torch.manual_seed(7)
    model = build_tiny_gpt(TinyGPTSettings(num_layers=3, seq_length=32), CASES[name],
                           plain=CASES[name] is None).eval()
    prompt = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(11))
    report = incremental_decoding_report(model, prompt, new_tokens=10)
    assert report.steps == 10
    assert report.tokens_equal and report.decisive_mismatches == 0
    assert report.max_rel_diff < 1e-5, report
    _assert_decode_matches_full_forward(model, prompt, 10)


def _assert_decode_matches_full_forward(model, prompt, new_tokens):
    """The test's own comparison (not the report's): every cached step's logits against one
    full forward over the generated tokens at that position, and each generated token the argmax
    of its step's logits."""
    tokens, logits = greedy_generate(model, prompt, new_tokens=new_tokens)
    full = full_forward_logits(model, tokens[:, :-1])
    length = prompt.shape[1]
    assert torch.equal(tokens[:, :length], prompt)
    for k, step in enumerate(logits):
        assert torch.equal(tokens[:, length + k], step.argmax(-1)), k
        # float32 on CPU: measured largest |difference| 1.8e-7 .. 2.1e-7 over every case here
        # (logits up to 0.70 in size); 8e-7 is about 4x that.
        torch.testing.assert_close(step, full[:, length - 1 + k], rtol=0, atol=8e-7,
                                   msg=f"step {k}")


def test_prompt_of_one_token_and_bad_arguments(megatron_cpu):
    model = build_tiny_gpt(TinyGPTSettings(num_layers=2), MHCConfig(kernel_backend="torch")).eval()
    tokens, logits = greedy_generate(model, torch.tensor([[5], [9]]), new_tokens=3)
    assert tokens.shape == (2, 4) and len(logits) == 3 and logits[0].shape == (2, 256)
    assert torch.isfinite(torch.stack(logits)).all()
    _assert_decode_matches_full_forward(model, torch.tensor([[5], [9]]), 3)
    with pytest.raises(ValueError, match="new_tokens"):
        greedy_generate(model, torch.tensor([[5]]), new_tokens=0)
    with pytest.raises(ValueError, match="prompt"):
        greedy_generate(model, torch.tensor([5, 6]), new_tokens=2)
