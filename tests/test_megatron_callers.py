"""Every way Megatron-Core 0.19 reaches a layer: runs mHC (tested against plain ``forward()``) or
is refused by name.

Runs mHC: Megatron's full activation recompute (uniform and block), selective recompute of each
module that lives inside a sublayer, ``--mlp-chunks-for-training`` — each gives the loss and every
gradient of the same model without the feature; TE's graph-capture function run eagerly gives the
layer's ``forward()`` (the expert-parallel overlap schedule: tests/test_ep_overlap.py). Refused:
each feature of ``megatron_mhc.core.compat.REFUSED_FEATURES`` and each refused combination at
argument validation (through Megatron's own argument parser, so a renamed flag fails here) and at
layer construction; the dynamic inference engine stops at the layer.
"""

import argparse
import contextlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_mhc import MHCConfig
from megatron_mhc.core.compat import REFUSED_FEATURES
from megatron_mhc.training import hooks
from megatron_mhc.training.small_gpt import (
    TinyGPTSettings,
    build_tiny_gpt,
    causal_lm_inputs,
    lm_loss,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def _tokens(seed: int, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (2, seq + 1), generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(settings: TinyGPTSettings, mhc_config: MHCConfig, state=None):
    torch.manual_seed(11)
    model = build_tiny_gpt(settings, mhc_config)
    if state is not None:
        model.load_state_dict(state)
    loss = lm_loss(model, _tokens(5, settings.seq_length))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return model, loss.detach(), grads


def _assert_same_training_step(extra_config: dict, mhc_config: MHCConfig, num_moe_experts=None,
                               common_config=None, grad_rel_error: float = 0.0):
    """The model with ``extra_config`` gives the loss and gradients of the same weights without
    it (both with ``common_config``); every mHC parameter gets a gradient. ``grad_rel_error``:
    the largest gradient difference allowed, relative to the gradient's largest magnitude."""
    common_config = dict(common_config or {})
    base = TinyGPTSettings(num_layers=3, hidden_size=32, seq_length=16,
                           num_moe_experts=num_moe_experts, extra_config=common_config)
    model, loss0, grads0 = _loss_and_grads(base, mhc_config)
    variant = TinyGPTSettings(num_layers=3, hidden_size=32, seq_length=16,
                              num_moe_experts=num_moe_experts,
                              extra_config=common_config | extra_config)
    _, loss1, grads1 = _loss_and_grads(variant, mhc_config, model.state_dict())
    # Recomputation replays the same float32 CPU ops: every case measured bit-identical
    # (loss and gradients) on CPU; chunked MLPs sum in another order (see their test).
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    mhc_params = [n for n, _ in model.named_parameters() if "_hc." in n]
    assert mhc_params and set(mhc_params) <= grads0.keys()
    assert grads1.keys() == grads0.keys()
    for name, grad in grads0.items():
        error = (grads1[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-30)
        assert error <= grad_rel_error, f"{name}: relative gradient error {error:.3g}"


# ------------------------------------------------------------------ callers that run mHC
MHC_TORCH = MHCConfig(expansion_rate=4, kernel_backend="torch")


@pytest.fixture
def cpu_recompute(megatron_cpu, monkeypatch):
    """Megatron's activation checkpoint saves and restores the CUDA RNG state: without a GPU
    there is none (the CPU generator, which the dropout-free tiny model never draws from, is
    still saved and restored). Undone after the test."""
    from megatron.core.tensor_parallel import random as tp_random

    if not torch.cuda.is_available():
        monkeypatch.setattr(tp_random, "_get_cuda_rng_state", lambda *a, **k: None)
        monkeypatch.setattr(tp_random, "_set_cuda_rng_state", lambda *a, **k: None)
    if not tp_random.HAVE_TE:
        # Megatron 0.19's CheckpointWithoutOutput (the layernorm recompute) always takes its
        # FP8 branch (``fp8 is not None`` with the default fp8=False), whose names come from
        # Transformer-Engine: stand in for them with FP8 off.
        monkeypatch.setattr(tp_random, "FP8GlobalStateManager", SimpleNamespace(
            is_fp8_enabled=lambda: False, get_fp8_recipe=lambda: None), raising=False)
        for name in ("activation_recompute_forward", "fp8_autocast"):
            monkeypatch.setattr(tp_random, name, lambda **kwargs: contextlib.nullcontext(),
                                raising=False)


@pytest.mark.parametrize("method, num_layers", [("uniform", 1), ("uniform", 2), ("block", 2)])
def test_full_activation_recompute_runs_mhc(cpu_recompute, method, num_layers):
    _assert_same_training_step(
        dict(recompute_granularity="full", recompute_method=method,
             recompute_num_layers=num_layers), MHC_TORCH)


def test_full_activation_recompute_with_mhc_recompute_blocks(cpu_recompute):
    _assert_same_training_step(
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        MHCConfig(expansion_rate=4, kernel_backend="torch", recompute_block=2))


@pytest.mark.parametrize("modules", [["core_attn"], ["mlp"], ["layernorm"], ["core_attn", "mlp"]])
def test_selective_recompute_runs_mhc(cpu_recompute, modules):
    _assert_same_training_step(dict(recompute_granularity="selective", recompute_modules=modules),
                               MHC_TORCH)


@pytest.mark.parametrize("modules", [["moe"], ["layernorm"], ["shared_experts"]])
def test_selective_recompute_of_moe_runs_mhc(cpu_recompute, modules):
    _assert_same_training_step(dict(recompute_granularity="selective", recompute_modules=modules),
                               MHC_TORCH, num_moe_experts=4,
                               common_config=dict(moe_shared_expert_intermediate_size=32))


def test_mlp_chunks_for_training_runs_mhc(megatron_cpu):
    # Measured on CPU: loss identical, largest gradient difference 2.4e-7 of the gradient's scale
    # (the chunked MLP's weight gradients sum over two chunks); held to 4x that.
    _assert_same_training_step(dict(mlp_chunks_for_training=2), MHC_TORCH, grad_rel_error=1e-6)


# --------------------------------------------------------------------- refused by flag
#: argv that switches each refused feature on in Megatron's own parser.
FEATURE_ARGV = {
    "--inference-fuse-tp-communication": ["--inference-fuse-tp-communication"],
    "--fine-grained-activation-offloading": ["--fine-grained-activation-offloading"],
    "--cpu-offloading-num-layers": ["--cpu-offloading-num-layers", "1"],
    "--fp32-residual-connection": ["--fp32-residual-connection"],
    "--use-megatron-fsdp": ["--use-megatron-fsdp"],
    "--use-torch-fsdp2": ["--use-torch-fsdp2"],
    "--overlap-dispatch-backward-with-experts-wgrad": [
        "--overlap-dispatch-backward-with-experts-wgrad"],
}
#: Refused graph settings (not in REFUSED_FEATURES: cuda_graph_problems words them) and refused
#: combinations (refused_feature_problems).
GRAPH_ARGV = {
    "--cuda-graph-modules": ["--cuda-graph-impl", "local", "--cuda-graph-modules", "attn"],
    "--cuda-graph-modules moe_router": ["--cuda-graph-impl", "transformer_engine",
                                        "--cuda-graph-modules", "moe_router"],
    "--cuda-graph-impl full_iteration": ["--cuda-graph-impl", "full_iteration"],
    "--recompute-modules layernorm with --overlap-moe-expert-parallel-comm": [
        "--overlap-moe-expert-parallel-comm", "--recompute-granularity", "selective",
        "--recompute-modules", "layernorm"],
    "--delay-wgrad-compute with --cuda-graph-impl transformer_engine": [
        "--overlap-moe-expert-parallel-comm", "--delay-wgrad-compute",
        "--cuda-graph-impl", "transformer_engine"],
}


def _megatron_args(argv):
    """Megatron-LM's own parser with the mHC flags, as the patched ``arguments.py`` builds it."""
    from megatron.training.arguments import add_megatron_arguments

    parser = hooks.add_mhc_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    return parser.parse_args(argv)


def test_every_refused_feature_has_a_command_line_case():
    assert sorted(FEATURE_ARGV) == sorted(f.flag for f in REFUSED_FEATURES)


@pytest.mark.parametrize("flag", sorted(FEATURE_ARGV) + sorted(GRAPH_ARGV))
@pytest.mark.parametrize("variant", ["mhc", "residual"])
def test_refused_feature_stops_at_argument_validation(flag, variant):
    argv = FEATURE_ARGV.get(flag) or GRAPH_ARGV[flag]
    args = _megatron_args(["--enable-mhc", "--mhc-variant", variant] + argv)
    before = dict(vars(args))
    with pytest.raises(ValueError, match=re.escape(flag.split()[0])):
        hooks.validate_mhc_args(args)
    assert vars(args) == before
    hooks.validate_mhc_args(_megatron_args(argv if variant == "mhc" else []))  # without mHC: ok
    hooks.validate_mhc_args(_megatron_args(["--enable-mhc", "--mhc-variant", variant]))


def test_accepted_megatron_features_pass_argument_validation():
    """What runs mHC (tested above and in test_mtp.py) is not refused by the same validation."""
    for argv in (["--mtp-num-layers", "2"], ["--recompute-granularity", "full",
                                             "--recompute-method", "uniform"],
                 ["--recompute-granularity", "selective", "--recompute-modules", "core_attn",
                  "mlp", "layernorm", "moe", "shared_experts"],
                 ["--mlp-chunks-for-training", "2"], ["--cuda-graph-impl", "local"],
                 ["--cuda-graph-impl", "transformer_engine"],
                 ["--cuda-graph-impl", "transformer_engine", "--cuda-graph-modules", "attn"],
                 ["--overlap-moe-expert-parallel-comm", "--ep-overlap-early-attn-memory-release"],
                 ["--overlap-moe-expert-parallel-comm", "--delay-wgrad-compute"],
                 ["--overlap-moe-expert-parallel-comm", "--recompute-granularity", "selective",
                  "--recompute-modules", "core_attn", "mlp", "shared_experts"]):
        hooks.validate_mhc_args(_megatron_args(["--enable-mhc"] + argv))


def test_hybrid_mtp_depths_are_refused():
    args = _megatron_args(["--enable-mhc", "--hybrid-layer-pattern", "*-*-/*-"])
    with pytest.raises(ValueError, match="--hybrid-layer-pattern .* multi-token-prediction"):
        hooks.validate_mhc_args(args)
    hooks.validate_mhc_args(_megatron_args(["--enable-mhc", "--hybrid-layer-pattern", "*-*-"]))


#: TransformerConfig fields that switch each refused feature on (the FSDP flags live in DDP's
#: config and args only: refused at validation above).
CONFIG_FIELDS = {
    "--inference-fuse-tp-communication": dict(inference_fuse_tp_communication=True),
    "--fine-grained-activation-offloading": dict(fine_grained_activation_offloading=True),
    "--cpu-offloading-num-layers": dict(cpu_offloading=True),
    "--fp32-residual-connection": dict(fp32_residual_connection=True),
    "--delay-wgrad-compute with --cuda-graph-impl transformer_engine": dict(
        overlap_moe_expert_parallel_comm=True, delay_wgrad_compute=True,
        cuda_graph_impl="transformer_engine"),
    "--overlap-dispatch-backward-with-experts-wgrad": dict(
        overlap_dispatch_backward_with_experts_wgrad=True),
    "--cuda-graph-impl full_iteration": dict(cuda_graph_impl="full_iteration"),
    "--recompute-modules layernorm with --overlap-moe-expert-parallel-comm": dict(
        overlap_moe_expert_parallel_comm=True, recompute_granularity="selective",
        recompute_modules=["layernorm"]),
}


@pytest.mark.parametrize("flag", sorted(CONFIG_FIELDS))
def test_refused_feature_stops_at_layer_construction(megatron_cpu, flag):
    from megatron_mhc.core.layer import MHCTransformerLayer
    from megatron_mhc.core.specs import get_gpt_layer_with_mhc_spec
    from megatron_mhc.training.small_gpt import tiny_transformer_config

    config = tiny_transformer_config(TinyGPTSettings(num_layers=2, hidden_size=32))
    for name, value in CONFIG_FIELDS[flag].items():  # set after __post_init__'s own checks
        setattr(config, name, value)
    spec = get_gpt_layer_with_mhc_spec(MHC_TORCH, normalization="RMSNorm")
    with pytest.raises(ValueError, match=re.escape(flag.split()[0])):
        MHCTransformerLayer(config, spec.submodules, layer_number=1, mhc_config=MHC_TORCH)


# ------------------------------------- the TE graph-capture function computes forward()
def test_te_graph_capture_function_computes_the_layer_forward(megatron_cpu):
    """``_te_cuda_graph_capture`` (what ``--cuda-graph-impl transformer_engine`` captures) calls the
    sublayer methods itself; run eagerly it gives the layer's own ``forward()`` output, streams
    and merges included. (Captured replay on a GPU: ``tests/test_gpu_te.py``.)"""
    model = build_tiny_gpt(TinyGPTSettings(num_layers=3, hidden_size=32, seq_length=16), MHC_TORCH)
    hidden = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(2))
    mask = causal_lm_inputs(_tokens(1))[3]
    for layer in model.decoder.layers:
        expected, _ = layer(hidden, attention_mask=mask)
        (captured,) = layer._te_cuda_graph_capture(hidden, attention_mask=mask)
        torch.testing.assert_close(captured, expected, rtol=0, atol=0)
        assert captured.shape[-1] == (32 if layer.is_last_mhc_layer else 4 * 32)
        hidden = expected


class _ReplayWithoutHostCode:
    """Stands in for one of TE's graphed callables of a layer: computes what the captured
    ``_te_cuda_graph_capture`` computes, but, as a graph replay, leaves no host-side state behind
    (the layer's open pass is what it was before)."""

    def __init__(self, layer):
        self.layer = layer
        self.replays = 0

    def __call__(self, *args, **kwargs):
        before = self.layer._mhc_open_pass
        outputs = self.layer._te_cuda_graph_capture(*args, **kwargs)
        self.layer._mhc_open_pass = before
        self.replays += 1
        return outputs


@pytest.mark.parametrize("modules, experts", [(["attn"], None), ([], None), (["attn"], 4)],
                         ids=["attn-scope", "whole-layer", "attn-scope-moe"])
def test_te_graph_replay_without_host_state_equals_forward(megatron_cpu, monkeypatch, modules,
                                                           experts):
    """The plumbing of ``--cuda-graph-impl transformer_engine`` on CPU: Megatron's own replay path
    (``__call__`` -> ``_te_cuda_graph_replay`` -> the graph -> the MLP side eagerly when the scope
    is ``attn``) with stand-in graphs that run no host code gives ``forward()``'s loss and every
    gradient (dense, and MoE with the ``attn`` scope). The captured replay on a GPU:
    ``tests/test_gpu_te.py::test_te_layer_graphs_replay_equals_eager``."""
    from megatron.core.transformer.enums import CudaGraphModule

    torch.manual_seed(0)
    tokens = _tokens(4)
    settings = TinyGPTSettings(num_layers=3, hidden_size=32, seq_length=16,
                               num_moe_experts=experts)
    model = build_tiny_gpt(settings, MHC_TORCH)
    state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    loss0 = lm_loss(model, tokens)
    loss0.backward()
    grads0 = {n: p.grad.clone() for n, p in model.named_parameters()}

    model = build_tiny_gpt(settings, MHC_TORCH)
    model.load_state_dict(state, strict=False)
    monkeypatch.setattr(model.config, "cuda_graph_impl", "transformer_engine")
    monkeypatch.setattr(model.config, "cuda_graph_modules",
                        [CudaGraphModule[m] for m in modules])
    from megatron.core.transformer.module import GraphableMegatronModule

    for module in model.modules():  # what their constructors do under this flag
        if isinstance(module, GraphableMegatronModule):
            module.cuda_graphs, module.cuda_graph_manual_hooks = [], []
    graphs = []
    for layer in model.decoder.layers:
        graphs.append(_ReplayWithoutHostCode(layer))
        layer.cuda_graphs = [graphs[-1]]
        # Megatron's version imports TE to build a zero mask; the stand-in takes the arguments.
        monkeypatch.setattr(layer, "_get_te_cuda_graph_replay_args", lambda *a, **k: (a, k))
        layer._mhc_open_pass = None
    loss1 = lm_loss(model, tokens)
    loss1.backward()
    assert all(graph.replays == 1 for graph in graphs)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name, grad in grads0.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-6,
                                   atol=1e-7, msg=name)


def test_mlp_side_refuses_a_foreign_stream_unless_a_te_graph_replayed(megatron_cpu,
                                                                      monkeypatch):
    """Under ``--cuda-graph-impl transformer_engine`` the MLP side opens its own pass for a stream
    it did not see (the attention side's graph replayed) only once the layer has captured graphs,
    and only for an n*C-wide stream; otherwise it stops."""
    model = build_tiny_gpt(TinyGPTSettings(num_layers=2, hidden_size=32, seq_length=16), MHC_TORCH)
    layer = model.decoder.layers[1]
    foreign = torch.randn(16, 2, 4 * 32, generator=torch.Generator().manual_seed(6))
    with pytest.raises(RuntimeError, match="not this layer's attention output"):
        layer._mlp_entry(foreign)  # no TE graphs
    monkeypatch.setattr(model.config, "cuda_graph_impl", "transformer_engine")
    layer.cuda_graphs = []
    with pytest.raises(RuntimeError, match="no captured TE graph"):
        layer._mlp_entry(foreign)  # TE graphs, none captured yet
    layer.cuda_graphs = [object()]
    with pytest.raises(RuntimeError, match="stream width 32, n\\*C = 128"):
        layer._mlp_entry(foreign[..., :32])
    aggregate, stream = layer._mlp_entry(foreign)
    assert aggregate.shape == (16, 2, 32) and stream.shape == foreign.shape


def test_te_graph_static_inputs_are_n_streams_wide_after_the_first_layer(megatron_cpu,
                                                                          monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    model = build_tiny_gpt(TinyGPTSettings(num_layers=3, hidden_size=32, seq_length=16), MHC_TORCH)
    widths = [layer.get_layer_static_inputs(16, 2)["hidden_states"].shape
              for layer in model.decoder.layers]
    assert widths == [(16, 2, 32), (16, 2, 4 * 32), (16, 2, 4 * 32)]


def test_entry_norm_refuses_to_run_the_mlp_entry_inside_a_layernorm_recompute(megatron_cpu):
    """The pre-MLP norm module runs the MLP entry when the EP-overlap callables call it on the
    stream; inside Megatron's layernorm recompute (no autograd) it stops instead of building an
    entry no gradient reaches (the flag combination is refused at validation too)."""
    model = build_tiny_gpt(TinyGPTSettings(num_layers=2, hidden_size=32, seq_length=16), MHC_TORCH)
    layer = model.decoder.layers[0]
    hidden = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(5))
    mask = causal_lm_inputs(_tokens(1))[3]
    stream, _ = layer._forward_attention(hidden, attention_mask=mask)
    layer.recompute_pre_mlp_layernorm = True
    with torch.no_grad(), pytest.raises(RuntimeError, match="--recompute-modules layernorm"):
        layer.pre_mlp_layernorm(stream)
    layer.recompute_pre_mlp_layernorm = False
    normed, residual = layer.pre_mlp_layernorm(stream)  # the callables' path: entry + norm
    assert normed.shape[-1] == 32 and residual.shape[-1] == 4 * 32
    assert layer.pre_mlp_layernorm(normed).shape == normed.shape  # C wide: the norm alone


def test_dynamic_inference_context_stops_at_the_layer(megatron_cpu):
    from megatron.core.inference.contexts import StaticInferenceContext

    model = build_tiny_gpt(TinyGPTSettings(num_layers=2, hidden_size=32, seq_length=16), MHC_TORCH)
    hidden = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(3))

    class DynamicLike(StaticInferenceContext):
        def is_static_batching(self):
            return False

    context = DynamicLike(max_batch_size=2, max_sequence_length=16)
    with pytest.raises(NotImplementedError, match="dynamic inference engine"):
        model.decoder.layers[0](hidden, attention_mask=None, inference_context=context)


# --------------------------------------------------------------------------- the README
def test_readme_audit_table_names_every_refused_flag():
    text = README.read_text(encoding="utf-8")
    start = text.index("## Which Megatron-Core paths run mHC")
    section = text[start:text.index("\n## ", start + 1)]
    for flag in sorted(FEATURE_ARGV) + sorted(GRAPH_ARGV):
        for part in flag.split(" with "):  # a refused combination: each flag named
            assert f"`{part}" in section, f"README's audit table does not name {part}"
