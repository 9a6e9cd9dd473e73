"""Pipeline parallelism (1F1B and interleaved) with n-stream activations, against PP=1.

Megatron's own schedules run on CPU with gloo; stages exchange [s, b, n*C] tensors through
Megatron's variable_seq_lengths mode (each tensor's shape is sent first). Cases: 1F1B over two
stages, interleaved (two virtual stages each), an uneven split (1 + 3 layers), and 1F1B with the
mHC recompute in blocks of one layer.
"""

import pytest
import torch
from dist_workers import pipeline_losses_and_grads, spawn

MHC = dict(expansion_rate=4, kernel_backend="torch")


@pytest.fixture(scope="module")
def pp1(tmp_path_factory):
    path = tmp_path_factory.mktemp("pp1") / "result.pt"
    spawn(pipeline_losses_and_grads, 1, str(path), None, MHC)
    return torch.load(path)


@pytest.mark.parametrize(
    "pp, vpp, first_stage_layers, recompute_block",
    [(2, None, None, None), (2, 2, None, None), (2, None, 1, None), (2, None, None, 1)],
)
def test_pipeline_matches_pp1(tmp_path, pp1, pp, vpp, first_stage_layers, recompute_block):
    path = tmp_path / "pp.pt"
    mhc = dict(MHC, recompute_block=recompute_block)
    spawn(pipeline_losses_and_grads, pp, str(path), vpp, mhc, first_stage_layers)
    result = torch.load(path)
    assert len(result["losses"]) == len(pp1["losses"]) == 4
    torch.testing.assert_close(torch.stack(result["losses"]), torch.stack(pp1["losses"]),
                               rtol=1e-5, atol=1e-6)
    assert result["grads"].keys() == pp1["grads"].keys()
    assert len(pp1["grads"]) == 4 * 2 * 3  # layers x sublayers x (phi, alpha, bias)
    for name, grad in pp1["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pipeline_with_tensor_and_sequence_parallelism_matches_pp1(tmp_path, pp1):
    path = tmp_path / "tp2pp2.pt"
    spawn(pipeline_losses_and_grads, 4, str(path), None, MHC, None, 2)  # TP=2 (SP) x PP=2
    result = torch.load(path)
    torch.testing.assert_close(torch.stack(result["losses"]), torch.stack(pp1["losses"]),
                               rtol=1e-5, atol=1e-6)
    for name, grad in pp1["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pipeline_without_variable_seq_lengths_is_refused():
    from types import SimpleNamespace

    from megatron_mhc import MHCConfig
    from megatron_mhc.core.layer import check_transformer_config

    config = SimpleNamespace(pipeline_model_parallel_size=2, variable_seq_lengths=False)
    with pytest.raises(ValueError, match="megatron-mhc patch apply"):
        check_transformer_config(config, MHCConfig())
    check_transformer_config(config, MHCConfig(variant="residual"))  # one stream: no change


@pytest.mark.parametrize("vpp", [None, 2])
def test_patched_schedules_fixed_shapes_match_pp1(tmp_path, pp1, vpp):
    """The patch set's schedule hook: stages exchange fixed [s, b, n*C] tensors (no
    variable_seq_lengths), 1F1B and interleaved, same losses and gradients as PP=1."""
    path = tmp_path / "pp.pt"
    spawn(pipeline_losses_and_grads, 2, str(path), vpp, MHC, None, 1, True)
    result = torch.load(path)
    torch.testing.assert_close(torch.stack(result["losses"]), torch.stack(pp1["losses"]),
                               rtol=1e-5, atol=1e-6)
    for name, grad in pp1["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)

