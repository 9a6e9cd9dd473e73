"""CUDA graphs with mHC: the ops are capturable, and the gain metrics work under graph replay.

The GPU tests capture a whole mHC block (forward and backward, Triton and torch kernels, local and
Transformer-Engine specs) with ``torch.cuda.make_graphed_callables`` and compare replays on fresh
inputs with eager runs; Megatron's ``--cuda-graph-impl local`` itself is exercised through the
patched ``pretrain_gpt.py`` (examples/README.md). On CPU: the metrics' snapshot mode.
"""

import pytest
import torch
from fixtures.gpu import (
    build_block,
    destroy_gpu_megatron,
    forward_backward,
    gpu_config,
    init_gpu_megatron,
    relative_error,
    report,
    requires_cuda,
)

from megatron_mhc import MHCConfig
from megatron_mhc.core.backends import transformer_engine_availability
from megatron_mhc.training import metrics
from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, causal_lm_inputs


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU test (the tiny GPT on gloo): runs in CI")
def test_gain_metrics_read_the_snapshot_buffers_under_graphs(megatron_cpu):
    model = build_tiny_gpt(TinyGPTSettings(num_layers=2), MHCConfig(kernel_backend="torch",
                                                                     gate_init=0.3))
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    input_ids, position_ids, _, mask = causal_lm_inputs(tokens)
    metrics.arm(model)
    model(input_ids, position_ids, mask)
    expected = metrics.collect_gains(4)
    metrics.disarm()
    modules = metrics.hyper_connections(model)
    for module in modules:
        module.snapshot_h_res = True  # what a config with --cuda-graph-impl sets
    model(input_ids, position_ids, mask)
    buffers = [module.h_res_snapshot for module in modules]
    assert all(b is not None for b in buffers)
    model(input_ids, position_ids, mask)  # a second forward reuses the same buffers
    assert all(m.h_res_snapshot is b for m, b in zip(modules, buffers))
    metrics.arm(model)
    assert all(not m.recorded_h_res for m in modules)  # nothing appended in snapshot mode
    got = metrics.collect_gains(4)
    metrics.disarm()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


class _BlockCall(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(hidden_states=x, attention_mask=None)


SPECS = ["local"] + (["te"] if transformer_engine_availability().available else [])


@requires_cuda
@pytest.mark.parametrize("impl", SPECS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mhc_block_captured_in_a_cuda_graph_matches_eager(impl, backend):
    init_gpu_megatron(29621)
    try:
        config = gpu_config(dtype=torch.float32, num_layers=3)
        block = build_block(config, impl, MHCConfig(expansion_rate=4, kernel_backend=backend,
                                                    gate_init=0.1), graph_safe_rng=True)
        shape = (64, 2, config.hidden_size)
        sample = torch.randn(shape, device="cuda", requires_grad=True)
        graphed = torch.cuda.make_graphed_callables(_BlockCall(block), (sample,))
        worst = 0.0
        for seed in range(3):  # fresh inputs every replay
            generator = torch.Generator(device="cuda").manual_seed(100 + seed)
            x = torch.randn(shape, device="cuda", generator=generator)
            grad = torch.randn(shape, device="cuda", generator=generator)
            expected = forward_backward(block, x, grad)
            got = forward_backward(block, x, grad, call=graphed)
            assert got[2].keys() == expected[2].keys()
            pairs = [(got[0], expected[0]), (got[1], expected[1])] + [
                (got[2][name], expected[2][name]) for name in expected[2]]
            worst = max([worst] + [relative_error(a, b) for a, b in pairs])
        report("cuda_graph_capture", impl=impl, backend=backend, worst_error=worst)
        assert worst < 1e-5, worst
    finally:
        destroy_gpu_megatron()
