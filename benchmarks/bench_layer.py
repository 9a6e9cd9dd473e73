"""Step time and peak memory of Megatron-Core GPT layers: plain residual vs mHC (GPU).

    python benchmarks/bench_layer.py [--impl te,local] [--hidden 4096] [--seq 4096]
                                     [--micro-batch 2] [--layers 4]

Times forward + backward of a ``TransformerBlock`` of ``--layers`` GPT layers, bf16, for the plain
residual and for mHC n=4 with each ``--backends`` kernel set, on each ``--impl``:

* ``te``: Megatron's Transformer-Engine layer spec (fused norm+linear, TE attention), the stack
  users train with and the baseline of every comparison (needs Transformer-Engine);
* ``local``: Megatron's local spec (RMSNorm), attention through PyTorch SDPA's flash kernels.

Every variant of every impl is timed in the same interleaved rounds. The mHC block includes the
stream expansion (first layer) and merge (last layer).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _specs import (  # noqa: E402
    add_block_shape_arguments,
    add_recompute_rebuild_argument,
    bf16_config,
    gpt_layer_spec,
    init_single_gpu,
)


def build_block(args, impl: str, variant: str, backend: str, recompute=None):
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_mhc import MHCConfig

    config = bf16_config(num_layers=args.layers, hidden_size=args.hidden,
                         num_attention_heads=args.heads, ffn_hidden_size=4 * args.hidden)
    block, rebuild = recompute or (None, "auto")
    mhc = None if variant == "plain" else MHCConfig(
        expansion_rate=args.n, kernel_backend=backend, recompute_block=block,
        recompute_rebuild=rebuild)
    return TransformerBlock(config, gpt_layer_spec(impl, mhc)).cuda()


#: Kernel-set variants of the triton backend (``--backends``), for before/after pairs in one run:
#: ``triton-unlinked`` composes enter + merge (autograd adds the two dx), ``triton-tf32`` runs the
#: mapping backward's GEMMs on tf32 instead of bf16 operands, ``triton-fused`` adds the
#: cross-sublayer fusion (off by default: ``MHC_CROSS_SUBLAYER_FUSION``), ``triton-dx-once`` the
#: linked pair's "dx once" backward (off by default: ``MHC_BACKWARD_DX_ONCE``).
TRITON_VARIANTS = ("triton-unlinked", "triton-tf32", "triton-fused", "triton-dx-once")


def make_step(args, impl: str, variant: str, backend: str, recompute=None):
    """A block of the variant and a closure running one forward + backward on fixed inputs;
    ``recompute``: None or ``(L_r, rebuild policy)``."""
    import dataclasses

    torch.manual_seed(0)
    kernel_set = "triton" if backend in TRITON_VARIANTS else backend
    block = build_block(args, impl, variant, kernel_set, recompute)
    if backend in ("triton-unlinked", "triton-fused"):
        from megatron_mhc.core.hyper_connection import HyperConnection
        from megatron_mhc.kernels import triton as ops

        changed = dict(merge_linked_project=ops.merge_linked_project)
        if backend == "triton-unlinked":
            changed = dict(enter_linked=None, merge_linked=None, merge_linked_project=None)
        for module in block.modules():
            if isinstance(module, HyperConnection):
                module.ops = dataclasses.replace(module.ops, **changed)
    dot = "tf32" if backend == "triton-tf32" else "input"
    dx_once = "1" if backend == "triton-dx-once" else "0"
    from megatron_mhc.kernels.triton import _launch, projection  # where the switches are read
    x = torch.randn(args.seq, args.micro_batch, args.hidden, device="cuda",
                    dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        projection.BACKWARD_DOT_OPERANDS = dot
        default_dx_once, _launch.BACKWARD_DX_ONCE = _launch.BACKWARD_DX_ONCE, dx_once
        out = block(hidden_states=x, attention_mask=None)
        out.backward(grad)
        projection.BACKWARD_DOT_OPERANDS = "input"
        _launch.BACKWARD_DX_ONCE = default_dx_once
        x.grad = None
        for p in block.parameters():
            p.grad = None

    return step


def peak_memory(step) -> int:
    """Peak memory allocated during one step, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure_all(args, variants):
    """Median step time over interleaved rounds (so clock drift hits every variant alike)."""
    import triton

    steps = {name: make_step(args, impl, variant, backend, recompute)
             for name, impl, variant, backend, recompute in variants}
    for step in steps.values():  # compile, autotune, warm up
        for _ in range(3):
            step()
    peaks = {name: peak_memory(step) for name, step in steps.items()}
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(triton.testing.do_bench(step, warmup=100, rep=1000,
                                                       return_mode="median"))
    return [(name, sorted(ts)[len(ts) // 2], peaks[name], ts) for name, ts in times.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="te,local",
                        help="comma-separated layer implementations: te (Transformer-Engine spec, "
                             "the baseline) and/or local (Megatron's local spec + SDPA)")
    add_block_shape_arguments(parser)
    parser.add_argument("--backends", default="triton",
                        help="comma-separated mHC kernel backends to time (torch, triton, tilelang, "
                             "and the before/after sets " + ", ".join(TRITON_VARIANTS) + ")")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--recompute-blocks", type=int, nargs="*", default=[],
                        help="also time mHC (triton) with these L_r (0: the paper's optimum)")
    add_recompute_rebuild_argument(parser)
    args = parser.parse_args(argv)
    impls = args.impl.split(",")
    if not set(impls) <= {"te", "local"} or not impls:
        parser.error(f"--impl {args.impl}: allowed te, local or te,local")
    if not torch.cuda.is_available():
        sys.exit("bench_layer.py needs a CUDA GPU")
    if "te" in impls:
        from megatron_mhc.core.backends import transformer_engine_availability

        te = transformer_engine_availability()
        if not te.available:
            sys.exit(f"bench_layer.py --impl te needs Transformer-Engine: {te.reason} "
                     "(stage it with tools/device/, or pass --impl local)")
    init_single_gpu()

    variants = []
    for impl in impls:
        tag = "TE" if impl == "te" else "local"
        variants += [(f"{tag}: plain residual", impl, "plain", "torch", None)] + [
            (f"{tag}: mHC n={args.n}, {backend} ops", impl, "mhc", backend, None)
            for backend in args.backends.split(",")
        ] + [
            (f"{tag}: mHC n={args.n}, triton ops, recompute L_r={block or 'auto'}"
             + f", {rebuild} rebuild", impl, "mhc", "triton",
             (block, rebuild))
            for block in args.recompute_blocks for rebuild in args.recompute_rebuild
        ]
    results = measure_all(args, variants)
    baselines = {impl: next(r for r, v in zip(results, variants) if v[1] == impl and v[2] == "plain")
                 for impl in impls}
    print(f"device: {torch.cuda.get_device_name()} | {args.layers} GPT layers, C={args.hidden}, "
          f"seq {args.seq}, micro-batch {args.micro_batch}, bf16, fwd+bwd | median of "
          f"{args.rounds} interleaved rounds of do_bench(rep=1 s) | overheads vs the plain block of "
          "the same impl; 'vs TE plain' vs the Transformer-Engine plain block")
    print("| variant | step time (ms) | per layer (ms) | overhead vs plain | vs TE plain "
          "| rounds (ms) | peak activation memory (GiB) | memory vs plain |")
    print("|---|---|---|---|---|---|---|---|")
    te_ms = baselines["te"][1] if "te" in baselines else None
    for (name, ms, peak, rounds), variant in zip(results, variants):
        base = baselines[variant[1]]
        spread = ", ".join(f"{r:.1f}" for r in rounds)
        vs_te = f"{100 * (ms / te_ms - 1):+.1f}%" if te_ms else "-"
        print(f"| {name} | {ms:.2f} | {ms / args.layers:.2f} | {100 * (ms / base[1] - 1):+.1f}% "
              f"| {vs_te} | {spread} | {peak / 2**30:.2f} | {peak / base[2]:.2f}x |")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
