"""Pipeline-parallel step time of a small GPT: plain residual vs mHC (with and without the
overlapped schedule), and memory with L_r recompute.

    python3 benchmarks/bench_pipeline.py --pp 2            # 1F1B on two GPUs (nvidia-h200-x2)
    python3 benchmarks/bench_pipeline.py --pp 2 --vpp 2    # interleaved, 2 virtual stages per rank
    python3 benchmarks/bench_pipeline.py --pp 1            # one GPU: the PP=1 overhead and memory

A GPTModel (local spec, RMSNorm, SDPA attention, bf16; default 8 layers, C=2048, seq 4096,
micro-batch 1, 8 micro-batches) trained through Megatron-Core's own schedules. mHC stages exchange
[s, b, n*C]: with a patched Megatron tree first on PYTHONPATH (``megatron-mhc patch apply``) the
schedules size them directly; with the unpatched package they go through variable_seq_lengths.
Interleaved runs use Megatron's p2p overlap (its training default); ``overlap`` (``--mhc-overlap``)
adds the high-priority stream for the MLP merges and, with 1F1B, turns off the host
synchronisation after each batched p2p (interleaved: the warm-up/flush p2p overlap). Step time
is the median of timed iterations (CUDA events on rank 0, after a barrier); peak memory is each
rank's max allocation during a step; the last column is the loss of the timed steps (the overlap
must not change it).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _specs import add_block_shape_arguments, bf16_config, sdpa_gpt_layer_spec  # noqa: E402

VOCAB = 32768


def build_stage(args, mhc_config, p2p_sync=True):
    """This rank's model chunks (one, or ``--vpp`` interleaved ones)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_mhc.training.hooks import PIPELINE_STREAMS_ATTR, schedules_are_hooked

    mhc = mhc_config is not None and not mhc_config.is_residual
    interleaved = args.vpp is not None
    overlap = mhc and mhc_config.overlap
    config = bf16_config(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden, pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
        variable_seq_lengths=args.pp > 1 and mhc and not schedules_are_hooked(),
        overlap_p2p_comm=interleaved, batch_p2p_comm=not interleaved,
        # What --mhc-overlap sets (megatron_mhc.training.hooks.apply_mhc_to_spec): no host sync after each
        # batched p2p, so the host queues the next micro-batch while the activations travel.
        batch_p2p_sync=p2p_sync and not overlap,
        overlap_p2p_comm_warmup_flush=interleaved and overlap,
        deallocate_pipeline_outputs=True,  # as Megatron's training loop sets it
    )
    if mhc:
        setattr(config, PIPELINE_STREAMS_ATTR, mhc_config.n)  # as apply_mhc_to_spec does
    chunks = []
    for vp_stage in range(args.vpp or 1):
        vp = vp_stage if interleaved else None
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=sdpa_gpt_layer_spec(mhc_config),
            vocab_size=VOCAB, max_sequence_length=args.seq, position_embedding_type="rope",
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            vp_stage=vp,
        ).cuda())
    return chunks


def run_variant(args, name, mhc_config, p2p_sync=True):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)  # same weights for every variant of one model type
    chunks = build_stage(args, mhc_config, p2p_sync)
    model = chunks if args.vpp is not None else chunks[0]
    optimizer_free_params = [p for chunk in chunks for p in chunk.parameters()]
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = [torch.randint(0, VOCAB, (args.micro_batch, args.seq + 1), device="cuda",
                            generator=gen) for _ in range(args.microbatches)]
    s = args.seq
    position_ids = torch.arange(s, device="cuda").unsqueeze(0).expand(args.micro_batch, s)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch[:, :-1], position_ids, None, labels=batch[:, 1:])

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    schedule = get_forward_backward_func()
    losses = []

    def step():
        # (model and chunks are deleted after the timing loop, once step() is done with them)
        data = [iter(tokens) for _ in chunks] if args.vpp is not None else iter(tokens)  # noqa: F821
        out = schedule(forward_step_func=forward_step, data_iterator=data, model=model,  # noqa: F821
                       num_microbatches=args.microbatches, seq_length=s,
                       micro_batch_size=args.micro_batch, forward_only=False)
        if out:
            losses.append(torch.stack([o["loss"] for o in out]).mean())
        for p in optimizer_free_params:
            p.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(args.iters):
        torch.distributed.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    if args.profile and torch.distributed.get_rank() == 0:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"=== profile of one step: {name}")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=18,
                                        max_name_column_width=70))
    del model, chunks
    torch.cuda.empty_cache()
    peaks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(peaks, peak)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, losses[-1].item() if losses else None)
    loss = next(v for v in gathered if v is not None)
    return name, sorted(times)[len(times) // 2], peaks, loss


def worker(rank, args):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_mhc import MHCConfig

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=args.pp)
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=args.pp,
                                             virtual_pipeline_model_parallel_size=args.vpp)
    model_parallel_cuda_manual_seed(0)
    from megatron_mhc.training.hooks import schedules_are_hooked

    def mhc(label, **extra):
        return (f"mHC n={args.n}, triton{label}",
                MHCConfig(expansion_rate=args.n, kernel_backend="triton", **extra))

    one_f_one_b = args.pp > 1 and args.vpp is None  # where the p2p host sync exists
    variants = [("plain residual", None)]
    if one_f_one_b:
        variants.append(("plain residual, no p2p host sync", None, False))
    variants.append(mhc(""))
    if one_f_one_b:
        variants.append(mhc(", no p2p host sync (stream part off)") + (False,))
    variants += [mhc(", overlap", overlap=True), mhc(", recompute L_r=auto", recompute_block=0),
                 mhc(", recompute L_r=auto, overlap", recompute_block=0, overlap=True)]
    results = [run_variant(args, *v) for v in variants]
    if rank == 0:
        base_ms, base_peaks = results[0][1], results[0][2]
        schedule = ("interleaved, VPP=%d" % args.vpp) if args.vpp else (
            "1F1B" if args.pp > 1 else "no pipelining")
        shapes = ("patched schedules (fixed n*C shapes)" if schedules_are_hooked()
                  else "unpatched schedules (variable_seq_lengths)")
        print(f"device: {torch.cuda.get_device_name()} x{args.pp} | PP={args.pp} {schedule}, "
              f"{shapes} | {args.layers} layers, C={args.hidden}, seq {args.seq}, micro-batch "
              f"{args.micro_batch}, {args.microbatches} micro-batches, bf16 | median of "
              f"{args.iters} steps")
        print("| variant | step (ms) | overhead vs plain | peak memory per rank (GiB) "
              "| memory vs plain (max rank) | loss |")
        print("|---|---|---|---|---|---|")
        for name, ms, peaks, loss in results:
            mem = ", ".join(f"{p / 2**30:.2f}" for p in peaks)
            print(f"| {name} | {ms:.1f} | {100 * (ms / base_ms - 1):+.1f}% | {mem} | "
                  f"{max(peaks) / max(base_peaks):.2f}x | {loss:.6f} |")
    torch.distributed.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--vpp", type=int, default=None,
                        help="virtual pipeline stages per rank (interleaved schedule)")
    add_block_shape_arguments(parser, layers=8, hidden=2048, heads=16, micro_batch=1)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--profile", action="store_true",
                        help="also print a torch.profiler table of one step per variant")
    args = parser.parse_args(argv)
    if args.vpp is not None and (args.pp < 2 or args.layers % (args.pp * args.vpp)
                                 or args.microbatches % args.pp):
        parser.error(f"--vpp {args.vpp} needs --pp >= 2, --layers divisible by pp*vpp and "
                     f"--microbatches divisible by pp (got pp={args.pp}, layers={args.layers}, "
                     f"microbatches={args.microbatches})")
    if torch.cuda.device_count() < args.pp:
        sys.exit(f"bench_pipeline.py --pp {args.pp} needs {args.pp} GPUs, "
                 f"{torch.cuda.device_count()} visible")
    mp.start_processes(worker, args=(args,), nprocs=args.pp, start_method="spawn")


if __name__ == "__main__":
    main()
