"""mHC around MoE MLPs (router, SequentialMLP experts, alltoall dispatcher, aux loss)."""

import pytest
import torch
from dist_workers import moe_loss_and_grads, spawn

from megatron_mhc import MHCConfig

MHC = dict(expansion_rate=4, kernel_backend="torch")


def test_moe_expert_parallel_matches_single_rank(tmp_path):
    """EP=2 (experts split over two ranks, tokens exchanged by Megatron's alltoall dispatcher)
    gives the EP=1 loss, router and mHC gradients, and the same tracked aux loss."""
    ep1, ep2 = tmp_path / "ep1.pt", tmp_path / "ep2.pt"
    spawn(moe_loss_and_grads, 1, str(ep1), MHC, None)
    spawn(moe_loss_and_grads, 2, str(ep2), MHC, str(ep1))
    one, two = torch.load(ep1), torch.load(ep2)
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6)
    assert one["aux"] and one["aux"].keys() == two["aux"].keys()
    for name in one["aux"]:
        torch.testing.assert_close(two["aux"][name], one["aux"][name], rtol=1e-5, atol=1e-7)
    assert any("_hc." in n for n in one["grads"]) and any("router" in n for n in one["grads"])
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("shared_experts", [False, True])
def test_function_preserving_mhc_moe_equals_plain_moe(megatron_cpu, shared_experts):
    """The mHC layer wraps the MoE MLP exactly as a dense one: a function-preserving mHC MoE model
    computes the plain MoE model's loss and the same MoE aux (load-balancing) loss."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    from megatron_mhc.core.layer import MHCLayerMixin
    from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, lm_loss

    extra = dict(moe_shared_expert_intermediate_size=64) if shared_experts else {}
    settings = TinyGPTSettings(num_layers=2, num_moe_experts=4, extra_config=extra)
    plain = build_tiny_gpt(settings, plain=True)
    mhc = build_tiny_gpt(settings, MHCConfig(init_method="function_preserving", **MHC))
    assert isinstance(mhc.decoder.layers[0], MHCLayerMixin)
    assert type(mhc.decoder.layers[0].mlp).__name__ == "MoELayer"
    assert (getattr(mhc.decoder.layers[0].mlp, "shared_experts", None) is not None) == shared_experts
    mhc.load_state_dict(plain.state_dict(), strict=False)
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    losses, aux = [], []
    for model in (plain, mhc):
        clear_aux_losses_tracker()
        loss = lm_loss(model, tokens)
        loss.backward()
        losses.append(loss.detach())
        aux.append({k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert aux[0] and aux[0].keys() == aux[1].keys()
    for name in aux[0]:
        torch.testing.assert_close(aux[1][name], aux[0][name], rtol=1e-5, atol=1e-7)
    router = mhc.decoder.layers[0].mlp.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_mhc_moe_model_trains(megatron_cpu):
    from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, train_on_batch

    model = build_tiny_gpt(TinyGPTSettings(num_layers=2, num_moe_experts=4), MHCConfig(**MHC))
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    start = [p.detach().clone() for n, p in model.named_parameters() if "_hc." in n]
    losses = train_on_batch(model, tokens, steps=25)
    assert losses[-1] < 0.6 * losses[0], losses
    moved = [not torch.equal(a, p) for a, (n, p) in zip(
        start, [(n, p) for n, p in model.named_parameters() if "_hc." in n])]
    assert all(moved)
