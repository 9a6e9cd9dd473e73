"""Context parallelism: mHC ops are per token, so CP=2 gives the CP=1 loss and gradients.

Megatron-Core's CP attention needs Transformer-Engine; on CPU a fixture attention
(``fixtures.cp_attention``) all-gathers keys/values over the CP group, with
Megatron's own load-balanced sequence split, CP process groups and CP-aware layers.
"""

import pytest
import torch
from dist_workers import cp_loss_and_grads, spawn

MHC = dict(expansion_rate=4, kernel_backend="torch")


@pytest.mark.parametrize("recompute_block", [None, 1])
def test_context_parallel_matches_cp1(tmp_path, recompute_block):
    mhc = dict(MHC, recompute_block=recompute_block)
    spawn(cp_loss_and_grads, 1, str(tmp_path / "cp1.pt"), mhc)
    spawn(cp_loss_and_grads, 2, str(tmp_path / "cp2.pt"), mhc)
    one, two = torch.load(tmp_path / "cp1.pt"), torch.load(tmp_path / "cp2.pt")
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6)
    assert sum("_hc." in n for n in one["grads"]) == 2 * 2 * 3
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
