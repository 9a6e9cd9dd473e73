"""DDP's gradient buffer stays aligned with mHC's small parameters (``training.grad_buffer_layout``):
the padded default layout against Megatron-Core's own, and a real Megatron DDP on CPU."""

import pytest
import torch

from megatron_mhc.training import grad_buffer_layout as layout

# Sizes like one mHC sublayer (phi, alpha, bias) between two weights: 27 odd elements.
SIZES = [(16, 8), (3,), (24,), (96, 24), (5, 8), (7,)]


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in SIZES]


@pytest.fixture
def megatron_buffers(monkeypatch):
    """Megatron-Core's buffer module, its default layout restored after the test."""
    from megatron.core.distributed import param_and_grad_buffer as buffers

    monkeypatch.setattr(buffers, "_compute_default_per_buffer_param_layout",
                        buffers._compute_default_per_buffer_param_layout)
    return buffers


@pytest.mark.parametrize("bucket_size", [None, 200, 1000])
def test_padded_layout_keeps_megatrons_order_and_buckets(megatron_buffers, bucket_size):
    params = _params()
    plain = megatron_buffers._compute_default_per_buffer_param_layout(params, bucket_size)
    padded = layout.padded_param_layout(params, bucket_size)
    assert plain.param_index_map[params[0]][0] % 64 != 0  # the misalignment being fixed
    order = sorted(params, key=lambda p: padded.param_index_map[p][0])
    assert order == params[::-1]  # backprop order, as Megatron lays them out
    end = 0
    for param in order:
        start, stop, bucket = padded.param_index_map[param]
        assert start % 64 == 0 and start >= end  # the distributed optimizer's alignment
        assert stop - start == param.numel()
        assert bucket == plain.param_index_map[param][2]  # the same bucket boundaries
        lo, hi = padded.bucket_indices[bucket]
        assert lo <= start and stop <= hi
        end = stop
    assert len(padded.bucket_indices) == len(plain.bucket_indices)
    assert padded.bucket_indices[-1][1] == end


def test_ddp_main_grads_aligned_and_unchanged(megatron_cpu, megatron_buffers):
    """A Megatron DDP-wrapped module with mHC-sized parameters: every ``main_grad`` 16-byte
    aligned with the padded layout (not without), and the same gradients."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                               use_cpu_initialization=True)

    class Module(MegatronModule):
        def __init__(self):
            super().__init__(config=config)
            self.weights = torch.nn.ParameterList(_params())

        def forward(self, x):
            return sum((w.reshape(-1, 8) @ x).square().sum() if w.numel() % 8 == 0
                       else w.square().sum() * x.sum() for w in self.weights)

    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    grads, misaligned = {}, {}
    for padded in (False, True):
        if padded:
            assert layout.align_grad_buffers() and layout.align_grad_buffers()  # idempotent
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                      Module())
        ddp(x).backward()
        grads[padded] = [p.main_grad.clone() for p in ddp.module.parameters()]
        misaligned[padded] = [p.main_grad.data_ptr() % 16 for p in ddp.module.parameters()]
    assert any(misaligned[False]) and not any(misaligned[True])
    for plain, padded in zip(grads[False], grads[True]):
        torch.testing.assert_close(padded, plain, rtol=0, atol=0)


def test_unalign_restores_megatrons_own_layout(megatron_buffers):
    """``unalign_grad_buffers`` undoes ``align_grad_buffers`` (what the test fixtures rely on so
    that a test calling ``apply_mhc_to_spec`` leaves no padded layout behind)."""
    own = megatron_buffers._compute_default_per_buffer_param_layout
    assert own is not layout.padded_param_layout
    assert layout.align_grad_buffers()
    assert megatron_buffers._compute_default_per_buffer_param_layout is layout.padded_param_layout
    assert layout.unalign_grad_buffers()
    assert megatron_buffers._compute_default_per_buffer_param_layout is own
    assert not layout.unalign_grad_buffers()  # idempotent


def test_unpatch_megatron_for_cpu_restores_every_replacement():
    """``patch_megatron_for_cpu`` then ``unpatch_megatron_for_cpu``: every attribute it replaced
    is the original object again (the fixtures undo the patch after each test)."""
    from megatron.core import utils as core_utils
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import utils as transformer_utils

    from megatron_mhc.training import cpu

    if torch.cuda.is_available():
        pytest.skip("patch_megatron_for_cpu does nothing where CUDA is visible")
    before = (torch.cuda.synchronize, torch.cuda.current_device, schedules.torch,
              vars(core_utils.GlobalMemoryBuffer)["get_tensor"],
              transformer_utils.get_default_causal_mask,
              vars(tp_random.CudaRNGStatesTracker)["fork"])
    cpu.patch_megatron_for_cpu()
    assert cpu.megatron_cpu_patched() and torch.cuda.synchronize is not before[0]
    assert schedules.torch is not torch
    cpu.unpatch_megatron_for_cpu()
    after = (torch.cuda.synchronize, torch.cuda.current_device, schedules.torch,
             vars(core_utils.GlobalMemoryBuffer)["get_tensor"],
             transformer_utils.get_default_causal_mask,
             vars(tp_random.CudaRNGStatesTracker)["fork"])
    assert not cpu.megatron_cpu_patched()
    assert all(a is b for a, b in zip(after, before))
