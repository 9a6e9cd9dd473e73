"""Megatron-Core's expert-parallel overlap schedule (``--overlap-moe-expert-parallel-comm``) runs
mHC: its own schedule nodes compute what ``TransformerBlock.forward`` computes.

The nodes are Megatron-Core 0.19's own ``TransformerLayerSchedulePlan`` objects (what
``combined_1f1b`` builds per layer: ``pre_dispatch_computation``, ``moe_dispatch``, ``mlp``,
``moe_combine``, each a ``TransformerLayerNode`` with its own autograd graph, inputs detached), run
by its own ``TransformerLayerSchedulePlan.run``: first one micro-batch's forward, then the next
micro-batch's forward layer by layer interleaved with the first one's backward (the 1F1B step of
the combined schedule), then the second one's backward. On CPU the CUDA streams and events are
no-ops; everything else is Megatron's code. Compared with the same weights run through
``GPTModel.forward``: both losses and every gradient, for MoE and dense layers (first, middle and
last layer of a 3-layer model), with and without the mHC recompute, on the PyTorch ops and on the
Triton kernels (interpreter).

Each case runs twice: with Megatron's own plans (the MLP merge inside the combine node) and with
the plans the patch set / launcher make (``megatron_mhc.core.schedule_nodes``: the merge as the
``mhc_post`` node in the plan's fifth slot).
"""

import contextlib
import dataclasses
import os

import pytest
import torch
from dist_workers import CPUStream
from fixtures.gpu import destroy_gpu_megatron, init_gpu_megatron, requires_cuda, requires_te

from megatron_mhc import MHCConfig
from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, causal_lm_inputs

SEQ, HIDDEN, LAYERS = 16, 32, 3


@pytest.fixture
def cpu_schedule(megatron_cpu, monkeypatch):
    """Megatron's schedule nodes on CPU: streams, events and ``record_stream`` are no-ops."""
    monkeypatch.setattr(torch.cuda, "stream", lambda *_: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *_: CPUStream())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, *_: None)
    # With one expert-parallel rank the all-to-alls return their input, so a node that frees its
    # input after the forward (the dispatch and combine nodes) would free its output too.
    from megatron.core.models.common.utils import TransformerLayerNode

    monkeypatch.setattr(TransformerLayerNode, "_resolve_free_input",
                        staticmethod(lambda *_: False))


def _batches(num: int):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (2, SEQ + 1), generator=gen) for _ in range(num)]


def _model(mhc_config: MHCConfig, moe: bool, state=None, extra_config=None):
    torch.manual_seed(3)
    settings = TinyGPTSettings(num_layers=LAYERS, hidden_size=HIDDEN, seq_length=SEQ,
                               num_moe_experts=4 if moe else None,
                               extra_config=dict(extra_config or {}))
    model = build_tiny_gpt(settings, mhc_config)
    if state is not None:
        model.load_state_dict(state)
    return model


def _head_loss(model, hidden, labels, normed):
    if not normed:  # Megatron's MoE combine node (or the mhc_post node) applies it to the last layer
        hidden = model.decoder.final_layernorm(hidden)
    logits, _ = model.output_layer(hidden)
    loss = torch.nn.functional.cross_entropy(
        logits.float().transpose(0, 1).reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return loss


def _reference(model, batches):
    """Losses and gradients through ``GPTModel``'s embedding, ``TransformerBlock.forward`` and
    head, one micro-batch after the other."""
    losses = []
    for tokens in batches:
        ids, pos, labels, mask = causal_lm_inputs(tokens)
        hidden = model.embedding(ids, pos)
        hidden = model.decoder(hidden, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(
            model.output_layer(hidden)[0].float().transpose(0, 1).reshape(-1, 256),
            labels.reshape(-1))
        loss.backward()
        losses.append(loss.detach())
    return losses, _grads(model)


def _is_moe(layer):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return isinstance(layer.mlp, MoELayer)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _layer_plans(model, mask, streams, plan_class):
    from megatron.core.models.common.model_chunk_schedule_plan import ModelChunkState

    chunk = ModelChunkState()
    chunk.attention_mask = mask
    chunk.rotary_pos_emb = chunk.rotary_pos_cos = chunk.rotary_pos_sin = None
    chunk.packed_seq_params = chunk.sequence_len_offset = None
    chunk.model = model
    comp, comm, event = streams or (CPUStream(), CPUStream(), CPUStream())
    layers = model.decoder.layers
    return [plan_class(layer, event, chunk, lambda: comp, lambda: comm,
                       extra_args={"is_first_layer": i == 0, "is_last_layer": i == len(layers) - 1})
            for i, layer in enumerate(layers)]


def _megatron_plan_class():
    from megatron.core.models.common.model_chunk_schedule_plan import (
        TransformerLayerSchedulePlan,
    )

    return TransformerLayerSchedulePlan


def _ep_overlap(model, batches, streams=None, plan_class=None, finish_grads=None):
    """Two micro-batches through Megatron's layer schedule plans: F(1); F(2) layer i with B(1)
    layer L-1-i; B(2). Returns the losses and gradients (``finish_grads()`` runs before they are
    read)."""
    plan_class = plan_class or _megatron_plan_class()
    run = plan_class.run
    # Megatron's MoE combine node applies the decoder's final norm after the last layer.
    normed = _is_moe(model.decoder.layers[-1])
    micro = []
    for tokens in batches:
        ids, pos, labels, mask = causal_lm_inputs(tokens)
        embedded = model.embedding(ids, pos)
        micro.append(dict(labels=labels, embedded=embedded,
                          plans=_layer_plans(model, mask, streams, plan_class)))

    event = streams[2] if streams else CPUStream()

    def on_current_stream(fn):
        # As a schedule node: wait for the nodes before, and let the nodes after wait for this.
        def run_ordered(*args):
            current = torch.cuda.current_stream() if streams else None
            event.wait(current)
            fn(*args)
            event.record(current)
        return run_ordered

    @on_current_stream
    def finish_forward(m, hidden):
        # The head runs in its own graph, as PostProcessNode's: the last layer's output detached.
        m["last"] = hidden.detach().requires_grad_()
        m["loss"] = _head_loss(model, m["last"], m["labels"], normed)
        m["loss"].backward()

    @on_current_stream
    def finish_backward(m, grad):
        m["embedded"].backward(grad)  # the first node's input grad, into the embedding

    first, second = micro
    hidden = first["embedded"]
    for plan in first["plans"]:
        hidden, _ = run(plan, None, f_input=hidden)
    finish_forward(first, hidden)

    hidden, grad = second["embedded"], first["last"].grad
    for f_plan, b_plan in zip(second["plans"], reversed(first["plans"])):
        hidden, grad = run(f_plan, b_plan, f_input=hidden, b_grad=grad)
    finish_forward(second, hidden)
    finish_backward(first, grad)

    grad = second["last"].grad
    for b_plan in reversed(second["plans"]):
        _, grad = run(None, b_plan, b_grad=grad)
    finish_backward(second, grad)
    if finish_grads is not None:
        finish_grads()
    return [first["loss"].detach(), second["loss"].detach()], _grads(model)


TORCH = MHCConfig(expansion_rate=4, kernel_backend="torch")
#: case -> (mHC config, MoE layers, TransformerConfig fields of the schedule run only)
CASES = {
    "torch-moe": (TORCH, True, {}),
    "torch-dense": (TORCH, False, {}),
    "torch-moe-recompute": (MHCConfig(expansion_rate=4, kernel_backend="torch",
                                      recompute_block=2), True, {}),
    # The attention side's backward runs before the other micro-batch's MLP forward.
    "torch-moe-early-attn-release": (TORCH, True, {"ep_overlap_early_attn_memory_release": True}),
    "triton-moe-recompute": (MHCConfig(expansion_rate=4, kernel_backend="triton",
                                       recompute_block=2), True, {}),
    "triton-dense": (MHCConfig(expansion_rate=4, kernel_backend="triton"), False, {}),
}


@pytest.fixture
def mhc_post_plans(monkeypatch):
    """Megatron's plan class with the run-time hook the launcher installs
    (``hook_schedule_plans``), undone after the test."""
    from megatron_mhc.core.schedule_nodes import hook_schedule_plans

    plan_class = _megatron_plan_class()
    monkeypatch.setattr(plan_class, "_build_callable_nodes", plan_class._build_callable_nodes)
    assert hook_schedule_plans()
    assert not hook_schedule_plans()  # idempotent
    return plan_class


@pytest.fixture
def patched_plan_class(tmp_path):
    """``TransformerLayerSchedulePlan`` of the installed megatron-core's
    ``model_chunk_schedule_plan.py`` with the patch set's hunks applied (loaded as its own
    module; the installed one is untouched)."""
    import importlib.util
    from pathlib import Path

    import megatron.core.models.common.model_chunk_schedule_plan as installed

    from megatron_mhc.core.schedule_nodes import add_mhc_post_node
    from megatron_mhc.training.patching import PatchSet, apply_hunks

    hunks = PatchSet().hunks["megatron/core/models/common/model_chunk_schedule_plan.py"]
    path = tmp_path / "patched_model_chunk_schedule_plan.py"
    # exact=False: the installed file may be a later 0.19.x one, as `patch apply` accepts.
    path.write_text(apply_hunks(Path(installed.__file__).read_text(), hunks, exact=False))
    spec = importlib.util.spec_from_file_location("patched_model_chunk_schedule_plan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._mhc_add_schedule_nodes is add_mhc_post_node
    return module.TransformerLayerSchedulePlan


def _compare_with_forward(case, plan_class=None, check_plans=None):
    mhc_config, moe, schedule_config = CASES[case]
    if mhc_config.kernel_backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1")
    batches = _batches(2)
    reference_model = _model(mhc_config, moe)
    state = {k: (v.clone() if torch.is_tensor(v) else v)
             for k, v in reference_model.state_dict().items()}
    losses0, grads0 = _reference(reference_model, batches)
    model = _model(mhc_config, moe, state)
    for name, value in schedule_config.items():
        setattr(model.config, name, value)
    losses1, grads1 = _ep_overlap(model, batches, plan_class=plan_class)

    for loss0, loss1 in zip(losses0, losses1):
        torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    mhc_params = {n for n, _ in model.named_parameters() if "_hc." in n}
    assert len(mhc_params) == 3 * 2 * LAYERS
    assert mhc_params <= grads1.keys(), sorted(mhc_params - grads1.keys())
    assert grads1.keys() == grads0.keys()
    for name, grad in grads0.items():
        error = (grads1[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-30)
        assert error <= 1e-5, f"{name}: relative gradient error {error:.3g}"


_CASE_PARAMS = [pytest.param(case, marks=pytest.mark.slow) if case.startswith("triton") else case
                for case in sorted(CASES)]  # the Triton cases: ~2 min each under the interpreter


@pytest.mark.parametrize("case", _CASE_PARAMS)
def test_ep_overlap_schedule_equals_transformer_block_forward(cpu_schedule, case):
    """Megatron's own plans: the MLP merge runs inside the combine node."""
    _compare_with_forward(case)


@pytest.mark.parametrize("case", _CASE_PARAMS)
def test_ep_overlap_schedule_with_mhc_post_node_equals_transformer_block_forward(
        cpu_schedule, mhc_post_plans, case):
    """The plans the launcher makes: the MLP merge of each MoE layer is its own node."""
    _compare_with_forward(case, mhc_post_plans)


def test_patched_schedule_plan_equals_transformer_block_forward(cpu_schedule, patched_plan_class):
    """The patch set's hunk in model_chunk_schedule_plan.py adds the same node."""
    _compare_with_forward("torch-moe-recompute", patched_plan_class)


def _plans_of(case, plan_class, **config_fields):
    mhc_config, moe, _ = CASES[case]
    model = _model(mhc_config, moe)
    for name, value in config_fields.items():
        setattr(model.config, name, value)
    ids, pos, _, mask = causal_lm_inputs(_batches(1)[0])
    return model, _layer_plans(model, mask, None, plan_class)


def test_mhc_post_node_fills_the_fifth_slot_of_moe_layers_only(cpu_schedule, mhc_post_plans):
    from megatron.core.models.common.utils import TransformerLayerNode
    from megatron.core.pipeline_parallel.utils import NoopScheduleNode

    from megatron_mhc.core.schedule_nodes import MHC_POST_NODE

    _, plans = _plans_of("torch-moe", mhc_post_plans)
    for plan in plans:
        assert isinstance(plan.mtp_post_process, TransformerLayerNode)
        assert plan.mtp_post_process.name == MHC_POST_NODE
        assert not plan.mtp_post_process.free_input  # the merge's backward needs its input
        assert plan.moe_combine.is_last_layer is False  # the final norm moved to mhc_post
    assert [p.mtp_post_process.is_last_layer for p in plans] == [False, False, True]
    _, plans = _plans_of("torch-dense", mhc_post_plans)
    assert all(isinstance(p.mtp_post_process, NoopScheduleNode) for p in plans)


def test_megatrons_own_plans_keep_the_merge_in_the_combine_node(cpu_schedule):
    from megatron.core.pipeline_parallel.utils import NoopScheduleNode

    from megatron_mhc.core.schedule_nodes import schedule_plans_are_hooked

    assert not schedule_plans_are_hooked()  # the installed, unpatched megatron-core
    _, plans = _plans_of("torch-moe", _megatron_plan_class())
    assert all(isinstance(p.mtp_post_process, NoopScheduleNode) for p in plans)
    assert plans[-1].moe_combine.is_last_layer is True


def test_mhc_post_node_runs_on_the_high_priority_stream_with_mhc_overlap(
        cpu_schedule, mhc_post_plans, monkeypatch):
    import megatron_mhc.core.schedule_nodes as schedule_nodes

    side, compute = CPUStream(), CPUStream()
    monkeypatch.setattr(schedule_nodes, "high_priority_stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    model, plans = _plans_of("torch-moe", mhc_post_plans)
    assert plans[0].mtp_post_process.stream() is plans[0].mlp.stream()  # compute stream
    for layer in model.decoder.layers:
        layer.mhc_config = dataclasses.replace(layer.mhc_config, overlap=True)
    ids, pos, _, mask = causal_lm_inputs(_batches(1)[0])
    plans = _layer_plans(model, mask, (compute, CPUStream(), CPUStream()), mhc_post_plans)
    assert all(plan.mtp_post_process.stream() is side for plan in plans)
    assert plans[0].mlp.stream() is compute


def test_deferred_merge_is_refused_when_no_merge_was_left(cpu_schedule):
    model, _ = _plans_of("torch-moe", _megatron_plan_class())
    with pytest.raises(RuntimeError, match="no deferred MLP merge to run"):
        model.decoder.layers[0].run_deferred_mlp_merge(torch.randn(SEQ, 2, HIDDEN))


@pytest.fixture
def gpu_schedule(monkeypatch):
    """One GPU, Megatron's schedule nodes on real CUDA streams: compute on the default stream,
    dispatch / combine (and so the MLP merge) on a second stream, ordered by one CUDA event."""
    from megatron.core.models.common.utils import TransformerLayerNode

    init_gpu_megatron(29531)
    monkeypatch.setattr(TransformerLayerNode, "_resolve_free_input",
                        staticmethod(lambda *_: False))  # one EP rank: see cpu_schedule
    yield
    destroy_gpu_megatron()


def _cuda_batches(num: int):
    return [tokens.cuda() for tokens in _batches(num)]


@requires_cuda
@pytest.mark.parametrize("schedule", ["megatron", "mhc_post", "mhc_post-overlap"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("moe", [True, False])
def test_ep_overlap_schedule_on_cuda_streams_equals_forward(gpu_schedule, request, schedule,
                                                            backend, moe):
    """The same comparison on a GPU, the dispatch and combine nodes on a second stream; the MLP
    merge in the combine node (Megatron's plans), in the mhc_post node on the compute stream, or
    in the mhc_post node on the high-priority stream (--mhc-overlap)."""
    plan_class = None if schedule == "megatron" else request.getfixturevalue("mhc_post_plans")
    mhc_config = MHCConfig(expansion_rate=4, kernel_backend=backend, recompute_block=2,
                           overlap=schedule.endswith("overlap"))
    _on_cuda_streams_equals_forward(lambda: _model(mhc_config, moe).cuda(),
                                    lambda: _model(mhc_config, moe).cuda(), plan_class)


def _on_cuda_streams_equals_forward(build_reference, build_scheduled, plan_class,
                                    accumulate_delayed_wgrads=False):
    """Two micro-batches through the layer schedule on CUDA streams (dispatch and combine on a
    second stream, ordered by one event) give the losses and every gradient of the plain forward
    of the same weights (``build_*``: the two models, built alike; ``accumulate_delayed_wgrads``:
    sum TE's deferred weight gradients as Megatron's DDP does, see ``_sum_delayed_wgrads``)."""
    batches = _cuda_batches(2)
    reference_model = build_reference()
    state = {k: (v.clone() if torch.is_tensor(v) else v)
             for k, v in reference_model.state_dict().items()}
    losses0, grads0 = _reference(reference_model, batches)
    model = build_scheduled()
    model.load_state_dict(state)
    streams = (torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Event())
    finish = _sum_delayed_wgrads(model) if accumulate_delayed_wgrads else None
    losses1, grads1 = _ep_overlap(model, batches, streams, plan_class, finish)
    torch.cuda.synchronize()
    for loss0, loss1 in zip(losses0, losses1):
        torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    mhc_params = {n for n, _ in model.named_parameters() if "_hc." in n}
    assert len(mhc_params) == 3 * 2 * LAYERS
    assert grads1.keys() == grads0.keys() and mhc_params <= grads1.keys()
    for name, grad in grads0.items():
        error = (grads1[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-30)
        assert error <= 1e-4, f"{name}: relative gradient error {error:.3g}"


def _sum_delayed_wgrads(model):
    """What Megatron's DDP does for TE's deferred weight gradients: TE's ``backward_dw`` assigns
    ``param.grad`` (no accumulation across micro-batches without ``main_grad``), then calls the
    module's wgrad hooks, where DDP adds the gradient into its buffer and clears it
    (``distributed_data_parallel.py``, params marked ``skip_backward_post_hook``). Registers such
    hooks, summing into a side buffer; returns the function that puts the sums in ``.grad``."""
    sums = {}

    def move_into_sum(param):
        def hook():
            if param.grad is not None:
                sums[param] = sums[param] + param.grad if param in sums else param.grad.clone()
                param.grad = None
        return hook

    hooked = 0
    for module in model.modules():
        if not hasattr(module, "register_wgrad_accumulation_and_reduce_hooks"):
            continue
        for param in module.parameters(recurse=False):
            if getattr(param, "skip_backward_post_hook", False):
                module.register_wgrad_accumulation_and_reduce_hooks(move_into_sum(param))
                hooked += 1
    assert hooked, "no TE module defers its weight gradients"

    def finish():
        for param, total in sums.items():
            param.grad = total if param.grad is None else param.grad + total
    return finish


def _te_moe_gpt(mhc_config: MHCConfig, delay_wgrad: bool):
    """A 3-layer all-MoE GPTModel on Transformer-Engine layers (float32, so the schedule and the
    plain forward can be compared tightly), built with ``--delay-wgrad-compute`` or without."""
    from fixtures.gpu import gpu_config
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_mhc.core.specs import get_gpt_layer_with_mhc_spec

    config = gpu_config(
        dtype=torch.float32, num_layers=LAYERS, hidden_size=64, num_attention_heads=4,
        ffn_hidden_size=128, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=128,
        moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="aux_loss",
        moe_token_dispatcher_type="alltoall")
    # Set after __post_init__ (which wants EP > 1 for the overlap) and before the layers are
    # built: TE's linears read delay_wgrad_compute at construction.
    config.overlap_moe_expert_parallel_comm = config.delay_wgrad_compute = delay_wgrad
    torch.manual_seed(3)
    spec = get_gpt_layer_with_mhc_spec(mhc_config, use_transformer_engine=True, num_experts=4)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=256,
                    max_sequence_length=SEQ, position_embedding_type="rope").cuda()


@requires_te
@pytest.mark.parametrize("delay_wgrad", [False, True], ids=["wgrad-now", "delay-wgrad"])
def test_ep_overlap_on_te_layers_equals_forward(gpu_schedule, mhc_post_plans, delay_wgrad):
    """Transformer-Engine MoE layers through the layer schedule on CUDA streams (mhc_post node),
    with Megatron's ``--delay-wgrad-compute`` (TE's weight gradients deferred to the schedule's
    ``backward_dw`` calls, summed across micro-batches as Megatron's DDP sums them) and without:
    losses and every gradient equal the plain forward's. (Passed on an H100 with TE 2.20.2 before
    the flag was accepted with mHC.)"""
    mhc_config = MHCConfig(expansion_rate=4, kernel_backend="triton")
    _on_cuda_streams_equals_forward(lambda: _te_moe_gpt(mhc_config, delay_wgrad=False),
                                    lambda: _te_moe_gpt(mhc_config, delay_wgrad), mhc_post_plans,
                                    accumulate_delayed_wgrads=delay_wgrad)


# ---------------------------------------------------------------- Megatron's whole schedule, EP = 2
def _whole_step(tmp_path, name, world_size, overlap, hook, mhc_kwargs, vpp=None, mtp=None):
    from dist_workers import ep_overlap_step, spawn

    path = tmp_path / f"{name}.pt"
    spawn(ep_overlap_step, world_size, str(path), overlap, hook, mhc_kwargs, vpp, mtp)
    return torch.load(path)


def _assert_same_step(result, reference):
    assert result["losses"] == reference["losses"] and len(reference["losses"]) == 4
    assert result["grads"].keys() == reference["grads"].keys()
    assert any("_hc." in name for name in reference["grads"])
    assert any("local_experts" in name for name in reference["grads"])
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("hook, mtp", [(False, None), (True, None), (True, 1)],
                         ids=["megatron-plans", "mhc_post-node", "mhc_post-node-mtp"])
def test_combined_1f1b_step_equals_the_plain_schedule(tmp_path, hook, mtp):
    """One training step, 4 micro-batches, EP = 2 over gloo (Megatron's alltoall dispatcher),
    through Megatron's ``forward_backward_no_pipelining``: the combined-1F1B schedule
    (``--overlap-moe-expert-parallel-comm``) gives the plain schedule's losses and every
    gradient (mHC, router, experts; the MTP layer's with ``--mtp-num-layers 1``, which Megatron
    schedules as one more layer plan), bit for bit, with the MLP merge in Megatron's combine
    node or in the mhc_post node."""
    mhc = dict(expansion_rate=4, kernel_backend="torch")
    reference = _whole_step(tmp_path, "plain", 2, False, False, mhc, mtp=mtp)
    result = _whole_step(tmp_path, "overlap", 2, True, hook, mhc, mtp=mtp)
    assert any(name.startswith("mtp.") for name in reference["grads"]) == bool(mtp)
    assert all(c["layer_runs"] == 0 and c["mhc_post_nodes"] == 0 for c in reference["counts"])
    # 4 layers x 4 micro-batches, each layer plan run once per micro-batch in each direction
    # (forward and backward of two micro-batches share one run).
    assert all(c["layer_runs"] > 0 for c in result["counts"])
    assert all(c["mhc_post_nodes"] == (16 if hook else 0) for c in result["counts"])
    _assert_same_step(result, reference)


def test_combined_1f1b_interleaved_pipeline_step_equals_the_plain_schedule(tmp_path):
    """The same at PP = 2 with VPP = 2 (4 processes: PP 2 x EP 2, one layer per virtual stage),
    through Megatron's interleaved schedule, with the mhc_post node and the mHC recompute."""
    mhc = dict(expansion_rate=4, kernel_backend="torch", recompute_block=2)
    reference = _whole_step(tmp_path, "plain", 4, False, False, mhc, vpp=2)
    result = _whole_step(tmp_path, "overlap", 4, True, True, mhc, vpp=2)
    assert all(c["mhc_post_nodes"] == 8 for c in result["counts"])  # 2 chunks x 4 micro-batches
    _assert_same_step(result, reference)
