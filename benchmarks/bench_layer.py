"""Step time and peak memory of Megatron-Core GPT layers: plain residual vs mHC (GPU).

    python benchmarks/bench_layer.py [--hidden 4096] [--seq 4096] [--micro-batch 2] [--layers 4]

Times forward + backward of a ``TransformerBlock`` of ``--layers`` GPT layers (local spec,
RMSNorm, attention through SDPA's flash kernels since Transformer-Engine is not assumed), bf16,
for the plain residual and for mHC n=4 with the eager PyTorch ops and with the fused Triton ops.
The mHC block includes the stream expansion (first layer) and merge (last layer).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _specs import bf16_config, init_single_gpu, sdpa_gpt_layer_spec  # noqa: E402


def build_block(args, variant: str, backend: str, recompute_block=None):
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_mhc import MHCConfig

    config = bf16_config(num_layers=args.layers, hidden_size=args.hidden,
                         num_attention_heads=args.heads, ffn_hidden_size=4 * args.hidden)
    mhc = None if variant == "plain" else MHCConfig(
        expansion_rate=args.n, kernel_backend=backend, recompute_block=recompute_block)
    return TransformerBlock(config, sdpa_gpt_layer_spec(mhc)).cuda()


def make_step(args, variant: str, backend: str, recompute_block=None):
    """A block of the variant and a closure running one forward + backward on fixed inputs."""
    torch.manual_seed(0)
    block = build_block(args, variant, backend, recompute_block)
    x = torch.randn(args.seq, args.micro_batch, args.hidden, device="cuda",
                    dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        out = block(hidden_states=x, attention_mask=None)
        out.backward(grad)
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

    steps = {name: make_step(args, variant, backend, block)
             for name, variant, backend, block in variants}
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
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--backends", default="torch,triton",
                        help="comma-separated mHC kernel backends to time (torch, triton, tilelang)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--recompute-blocks", type=int, nargs="*", default=[],
                        help="also time mHC (triton) with these L_r (0: the paper's optimum)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_layer.py needs a CUDA GPU")
    init_single_gpu()

    variants = [("plain residual", "plain", "torch", None)] + [
        (f"mHC n={args.n}, {backend} ops", "mhc", backend, None)
        for backend in args.backends.split(",")
    ] + [
        (f"mHC n={args.n}, triton ops, recompute L_r={block or 'auto'}", "mhc", "triton", block)
        for block in args.recompute_blocks
    ]
    results = measure_all(args, variants)
    plain_ms, plain_mem = results[0][1], results[0][2]
    print(f"device: {torch.cuda.get_device_name()} | {args.layers} GPT layers, C={args.hidden}, "
          f"seq {args.seq}, micro-batch {args.micro_batch}, bf16, fwd+bwd | median of "
          f"{args.rounds} interleaved rounds of do_bench(rep=1 s)")
    print("| variant | step time (ms) | per layer (ms) | overhead vs plain | rounds (ms) "
          "| peak activation memory (GiB) | memory vs plain |")
    print("|---|---|---|---|---|---|---|")
    for name, ms, peak, rounds in results:
        spread = ", ".join(f"{r:.1f}" for r in rounds)
        print(f"| {name} | {ms:.2f} | {ms / args.layers:.2f} | {100 * (ms / plain_ms - 1):+.1f}% "
              f"| {spread} | {peak / 2**30:.2f} | {peak / plain_mem:.2f}x |")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
