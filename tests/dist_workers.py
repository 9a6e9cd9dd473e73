"""Worker functions run in spawned gloo processes (one per rank) by the distributed tests."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

from megatron_mhc.training.cpu import (
    destroy_cpu_distributed,
    free_port,
    init_cpu_distributed,
)


def spawn(worker, world_size: int, *args) -> None:
    """Run ``worker(rank, world_size, port, *args)`` in ``world_size`` spawned processes."""
    port = free_port()
    mp.start_processes(
        _entry, args=(worker, world_size, port, args), nprocs=world_size, start_method="spawn"
    )


def _entry(rank, worker, world_size, port, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    worker(rank, world_size, port, *args)


def fixed_tokens(batch=4, seq=32, vocab=256, seed=7):
    """The same token batch on every rank."""
    return torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


def tp_loss_and_grads(rank, world_size, port, out_path, sequence_parallel, mhc_kwargs):
    """One forward/backward of a tiny mHC GPT at TP = world_size; rank 0 saves loss and grads."""
    from megatron.core.distributed.finalize_model_grads import (
        _allreduce_non_tensor_model_parallel_grads,
    )

    from megatron_mhc import MHCConfig
    from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, lm_loss

    init_cpu_distributed(rank, world_size, port, tensor_model_parallel_size=world_size)
    try:
        torch.manual_seed(1234)
        settings = TinyGPTSettings(
            num_layers=2,
            tensor_model_parallel_size=world_size,
            sequence_parallel=sequence_parallel,
        )
        model = build_tiny_gpt(settings, MHCConfig(**mhc_kwargs))
        loss = lm_loss(model, fixed_tokens())
        loss.backward()
        # Megatron's own TP grad reduction for sequence-parallel params (finalize_model_grads).
        model.ddp_config = SimpleNamespace(use_megatron_fsdp=False)
        _allreduce_non_tensor_model_parallel_grads([model], model.config)
        result = {
            "loss": loss.detach(),
            "grads": {
                name: p.grad.detach().clone()
                for name, p in model.named_parameters()
                if "_hc." in name
            },
            "sequence_parallel_flags": [
                getattr(p, "sequence_parallel", False)
                for name, p in model.named_parameters()
                if "_hc." in name
            ],
        }
        if rank == 0:
            torch.save(result, out_path)
    finally:
        destroy_cpu_distributed()



def checkpoint_save_or_load(rank, world_size, port, mode, ckpt_dir, out_path, mhc_kwargs):
    """``mode='save'``: train 3 steps at TP=world_size, save a dist-ckpt and the loss it gives.
    ``mode='load'``: build a differently seeded model, load the checkpoint, save the loss."""
    from megatron.core import dist_checkpointing

    from megatron_mhc import MHCConfig
    from megatron_mhc.training.small_gpt import (
        TinyGPTSettings,
        build_tiny_gpt,
        lm_loss,
        train_on_batch,
    )

    init_cpu_distributed(rank, world_size, port, tensor_model_parallel_size=world_size)
    try:
        torch.manual_seed(1234 if mode == "save" else 999)
        settings = TinyGPTSettings(num_layers=2, tensor_model_parallel_size=world_size)
        model = build_tiny_gpt(settings, MHCConfig(**mhc_kwargs))
        with torch.no_grad():
            loss_before = lm_loss(model, fixed_tokens(seed=5))
        if mode == "save":
            train_on_batch(model, fixed_tokens(seed=5), steps=3, lr=1e-2,
                           optimizer_class=torch.optim.Adam)
            dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
        else:
            state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
            model.load_state_dict(state)
        with torch.no_grad():
            loss = lm_loss(model, fixed_tokens(seed=5))
        if rank == 0:
            torch.save({"loss": loss, "loss_before": loss_before}, out_path)
    finally:
        destroy_cpu_distributed()


def exec_patched_schedules():
    """Re-define Megatron's pipeline schedules in place from the installed ``schedules.py`` with
    this project's patch hunks applied (the hooks the patch set adds, on the real file)."""
    import megatron.core.pipeline_parallel.schedules as schedules

    from megatron_mhc.training.patching import PatchSet, apply_hunks

    path = "megatron/core/pipeline_parallel/schedules.py"
    source = open(schedules.__file__).read()
    patched = apply_hunks(source, PatchSet().hunks[path])
    cpu_shims = {k: schedules.__dict__[k] for k in ("torch",)}  # patch_megatron_for_cpu's
    exec(compile(patched, schedules.__file__, "exec"), schedules.__dict__)
    schedules.__dict__.update(cpu_shims)


def _mean_loss(output_tensor):
    """The loss function the pipeline workers hand Megatron's schedules: the mean token loss."""
    loss = output_tensor.float().mean()
    return loss, {"loss": loss.detach()}


def _run_megatron_schedule(forward_step, chunks, micro_batches):
    """One training step of ``micro_batches`` (2 x 32 tokens each) over this rank's model
    ``chunks`` through Megatron's own forward-backward schedule for the parallel state set up."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches), seq_length=32, micro_batch_size=2,
        forward_only=False,
    )


def pipeline_losses_and_grads(rank, world_size, port, out_path, vpp, mhc_kwargs,
                               first_stage_layers=None, tp=1, schedule_hook=False,
                               mtp_num_layers=None, reference_path=None):
    """One training step (4 micro-batches) of a 4-layer mHC GPT at PP = world_size / tp
    (VPP = ``vpp``; TP = ``tp`` with sequence parallelism) through Megatron's own schedules;
    saves the losses and every mHC gradient keyed by global layer. With ``mtp_num_layers`` the
    model has an MTP block (on the last stage), whose gradients are saved too; the PP = 1 run then
    also saves its weights, and a run given ``reference_path`` (that file) starts from them."""
    from megatron.core import parallel_state
    from megatron.core.distributed.finalize_model_grads import (
        _allreduce_non_tensor_model_parallel_grads,
    )

    from megatron_mhc import MHCConfig
    from megatron_mhc.core.layer import MHCLayerMixin
    from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, causal_lm_inputs

    pp = world_size // tp
    init_cpu_distributed(rank, world_size, port, tensor_model_parallel_size=tp,
                         pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp)
    try:
        torch.manual_seed(1234)
        # batch_p2p_comm=False: gloo's batched isend/irecv raced in the interleaved schedule on
        # CPU (a stale activation for the third micro-batch, with the plain residual model too).
        extra = dict(batch_p2p_comm=False)
        if schedule_hook:  # fixed [s, b, n*C] shapes from the patched schedules
            exec_patched_schedules()
            n = MHCConfig(**mhc_kwargs).n
            extra.update(variable_seq_lengths=False, mhc_pipeline_streams=n)
        if first_stage_layers is not None:  # uneven split
            extra["num_layers_in_first_pipeline_stage"] = first_stage_layers
        if mtp_num_layers:
            extra["mtp_num_layers"] = mtp_num_layers
        settings = TinyGPTSettings(num_layers=4, pipeline_model_parallel_size=pp,
                                   virtual_pipeline_model_parallel_size=vpp, extra_config=extra,
                                   tensor_model_parallel_size=tp, sequence_parallel=tp > 1)
        # Every rank builds every chunk of every stage in the same order, so all parameters get
        # the same initial values as at PP=1; each rank keeps its own chunks.
        if reference_path is not None:
            # The weights come from the reference below; Megatron's start-up copy of the first
            # stage's embedding into the MTP stage's (an all-reduce of a .cuda() tensor over the
            # embedding group) is skipped in this process.
            from megatron.core.models.common.language_module.language_module import (
                LanguageModule,
            )

            LanguageModule._is_in_embd_group = lambda self: False
        chunks = _build_pipeline_chunks(settings, MHCConfig(**mhc_kwargs), pp, vpp,
                                        build_tiny_gpt, own_only=reference_path is not None)
        if reference_path is not None:
            _load_global_weights(chunks, torch.load(reference_path)["state"])
        state = chunks[0].state_dict() if mtp_num_layers and world_size == 1 else None
        micro_batches = [fixed_tokens(batch=2, seed=200 + i) for i in range(4)]

        def forward_step(data_iterator, model):
            input_ids, position_ids, labels, mask = causal_lm_inputs(next(data_iterator))
            return model(input_ids, position_ids, mask, labels=labels), _mean_loss

        losses = _run_megatron_schedule(forward_step, chunks, micro_batches)
        for chunk in chunks:  # Megatron's TP reduction of sequence-parallel parameters
            chunk.ddp_config = SimpleNamespace(use_megatron_fsdp=False)
        _allreduce_non_tensor_model_parallel_grads(chunks, chunks[0].config)
        grads = {}
        for chunk in chunks:
            for layer in chunk.decoder.layers:
                assert isinstance(layer, MHCLayerMixin)
                if rank == 0 and first_stage_layers is not None:
                    assert len(chunk.decoder.layers) == first_stage_layers
                for which, hc in (("attn", layer.attn_hc), ("mlp", layer.mlp_hc)):
                    if hc is None:  # the residual variant has no mappings
                        continue
                    for pname, p in hc.named_parameters():
                        grads[f"{layer.layer_number}.{which}.{pname}"] = p.grad.detach().clone()
            for pname, p in chunk.named_parameters():
                if pname.startswith("mtp."):
                    grads[pname] = p.grad.detach().clone()
        gathered = [None] * world_size
        first_tp_rank = parallel_state.get_tensor_model_parallel_rank() == 0
        torch.distributed.all_gather_object(gathered, {
            "losses": [d["loss"] for d in losses] if losses and first_tp_rank else [],
            "grads": grads})
        if rank == 0:
            merged = {"losses": [], "grads": {}, "state": state}
            for part in gathered:
                merged["losses"] += part["losses"]
                merged["grads"].update(part["grads"])
            torch.save(merged, out_path)
    finally:
        destroy_cpu_distributed()


def _load_global_weights(chunks, state):
    """Load a one-stage model's ``state`` into this rank's pipeline chunks: decoder layers by
    global layer number; the embedding, final norm, MTP block and output layer wherever the
    chunk has them (the MTP stage has its own copy of the embedding)."""
    for chunk in chunks:
        own = chunk.state_dict()
        offset = chunk.decoder.layers[0].layer_number - 1 if len(chunk.decoder.layers) else 0
        for key in own:
            source = key
            if key.startswith("decoder.layers."):
                index, rest = key[len("decoder.layers."):].split(".", 1)
                source = f"decoder.layers.{int(index) + offset}.{rest}"
            if torch.is_tensor(own[key]) and source in state and (
                    own[key].shape == state[source].shape):
                own[key] = state[source]
        chunk.load_state_dict(own)


def _build_pipeline_chunks(settings, mhc_config, pp, vpp, build, own_only=False):
    """This rank's model chunks. Every rank builds every stage's chunks in the global order (so
    all parameters get PP = 1's initial values) and keeps its own; ``own_only``: builds only its
    own (the weights are loaded afterwards)."""
    from megatron.core import parallel_state

    my_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = []
    for vp_stage in range(vpp or 1):  # global layer order: virtual stage, then stage
        for stage in ([my_rank] if own_only else range(pp)):
            parallel_state.set_pipeline_model_parallel_rank(stage)
            model = build(settings, mhc_config, vp_stage=vp_stage if vpp else None)
            if stage == my_rank:
                chunks.append(model)
    parallel_state.set_pipeline_model_parallel_rank(my_rank)
    return chunks


def moe_loss_and_grads(rank, world_size, port, out_path, mhc_kwargs, reference_path):
    """One forward/backward of a tiny mHC MoE GPT (4 experts, top-2, alltoall dispatcher) at
    EP = world_size; every rank gets the same tokens. With ``reference_path`` (an EP=1 run's
    state dict) the weights are loaded from it, experts split over the EP ranks."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    from megatron_mhc import MHCConfig
    from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, lm_loss

    init_cpu_distributed(rank, world_size, port, expert_model_parallel_size=world_size)
    try:
        torch.manual_seed(1234)
        settings = TinyGPTSettings(num_layers=2, num_moe_experts=4,
                                   expert_model_parallel_size=world_size)
        model = build_tiny_gpt(settings, MHCConfig(**mhc_kwargs))
        if reference_path is not None:
            reference = torch.load(reference_path)["state"]
            local = 4 // world_size
            state = {}
            for key in model.state_dict():
                source = key
                if ".local_experts." in key:
                    head, tail = key.split(".local_experts.")
                    index, rest = tail.split(".", 1)
                    source = f"{head}.local_experts.{rank * local + int(index)}.{rest}"
                state[key] = reference[source]
            model.load_state_dict(state)
        clear_aux_losses_tracker()
        loss = lm_loss(model, fixed_tokens())
        loss.backward()
        aux = {name: entry["values"].clone()
               for name, entry in get_moe_layer_wise_logging_tracker().items()}
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                 if "_hc." in n or "router" in n}
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": grads, "aux": aux,
                        "state": model.state_dict()}, out_path)
    finally:
        destroy_cpu_distributed()


def cp_loss_and_grads(rank, world_size, port, out_path, mhc_kwargs):
    """One forward/backward of a tiny mHC GPT at CP = world_size (Megatron's load-balanced
    sequence split, keys/values all-gathered by the fixture attention); losses summed and
    gradients all-reduced over the CP group as Megatron's loss and DDP do."""
    from fixtures.cp_attention import CPCoreAttention, cp_chunk_indices
    from megatron.core import parallel_state

    from megatron_mhc import MHCConfig
    from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, causal_lm_inputs

    init_cpu_distributed(rank, world_size, port, context_parallel_size=world_size)
    try:
        torch.manual_seed(1234)
        settings = TinyGPTSettings(num_layers=2, context_parallel_size=world_size,
                                   core_attention=CPCoreAttention)
        model = build_tiny_gpt(settings, MHCConfig(**mhc_kwargs))
        input_ids, position_ids, labels, mask = causal_lm_inputs(fixed_tokens())
        seq = input_ids.shape[1]
        local = cp_chunk_indices(seq, world_size, parallel_state.get_context_parallel_rank())
        per_token = model(input_ids[:, local], position_ids[:, local], mask, labels=labels[:, local])
        loss = per_token.float().sum() / labels.numel()
        loss.backward()
        group = parallel_state.get_context_parallel_group()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total, group=group)
        grads = {}
        for name, param in model.named_parameters():
            grad = param.grad.detach().clone()
            torch.distributed.all_reduce(grad, group=group)
            grads[name] = grad
        if rank == 0:
            torch.save({"loss": total, "grads": grads}, out_path)
    finally:
        destroy_cpu_distributed()


class CPUStream:
    """Stands in for a CUDA stream / event on CPU (Megatron's schedule nodes and the
    combined-1F1B schedule)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait(self, *_):
        pass

    def record(self, *_):
        pass

    def wait_stream(self, *_):
        pass

    def wait_event(self, *_):
        pass

    def synchronize(self):
        pass


def _combined_1f1b_on_cpu():
    """Megatron's combined-1F1B schedule (``--overlap-moe-expert-parallel-comm``) on CPU: its
    CUDA streams and events become no-ops, so its nodes run in issue order on one thread."""
    import contextlib

    torch.cuda.Stream = CPUStream
    torch.cuda.Event = CPUStream
    torch.cuda.stream = lambda *_: contextlib.nullcontext()
    torch.cuda.current_stream = lambda *_: CPUStream()
    torch.Tensor.record_stream = lambda self, *_: None


def ep_overlap_step(rank, world_size, port, out_path, overlap, hook, mhc_kwargs, vpp=None,
                    mtp_num_layers=None):
    """One training step (4 micro-batches) of a 4-layer mHC MoE GPT (4 experts, top-2, alltoall
    dispatcher) at EP = 2 (PP = world_size / 2, VPP = ``vpp``) through Megatron's own schedule:
    the combined-1F1B schedule with ``overlap`` (``--overlap-moe-expert-parallel-comm``), else the
    plain one. ``hook``: the plans get the mhc_post node (``hook_schedule_plans``). Saves the
    losses and the gradients of every mHC, router and expert parameter, keyed by global name."""
    from megatron.core import parallel_state

    from megatron_mhc import MHCConfig
    from megatron_mhc.core.schedule_nodes import hook_schedule_plans
    from megatron_mhc.training.small_gpt import TinyGPTSettings, build_tiny_gpt, causal_lm_inputs

    ep = 2
    pp = world_size // ep
    init_cpu_distributed(rank, world_size, port, expert_model_parallel_size=ep,
                         pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp)
    try:
        _combined_1f1b_on_cpu()
        import megatron.core.models.common.model_chunk_schedule_plan as plans

        import megatron_mhc.core.schedule_nodes as schedule_nodes

        counts = {"layer_runs": 0, "mhc_post_nodes": 0}
        layer_run, add_node = plans.TransformerLayerSchedulePlan.run, schedule_nodes.add_mhc_post_node

        def counted_layer_run(*args, **kwargs):
            counts["layer_runs"] += 1
            return layer_run(*args, **kwargs)

        def counted_add_node(*args, **kwargs):
            added = add_node(*args, **kwargs)
            counts["mhc_post_nodes"] += int(added)
            return added

        plans.TransformerLayerSchedulePlan.run = staticmethod(counted_layer_run)
        schedule_nodes.add_mhc_post_node = counted_add_node
        if hook:
            hook_schedule_plans()
        torch.manual_seed(1234)
        # bf16: Megatron's condition for the overlap. batch_p2p_comm=False: see
        # pipeline_losses_and_grads.
        extra = dict(bf16=True, overlap_moe_expert_parallel_comm=overlap, batch_p2p_comm=False,
                     moe_token_dispatcher_type="alltoall")
        if mtp_num_layers:
            extra["mtp_num_layers"] = mtp_num_layers
        settings = TinyGPTSettings(num_layers=4, num_moe_experts=4, expert_model_parallel_size=ep,
                                   pipeline_model_parallel_size=pp, params_dtype=torch.bfloat16,
                                   virtual_pipeline_model_parallel_size=vpp, extra_config=extra)
        chunks = _build_pipeline_chunks(settings, MHCConfig(**mhc_kwargs), pp, vpp, build_tiny_gpt)
        for chunk in chunks:
            chunk.bfloat16()  # what Megatron's Float16Module does to every parameter
        micro_batches = [fixed_tokens(batch=2, seed=300 + i) for i in range(4)]

        def forward_step(data_iterator, model, return_schedule_plan=False):
            input_ids, position_ids, labels, mask = causal_lm_inputs(next(data_iterator))
            if return_schedule_plan:
                plan = model.build_schedule_plan(input_ids, position_ids, mask, labels=labels)
                return plan, _mean_loss
            return model(input_ids, position_ids, mask, labels=labels), _mean_loss

        losses = _run_megatron_schedule(forward_step, chunks, micro_batches)
        local = 4 // ep
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        grads = {}
        for chunk in chunks:
            offset = chunk.decoder.layers[0].layer_number - 1
            for name, p in chunk.named_parameters():
                if p.grad is not None and name.startswith("mtp."):
                    grads[name] = p.grad.detach().clone()
                if p.grad is None or not ("_hc." in name or "router" in name or "experts" in name):
                    continue
                if not name.startswith("decoder.layers."):
                    continue
                index, rest = name[len("decoder.layers."):].split(".", 1)
                if ".local_experts." in rest:
                    head, tail = rest.split(".local_experts.")
                    expert, tail = tail.split(".", 1)
                    rest = f"{head}.local_experts.{ep_rank * local + int(expert)}.{tail}"
                grads[f"decoder.layers.{int(index) + offset}.{rest}"] = p.grad.detach().clone()
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, {
            "losses": [float(d["loss"]) for d in losses] if losses else [], "grads": grads,
            "counts": counts})
        if rank == 0:
            merged = {"losses": [], "grads": {}, "counts": [part["counts"] for part in gathered]}
            for part in gathered:
                if part["losses"]:
                    merged["losses"] = part["losses"]
                merged["grads"].update(part["grads"])
            torch.save(merged, out_path)
    finally:
        destroy_cpu_distributed()
