"""TP=2 with sequence parallelism matches TP=1 (several gloo processes on CPU)."""

import pytest
import torch
from dist_workers import spawn, tp_loss_and_grads

MHC = dict(expansion_rate=4, kernel_backend="torch")


@pytest.fixture(scope="module")
def tp1_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp1") / "result.pt"
    spawn(tp_loss_and_grads, 1, str(path), False, MHC)
    return torch.load(path)


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_tp2_matches_tp1(tmp_path, tp1_result, sequence_parallel):
    path = tmp_path / "tp2.pt"
    spawn(tp_loss_and_grads, 2, str(path), sequence_parallel, MHC)
    tp2 = torch.load(path)
    # Tolerance: float32 sums taken in a different order across ranks.
    torch.testing.assert_close(tp2["loss"], tp1_result["loss"], rtol=1e-5, atol=1e-6)
    assert tp2["grads"].keys() == tp1_result["grads"].keys()
    for name, grad in tp1_result["grads"].items():
        torch.testing.assert_close(tp2["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(tp2["sequence_parallel_flags"]) == sequence_parallel
