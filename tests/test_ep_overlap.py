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
"""

import contextlib
import os

import pytest
import torch
from fixtures.gpu import destroy_gpu_megatron, init_gpu_megatron, requires_cuda

from megatron_mhc import MHCConfig
from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, causal_lm_inputs

SEQ, HIDDEN, LAYERS = 16, 32, 3


class _NoStream:
    """Stands in for a CUDA stream / event on CPU."""

    def wait(self, *_):
        pass

    def record(self, *_):
        pass

    def wait_stream(self, *_):
        pass


@pytest.fixture
def cpu_schedule(megatron_cpu, monkeypatch):
    """Megatron's schedule nodes on CPU: streams, events and ``record_stream`` are no-ops."""
    monkeypatch.setattr(torch.cuda, "stream", lambda *_: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *_: _NoStream())
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


def _head_loss(model, hidden, labels):
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


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _layer_plans(model, mask, streams=None):
    from megatron.core.models.common.model_chunk_schedule_plan import (
        ModelChunkState,
        TransformerLayerSchedulePlan,
    )

    chunk = ModelChunkState()
    chunk.attention_mask = mask
    chunk.rotary_pos_emb = chunk.rotary_pos_cos = chunk.rotary_pos_sin = None
    chunk.packed_seq_params = chunk.sequence_len_offset = None
    chunk.model = model
    comp, comm, event = streams or (_NoStream(), _NoStream(), _NoStream())
    return [TransformerLayerSchedulePlan(layer, event, chunk, lambda: comp, lambda: comm,
                                         extra_args={"is_first_layer": i == 0,
                                                     "is_last_layer": False})
            for i, layer in enumerate(model.decoder.layers)]


def _ep_overlap(model, batches, streams=None):
    """Two micro-batches through Megatron's layer schedule plans: F(1); F(2) layer i with B(1)
    layer L-1-i; B(2). Returns the losses and gradients."""
    from megatron.core.models.common.model_chunk_schedule_plan import (
        TransformerLayerSchedulePlan,
    )

    run = TransformerLayerSchedulePlan.run
    micro = []
    for tokens in batches:
        ids, pos, labels, mask = causal_lm_inputs(tokens)
        embedded = model.embedding(ids, pos)
        micro.append(dict(labels=labels, embedded=embedded,
                          plans=_layer_plans(model, mask, streams)))

    event = streams[2] if streams else _NoStream()

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
        m["loss"] = _head_loss(model, m["last"], m["labels"])
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


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=pytest.mark.slow) if case.startswith("triton") else case
    for case in sorted(CASES)])  # the Triton cases: ~2 min each under the interpreter
def test_ep_overlap_schedule_equals_transformer_block_forward(cpu_schedule, case):
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
    losses1, grads1 = _ep_overlap(model, batches)

    for loss0, loss1 in zip(losses0, losses1):
        torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    mhc_params = {n for n, _ in model.named_parameters() if "_hc." in n}
    assert len(mhc_params) == 3 * 2 * LAYERS
    assert mhc_params <= grads1.keys(), sorted(mhc_params - grads1.keys())
    assert grads1.keys() == grads0.keys()
    for name, grad in grads0.items():
        error = (grads1[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-30)
        assert error <= 1e-5, f"{name}: relative gradient error {error:.3g}"


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
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("moe", [True, False])
def test_ep_overlap_schedule_on_cuda_streams_equals_forward(gpu_schedule, backend, moe):
    """The same comparison on a GPU, the combine node (with the MLP merge) on its own stream."""
    mhc_config = MHCConfig(expansion_rate=4, kernel_backend=backend, recompute_block=2)
    batches = _cuda_batches(2)
    reference_model = _model(mhc_config, moe).cuda()
    state = {k: (v.clone() if torch.is_tensor(v) else v)
             for k, v in reference_model.state_dict().items()}
    losses0, grads0 = _reference(reference_model, batches)
    model = _model(mhc_config, moe).cuda()
    model.load_state_dict(state)
    streams = (torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Event())
    losses1, grads1 = _ep_overlap(model, batches, streams)
    torch.cuda.synchronize()
    for loss0, loss1 in zip(losses0, losses1):
        torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    mhc_params = {n for n, _ in model.named_parameters() if "_hc." in n}
    assert mhc_params <= grads1.keys()
    for name, grad in grads0.items():
        error = (grads1[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-30)
        assert error <= 1e-4, f"{name}: relative gradient error {error:.3g}"
