"""Multi-token prediction (``--mtp-num-layers``) with mHC.

The MTP block takes the decoder's output, which the last mHC layer has merged back to C wide (the
same contraction of the n streams the output head sees), and runs Megatron's plain layers built
from Megatron's own layer spec, as ``gpt_builders.py`` / ``training/models/gpt.py`` build them.
Tested: a function-preserving mHC model with MTP computes the plain model's main and MTP losses
and gradients; every parameter (mHC and MTP) is trained; PP = 2 gives PP = 1's losses, mHC and
MTP gradients; an mHC layer built inside the MTP block is refused; the checkpoint converter carries
the MTP parameters over and its output loads into an mHC model with MTP.
"""

import dataclasses

import pytest
import torch
from dist_workers import pipeline_losses_and_grads, spawn

from megatron_mhc import MHCConfig
from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, lm_loss

MHC = dict(expansion_rate=4, kernel_backend="torch")


def _tokens(seed):
    return torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def mtp_tracker(megatron_cpu, monkeypatch):
    """Megatron's process-wide MTP loss tracker, fresh for the test and restored after it."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    monkeypatch.setattr(MTPLossLoggingHelper, "tracker", {})
    return MTPLossLoggingHelper


def _mtp_losses(tracker):
    values = tracker.tracker["loss_values"].clone()
    tracker.clean_metrics_in_tracker()
    return values


@pytest.mark.parametrize("mtp_num_layers", [1, 2])
def test_function_preserving_mhc_with_mtp_equals_plain_with_mtp(mtp_tracker, mtp_num_layers):
    settings = TinyGPTSettings(num_layers=2, hidden_size=32, seq_length=16,
                               extra_config=dict(mtp_num_layers=mtp_num_layers))
    torch.manual_seed(2)
    plain = build_tiny_gpt(settings, plain=True)
    mhc = build_tiny_gpt(settings, MHCConfig(init_method="function_preserving", **MHC))
    assert len(mhc.mtp.layers) == mtp_num_layers
    missing, unexpected = mhc.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("_hc." in key for key in missing)
    results = []
    for model in (plain, mhc):
        loss = lm_loss(model, _tokens(3))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "_hc." not in n}
        results.append((loss.detach(), _mtp_losses(mtp_tracker), grads))
    (loss0, mtp0, grads0), (loss1, mtp1, grads1) = results
    # Function-preserving mHC at init: the streams are copies, H_pre = 1/n each, H_post = 1,
    # H_res doubly stochastic: equal up to float32 rounding of the n-stream sums. Measured on CPU
    # (1 / 2 MTP layers): main loss identical, MTP losses 0 / 4.8e-7 apart, gradients 3.8e-7 /
    # 5.4e-7 of their largest magnitude; held to about 4x that.
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert mtp0.shape == (mtp_num_layers,) and bool((mtp0 > 0).all())
    torch.testing.assert_close(mtp1, mtp0, rtol=0, atol=2e-6)
    assert grads0.keys() == grads1.keys() and any(k.startswith("mtp.") for k in grads0)
    for name, grad in grads0.items():
        error = (grads1[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-30)
        assert error <= 2e-6, f"{name}: relative gradient error {error:.3g}"


def test_mhc_with_mtp_trains_every_parameter(mtp_tracker):
    settings = TinyGPTSettings(num_layers=2, hidden_size=32, seq_length=16,
                               extra_config=dict(mtp_num_layers=1))
    model = build_tiny_gpt(settings, MHCConfig(**MHC))
    lm_loss(model, _tokens(4)).backward()
    assert bool((_mtp_losses(mtp_tracker) > 0).all())
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad
    mtp_grads = [p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith("mtp.")]
    assert mtp_grads and all(g > 0 for g in mtp_grads)


def test_mhc_layer_inside_the_mtp_block_is_refused(megatron_cpu):
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_mhc.core.specs import get_gpt_layer_with_mhc_spec
    from megatron_mhc.training.small_gpt import (
        tiny_block_spec,
        tiny_mtp_block_spec,
        tiny_transformer_config,
    )

    config = tiny_transformer_config(TinyGPTSettings(num_layers=2, hidden_size=32,
                                                     extra_config=dict(mtp_num_layers=1)))
    spec = get_gpt_layer_with_mhc_spec(MHCConfig(**MHC), normalization="RMSNorm")
    # Megatron's GPT builder refuses a non-TransformerLayer spec for MTP itself; other builders
    # (HybridModel's MTP depths) put the model's layer specs into the MTP block as they are.
    mtp_spec = tiny_mtp_block_spec(config)
    mtp_layer = mtp_spec.layer_specs[0]
    mtp_layer = dataclasses.replace(mtp_layer, submodules=dataclasses.replace(
        mtp_layer.submodules, mtp_model_layer=tiny_block_spec(spec, 1).layer_specs[0]))
    mtp_spec = dataclasses.replace(mtp_spec, layer_specs=[mtp_layer])
    with pytest.raises(ValueError, match="inside a multi-token-prediction block"):
        GPTModel(config=config, transformer_layer_spec=tiny_block_spec(spec, 2), vocab_size=256,
                 max_sequence_length=16, position_embedding_type="learned_absolute",
                 mtp_block_spec=mtp_spec)


@pytest.fixture(scope="module")
def mtp_pp1(tmp_path_factory):
    path = tmp_path_factory.mktemp("mtp_pp1") / "result.pt"
    spawn(pipeline_losses_and_grads, 1, str(path), None, MHC, None, 1, False, 1)
    return path


@pytest.mark.slow
def test_mtp_with_pipeline_parallelism_matches_pp1(tmp_path, mtp_pp1):
    """PP = 2 (the MTP block on the last stage, with its own copy of the embedding) gives PP = 1's
    losses, mHC gradients and MTP gradients; both start from PP = 1's weights."""
    path = tmp_path / "pp2.pt"
    spawn(pipeline_losses_and_grads, 2, str(path), None, MHC, None, 1, False, 1, str(mtp_pp1))
    one, two = torch.load(mtp_pp1), torch.load(path)
    assert len(one["losses"]) == len(two["losses"]) == 4
    # Measured on CPU: losses and every gradient identical (the stages run the same float32 ops).
    torch.testing.assert_close(torch.stack(two["losses"]), torch.stack(one["losses"]),
                               rtol=0, atol=0)
    assert one["grads"].keys() == two["grads"].keys()
    assert any(k.startswith("mtp.") for k in one["grads"])
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=0, atol=0, msg=name)


def test_plain_to_mhc_conversion_keeps_the_mtp_block(mtp_tracker, tmp_path):
    """``megatron-mhc convert plain-to-mhc`` adds mHC parameters to the decoder layers only and
    carries the MTP block's parameters over: the converted checkpoint loads into an mHC model with
    MTP (nothing missing) and gives the plain model's main and MTP losses."""
    import argparse

    from megatron.core import dist_checkpointing

    from megatron_mhc.tools.convert import convert

    settings = TinyGPTSettings(num_layers=2, hidden_size=32, seq_length=16,
                               extra_config=dict(mtp_num_layers=1))
    torch.manual_seed(5)
    plain = build_tiny_gpt(settings, plain=True)
    with torch.no_grad():
        plain_loss = lm_loss(plain, _tokens(6))
    plain_mtp = _mtp_losses(mtp_tracker)
    src, out = tmp_path / "plain", tmp_path / "mhc"
    (src / "iter_0000007").mkdir(parents=True)
    args = argparse.Namespace(hidden_size=32, num_layers=2, init_method_std=0.02,
                              mtp_num_layers=1)
    dist_checkpointing.save({"model": plain.sharded_state_dict(), "args": args, "iteration": 7},
                            str(src / "iter_0000007"))
    (src / "latest_checkpointed_iteration.txt").write_text("7")
    mhc_config = MHCConfig(**MHC)
    convert("plain-to-mhc", src, out, mhc_config=mhc_config)

    torch.manual_seed(99)  # another init: every value must come from the checkpoint
    model = build_tiny_gpt(settings, mhc_config)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(out / "iter_0000007"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")]
    assert set(unexpected) <= {"args", "iteration"}  # the common state comes back too
    for name, tensor in plain.state_dict().items():
        if name.startswith("mtp.") and torch.is_tensor(tensor):
            torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    with torch.no_grad():
        loss = lm_loss(model, _tokens(6))
    # The conversion is function-preserving (gates 0): measured identical on CPU.
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    torch.testing.assert_close(_mtp_losses(mtp_tracker), plain_mtp, rtol=0, atol=0)


def test_gain_metrics_of_a_model_with_mtp_cover_the_decoder(mtp_tracker):
    """The training gain metrics read the decoder's mHC sublayers; the MTP block's plain layers
    have no H_res and add none."""
    from megatron_mhc.training import metrics

    settings = TinyGPTSettings(num_layers=2, hidden_size=32, seq_length=16,
                               extra_config=dict(mtp_num_layers=2))
    model = build_tiny_gpt(settings, MHCConfig(**MHC))
    assert len(metrics.hyper_connections(model)) == 4
    metrics.arm([model])
    try:
        with torch.no_grad():
            lm_loss(model, _tokens(7))
        gains = metrics.collect_gains(num_sublayers=4)
    finally:
        metrics.disarm()
    assert len(gains["layer_forward"]) == 4
    assert gains["composite_backward"] == pytest.approx(1.0, abs=1e-5)
