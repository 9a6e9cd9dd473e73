"""The overlapped schedule's stream part (MHCConfig.overlap / --mhc-overlap)."""

import pytest
import torch

from megatron_mhc import MHCConfig
from megatron_mhc.core.ops import reference
from megatron_mhc.core.overlap import high_priority_stream, run_on_high_priority_stream
from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, lm_loss


def _loss_and_grads(overlap, block, monkeypatch):
    """Loss and gradients of a 3-layer mHC GPT, and the sublayers whose merge was handed to
    ``run_on_high_priority_stream`` (by layer number)."""
    from megatron_mhc.core import layer

    handed, run = [], layer.run_on_high_priority_stream

    def counted(fn, *tensors):
        handed.append(fn)
        return run(fn, *tensors)

    monkeypatch.setattr(layer, "run_on_high_priority_stream", counted)
    torch.manual_seed(5)
    settings = TinyGPTSettings(num_layers=3, hidden_size=32, seq_length=16)
    model = build_tiny_gpt(settings, MHCConfig(expansion_rate=4, kernel_backend="torch",
                                               recompute_block=block, overlap=overlap))
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(6))
    loss = lm_loss(model, tokens)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(handed)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU test (the tiny GPT on gloo): runs in CI")
@pytest.mark.parametrize("block", [None, 2])
def test_overlap_keeps_loss_and_gradients(megatron_cpu, block, monkeypatch):
    """With overlap each layer's MLP merge (3 layers: 3 merges, the attention merges not) goes
    through ``run_on_high_priority_stream``, without it none does; on CPU that runs the merge
    inline, so loss and gradients (with and without recompute) are the same bit for bit. (The
    stream ordering itself: the CUDA test below.)"""
    loss0, grads0, handed0 = _loss_and_grads(False, block, monkeypatch)
    loss1, grads1, handed1 = _loss_and_grads(True, block, monkeypatch)
    assert (handed0, handed1) == (0, 3)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads1.keys() == grads0.keys()
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merge_on_the_high_priority_stream_matches_and_orders_streams():
    from megatron_mhc.kernels.triton import post_res_merge

    gen = torch.Generator(device="cuda").manual_seed(7)
    t, n, c = 512, 4, 1024

    def inputs():
        x = torch.randn(t, n, c, device="cuda", generator=gen, dtype=torch.bfloat16)
        y = torch.randn(t, c, device="cuda", generator=gen, dtype=torch.bfloat16)
        hp = 2 * torch.rand(t, n, device="cuda", generator=gen)
        hr = reference.sinkhorn(torch.randn(t, n, n, device="cuda", generator=gen), 20)
        return [v.requires_grad_() for v in (x, y, hp, hr)]

    a = inputs()
    b = [v.detach().clone().requires_grad_() for v in a]
    seen = []

    def merge(*args):
        seen.append(torch.cuda.current_stream())
        return post_res_merge(*args)

    torch.cuda._sleep(50_000_000)  # the current stream is busy when x is written...
    x_late = a[0] * 1.0  # ...so the side stream must wait for this kernel before reading x
    out = run_on_high_priority_stream(merge, x_late, *a[1:])
    want = post_res_merge(*b)  # read on the current stream: it must wait for the side stream
    assert seen == [high_priority_stream(a[0].device)]
    assert seen[0].priority == torch.cuda.Stream.priority_range()[1]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    for got, ref in zip(a, b):
        torch.testing.assert_close(got.grad, ref.grad, rtol=0, atol=0)
