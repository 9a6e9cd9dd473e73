"""mHC in Megatron-Core's HybridModel: attention, dense-MLP and MoE layers (one sublayer each)."""

import argparse

import pytest
import torch
from fixtures.tiny_hybrid import build_tiny_hybrid

from megatron_mhc import MHCConfig
from megatron_mhc.training.small_gpt import TinyGPTSettings, lm_loss, train_on_batch

PATTERN = "*-*E"  # attention, MLP, attention, MoE
MHC = dict(expansion_rate=4, kernel_backend="torch")


def _tokens():
    return torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))


def test_function_preserving_mhc_hybrid_equals_plain(megatron_cpu):
    from megatron_mhc.core.layer import MHCLayerMixin

    plain = build_tiny_hybrid(TinyGPTSettings(), PATTERN)
    mhc = build_tiny_hybrid(TinyGPTSettings(), PATTERN,
                            MHCConfig(init_method="function_preserving", **MHC))
    layers = list(mhc.decoder.layers)
    assert all(isinstance(layer, MHCLayerMixin) for layer in layers)
    # One sublayer per hybrid layer: attention layers get attn_hc only, MLP/MoE layers mlp_hc.
    assert [(layer.attn_hc is not None, layer.mlp_hc is not None) for layer in layers] == [
        (True, False), (False, True), (True, False), (False, True)]
    missing, unexpected = mhc.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("_hc." in k for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(mhc, _tokens()), lm_loss(plain, _tokens()),
                                   rtol=1e-5, atol=1e-6)


def test_mhc_hybrid_trains(megatron_cpu):
    model = build_tiny_hybrid(TinyGPTSettings(), PATTERN, MHCConfig(**MHC))
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = train_on_batch(model, tokens, steps=25)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("pattern", ["M*M-", "*G-"])
def test_hybrid_patterns_with_mamba_or_gdn_are_refused(pattern):
    from megatron_mhc.training import hooks

    args = argparse.Namespace(enable_mhc=True, hybrid_layer_pattern=pattern)
    for name in hooks.ARG_DESTS.values():
        setattr(args, name, None)
    args.mhc_log_interval = None
    with pytest.raises(ValueError, match="--hybrid-layer-pattern.*not covered by mHC"):
        hooks.validate_mhc_args(args)
