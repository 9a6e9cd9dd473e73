"""Where a block's activation memory goes: plain vs mHC, by what the backward keeps (GPU or CPU).

    python3 benchmarks/saved_activations.py [--impl te] [--hidden 4096] [--layers 4]
        [--recompute-blocks 2 4] [--recompute-rebuild auto block sublayer]

For each variant (plain residual, mHC, mHC with L_r recompute) one forward of a block of GPT
layers, then its backward:

* ``held``: memory still allocated after the forward, less the input and output (what the
  backward will read: the saved activations), on the GPU from ``torch.cuda.memory_allocated``;
* ``peak``: the highest allocation during forward + backward above the state before the step
  (parameter gradients included, as ``bench_layer.py`` counts it);
* ``saved``: the tensors handed to autograd's saved-tensor hooks, grouped by role (deduplicated
  by storage; parameters left out). Under mHC recompute the streams go through the recompute
  registry's own hooks and do not show here; ``held`` still counts them.

Every figure is in bytes per token per layer, divided by C ("·C"), so it holds for any width: at
C = 4096 and 8192 tokens, 1·C per layer is 32 MiB per layer. On CPU (``--impl local``) only
``saved`` is measured.
"""

from __future__ import annotations

import argparse
import collections
import gc
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

CUDA = torch.cuda.is_available()


def build_block(args, impl: str, mhc_config):
    from megatron.core.transformer.transformer_block import TransformerBlock

    config = bf16_config(num_layers=args.layers, hidden_size=args.hidden,
                         num_attention_heads=args.heads, ffn_hidden_size=4 * args.hidden,
                         use_cpu_initialization=not CUDA)
    block = TransformerBlock(config, gpt_layer_spec(impl, mhc_config))
    return block.cuda() if CUDA else block


def role(t: torch.Tensor, tokens: int, hidden: int, n: int) -> str:
    """A saved tensor's role, from its shape and dtype: the n-stream residual (``[..., n, C]`` or
    the kernels' ``[T, n*C]``), else its width per token (elements, in units of C where whole)."""
    dtype = str(t.dtype).replace("torch.", "")
    shape = tuple(t.shape)
    if (len(shape) >= 2 and shape[-2:] == (n, hidden)) or shape == (tokens, n * hidden):
        return f"stream n·C {dtype}"
    if t.numel() % tokens:
        return f"other {dtype}"
    width = t.numel() // tokens
    return f"{width // hidden}C-wide {dtype}" if width % hidden == 0 else f"{width}-wide {dtype}"


def measure(args, impl: str, mhc_config):
    """(held, peak, saved-by-role) in bytes for one forward + backward of a fresh block."""
    torch.manual_seed(0)
    block = build_block(args, impl, mhc_config)
    device = "cuda" if CUDA else "cpu"
    tokens = args.seq * args.micro_batch
    x = torch.randn(args.seq, args.micro_batch, args.hidden, device=device,
                    dtype=torch.bfloat16, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def step(record=None):
        def pack(t):
            if record is not None:
                storage = t.untyped_storage()
                if storage.data_ptr() not in params and storage.data_ptr() not in record:
                    record[storage.data_ptr()] = (role(t, tokens, args.hidden, args.n),
                                                  storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(hidden_states=x, attention_mask=None)
        return out

    for _ in range(2):  # compile / autotune / TE workspaces outside the measurement
        step().backward(torch.ones_like(x))
        x.grad = None
        block.zero_grad(set_to_none=True)
    held = peak = None
    if CUDA:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = step()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base  # with the parameter grads, as bench_layer
        x.grad = None
        block.zero_grad(set_to_none=True)
        del out
    record = {}
    out = step(record)
    saved = collections.Counter()
    for name, nbytes in record.values():
        saved[name] += nbytes
    del out
    return held, peak, saved


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["te", "local"], default="te" if CUDA else "local")
    add_block_shape_arguments(parser)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--recompute-blocks", type=int, nargs="*", default=[2])
    add_recompute_rebuild_argument(parser)
    args = parser.parse_args(argv)
    if args.impl == "te" and not CUDA:
        sys.exit("saved_activations.py --impl te needs a CUDA GPU (use --impl local on CPU)")
    if CUDA:
        init_single_gpu()
        device = torch.cuda.get_device_name()
    else:
        from megatron_mhc.training.cpu import free_port, init_cpu_distributed

        init_cpu_distributed(port=free_port())  # not an inherited MASTER_PORT
        device = "CPU"
    from megatron_mhc import MHCConfig

    recomputes = [(None, "auto")] + [(rb, policy) for rb in args.recompute_blocks
                                      for policy in args.recompute_rebuild]
    variants = [("plain", None)] + [
        (f"mHC n={args.n} {args.backend}" + ("" if rb is None else f", L_r={rb or 'auto'}")
         + ("" if rb is None else f", {policy} rebuild"),
         MHCConfig(expansion_rate=args.n, kernel_backend=args.backend, recompute_block=rb,
                   recompute_rebuild=policy))
        for rb, policy in recomputes
    ]
    unit = args.seq * args.micro_batch * args.layers * args.hidden
    print(f"device: {device} | {args.impl} block, {args.layers} layers, C={args.hidden}, seq "
          f"{args.seq}, micro-batch {args.micro_batch}, bf16 | bytes per token per layer / C")
    print("| variant | held after forward | vs plain | peak fwd+bwd | vs plain "
          "| saved tensors by role |")
    print("|---|---|---|---|---|---|")
    plain = None
    for name, mhc_config in variants:
        held, peak, saved = measure(args, args.impl, mhc_config)
        gc.collect()  # the variant's block (an 8-layer C=4096 one is ~7 GiB with its grads):
        if CUDA:      # without this, 9 variants ran out of memory on an 80 GB H100
            torch.cuda.empty_cache()
        if plain is None:
            plain = (held, peak)
        roles = "; ".join(f"{r} {b / unit:.2f}" for r, b in saved.most_common())
        fmt = (lambda v: "n/a" if v is None else f"{v / unit:.2f}·C")
        ratio = (lambda v, p: "n/a" if v is None or not p else f"{v / p:.2f}×")
        print(f"| {name} | {fmt(held)} | {ratio(held, plain[0])} | {fmt(peak)} | "
              f"{ratio(peak, plain[1])} | {roles} |", flush=True)


if __name__ == "__main__":
    main()
