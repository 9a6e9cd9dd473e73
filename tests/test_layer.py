"""The mHC layer inside an unmodified Megatron-Core GPTModel (CPU, gloo, world size 1)."""

import pytest
import torch

from megatron_mhc import MHCConfig
from megatron_mhc.core.hyper_connection import HyperConnection
from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, lm_loss, train_on_batch


def _tokens(seed, batch=4, seq=32, vocab=256):
    return torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


def _mhc_param_names(model):
    return {name for name, _ in model.named_parameters() if "_hc." in name}


@pytest.mark.parametrize(
    "variant, n", [("mhc", 4), ("mhc", 2), ("hc", 4), ("residual", 1)]
)
def test_function_preserving_init_equals_plain_model(megatron_cpu, variant, n):
    settings = TinyGPTSettings(num_layers=3)
    plain = build_tiny_gpt(settings, plain=True)
    mhc = build_tiny_gpt(
        settings,
        MHCConfig(
            expansion_rate=n,
            variant=variant,
            init_method="function_preserving",
            kernel_backend="torch",
        ),
    )
    missing, unexpected = mhc.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == _mhc_param_names(mhc)
    assert len(missing) == (0 if variant == "residual" else 3 * 2 * settings.num_layers)
    tokens = _tokens(0)
    with torch.no_grad():
        expected = lm_loss(plain, tokens)
        got = lm_loss(mhc, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_streams_are_expanded_between_layers_and_merged_at_the_end(megatron_cpu):
    settings = TinyGPTSettings(num_layers=3, hidden_size=32)
    model = build_tiny_gpt(settings, MHCConfig(expansion_rate=4, kernel_backend="torch"))
    shapes = []
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out[0].shape)))
    with torch.no_grad():
        lm_loss(model, _tokens(1, batch=2, seq=8))
    assert shapes == [(8, 2, 4 * 32), (8, 2, 4 * 32), (8, 2, 32)]


def test_mhc_gpt_trains_and_every_mhc_param_learns(megatron_cpu):
    settings = TinyGPTSettings(num_layers=2)
    model = build_tiny_gpt(settings, MHCConfig(expansion_rate=4, kernel_backend="torch"))
    hcs = [m for m in model.modules() if isinstance(m, HyperConnection)]
    assert len(hcs) == 4
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "_hc." in name}
    losses = train_on_batch(model, _tokens(2), steps=30)
    assert losses[-1] < 0.5 * losses[0], losses
    for name, p in model.named_parameters():
        if name in before:
            assert not torch.equal(p, before[name]), f"{name} did not change"


def test_hc_variant_trains(megatron_cpu):
    model = build_tiny_gpt(TinyGPTSettings(), MHCConfig(variant="hc", kernel_backend="torch"))
    losses = train_on_batch(model, _tokens(3), steps=20)
    assert losses[-1] < 0.7 * losses[0]


def test_unsupported_megatron_features_are_refused(megatron_cpu):
    settings = TinyGPTSettings(extra_config=dict(fp32_residual_connection=True))
    with pytest.raises(ValueError, match="--fp32-residual-connection is not supported with mHC"):
        build_tiny_gpt(settings, MHCConfig(kernel_backend="torch"))



def test_function_preserving_in_bf16(megatron_cpu):
    """A bf16 model (Megatron's Float16Module casts the whole model, mHC parameters included):
    b_pre = logit(1/n) rounds to bf16 (H_pre = 0.2495 at n = 4, the aggregate 0.998 x), which
    the sublayer's input norm removes up to rounding."""
    settings = TinyGPTSettings(num_layers=3)
    plain = build_tiny_gpt(settings, plain=True)
    mhc = build_tiny_gpt(settings, MHCConfig(init_method="function_preserving",
                                             kernel_backend="torch"))
    mhc.load_state_dict(plain.state_dict(), strict=False)
    plain, mhc = plain.bfloat16(), mhc.bfloat16()
    assert mhc.decoder.layers[0].attn_hc.bias.dtype == torch.bfloat16
    tokens = _tokens(0)
    with torch.no_grad():
        expected = lm_loss(plain, tokens)
        got = lm_loss(mhc, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)



def test_the_norms_layer_reference_follows_a_deep_copy():
    """The pre-MLP norm reaches its layer's MLP entry through a reference that a deep copy of the
    layer (an EMA copy, say, where the model allows one) points at the copy, not the original."""
    import copy

    from megatron_mhc.core.layer import _LayerRef

    layer = torch.nn.Module()
    layer.norm = torch.nn.Identity()
    layer.norm._mhc_layer = _LayerRef(layer)
    clone = copy.deepcopy(layer)
    assert layer.norm._mhc_layer() is layer
    assert clone.norm._mhc_layer() is clone
    alone = copy.deepcopy(layer.norm)  # the norm alone still points at its layer
    assert alone._mhc_layer() is layer
