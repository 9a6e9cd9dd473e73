"""Backend numerics in training: per-group gradient errors and short loss curves (GPU).

    python3 benchmarks/check_training_numerics.py [--steps 60] [--seeds 2]
        [--variants torch,triton,triton-tf32] [--grad-variants ...]

Why: in the 200-iteration ``pretrain_gpt.py`` loss curves of issue 14 (part 4) the triton backend
trailed the torch backend on the loss cliff (iterations 20-60). This script rebuilds that model
without Transformer-Engine on one GPU, so that op-set variants can be compared in one run:
``examples/pretrain_gpt_mhc.sh``'s 12 layers, C=768, SwiGLU FFN 2048, 12 heads, RoPE, seq 1024,
n=4 with automatic L_r recompute; bf16 parameters with float32 master weights, Adam (beta2 0.95,
weight decay 0.1 on matrices), clip 1.0, lr 6e-4 with 10 warm-up steps and cosine decay over 200;
global batch 8 in two micro-batches of 4; Megatron's mock-data token stream (documents
``1, 2, ..., len-1, eod`` with lengths drawn as ``MockGPTLowLevelDataset`` draws them).

Two tables:

1. ``grads``: one micro-batch's gradients of each variant against the float32 model (the same
   bf16-valued weights, torch backend, TF32 off), per parameter group: the relative error
   ``|g - g32| / |g32|`` and the norm ratio ``|g| / |g32|`` (a bias shows as a ratio away from 1),
   at the initial weights and at the weights after ``--trained-steps`` torch-backend steps.
2. ``curves``: the loss of each variant and data seed every 5 steps, and the mean over steps
   20..steps (the cliff); variants share the initial weights and, per seed, the data.

Variants: ``torch`` (reference ops), ``triton`` (the default fused set, linked pair),
``triton-tf32`` (mapping backward GEMMs on tf32 operands), ``triton-unlinked`` (enter + merge
composed; autograd adds the two dx), ``torch-entry`` (reference entry, triton merge),
``torch-merge`` (triton entry, reference merge).

On CPU (``--tiny``, the smoke test) the Triton kernels run under the interpreter, which rounds
float32 -> bfloat16 toward zero where a GPU rounds to nearest even: the triton rows there show a
small bias (norm ratios ~0.99) that the GPU kernels do not have.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _specs import bf16_config, init_single_gpu, sdpa_gpt_layer_spec  # noqa: E402

VARIANTS = ("torch", "triton", "triton-tf32", "triton-unlinked", "torch-entry", "torch-merge")
VOCAB, MICRO, MICRO_BATCHES = 32000, 4, 2
LR, MIN_LR, WARMUP, DECAY = 6e-4, 6e-5, 10, 200
#: (layers, hidden, heads, ffn, seq): the example's model, and a tiny one for the CPU smoke test.
SHAPES = {"example": (12, 768, 12, 2048, 1024), "tiny": (2, 64, 4, 128, 32)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build_model(shape, dtype: torch.dtype):
    """The mHC GPT of ``shape`` (one of ``SHAPES``; SDPA attention, SwiGLU, RoPE, n=4, automatic
    L_r recompute)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_mhc import MHCConfig

    layers, hidden, heads, ffn, seq = shape
    config = bf16_config(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=ffn,
        gated_linear_unit=True, activation_func=F.silu, init_method_std=0.02,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, pipeline_dtype=dtype,
        use_cpu_initialization=DEVICE == "cpu")
    mhc = MHCConfig(expansion_rate=4, kernel_backend="torch", recompute_block=0)
    model = GPTModel(config=config, transformer_layer_spec=sdpa_gpt_layer_spec(mhc),
                     vocab_size=VOCAB, max_sequence_length=seq, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    return model.to(DEVICE)


def op_set(variant: str):
    """The ``MHCOps`` of ``variant`` and the triton backward GEMM operands it runs with."""
    from megatron_mhc.core.backends import get_backend_ops

    TORCH_OPS, TRITON_OPS = get_backend_ops("torch"), get_backend_ops("triton")
    unlinked = dict(enter_linked=None, merge_linked=None, merge_linked_project=None)
    sets = {
        "torch": TORCH_OPS,
        "triton": TRITON_OPS,
        "triton-tf32": TRITON_OPS,
        "triton-unlinked": dataclasses.replace(TRITON_OPS, **unlinked),
        "torch-entry": dataclasses.replace(
            TRITON_OPS, compute_mappings=TORCH_OPS.compute_mappings, enter=TORCH_OPS.enter,
            pre_apply=TORCH_OPS.pre_apply, **unlinked),
        "torch-merge": dataclasses.replace(
            TRITON_OPS, post_res_merge=TORCH_OPS.post_res_merge, **unlinked),
    }
    return sets[variant], ("tf32" if variant == "triton-tf32" else "input")


def use_variant(model, variant: str) -> None:
    """Point every mHC layer and HyperConnection of ``model`` at ``variant``'s ops."""
    from megatron_mhc.core.hyper_connection import HyperConnection
    from megatron_mhc.kernels.triton import projection  # where BACKWARD_DOT_OPERANDS is read

    ops, dot = op_set(variant)
    projection.BACKWARD_DOT_OPERANDS = dot
    for module in model.modules():
        if isinstance(module, HyperConnection):
            module.ops = ops
        elif hasattr(module, "mhc_ops"):
            module.mhc_ops = ops


def mock_token_stream(seed: int, tokens: int) -> np.ndarray:
    """Megatron's mock documents (``MockGPTLowLevelDataset``: ``1..len-1`` then eod, lengths from
    ``default_rng(0).integers(1, 4096)``), in the order of a ``seed`` shuffle, concatenated."""
    lengths = np.random.default_rng(0).integers(1, 4096, size=100000, dtype=np.int32)
    order = np.random.default_rng(seed).permutation(len(lengths))
    parts, total = [], 0
    for idx in order:
        doc = np.concatenate([(np.arange(lengths[idx] - 1) + 1) % VOCAB, [VOCAB - 1]])
        parts.append(doc)
        total += len(doc)
        if total >= tokens:
            break
    return np.concatenate(parts)[:tokens].astype(np.int64)


def batches(seq: int, seed: int, steps: int):
    """``steps`` global batches of ``MICRO_BATCHES`` micro-batches ``[MICRO, seq + 1]``."""
    per_step = MICRO_BATCHES * MICRO * (seq + 1)
    stream = torch.from_numpy(mock_token_stream(seed, steps * per_step)).to(DEVICE)
    return stream.view(steps, MICRO_BATCHES, MICRO, seq + 1)


def lr_at(step: int) -> float:
    """Megatron's linear warm-up then cosine decay (``step`` counts from 1)."""
    if step <= WARMUP:
        return LR * step / WARMUP
    progress = min(1.0, (step - WARMUP) / (DECAY - WARMUP))
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1.0 + math.cos(math.pi * progress))


def load(model, state) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name])


def train(model, variant: str, init_state, data, steps: int):
    """``steps`` optimizer steps from ``init_state``; returns (losses, the float32 weights after
    them, by parameter name)."""
    from megatron_mhc.training.small_gpt import lm_loss

    use_variant(model, variant)
    load(model, init_state)
    params = [p for p in model.parameters()]
    masters = [init_state[name].float().clone() for name, _ in model.named_parameters()]
    groups = [dict(params=[m for m in masters if m.dim() >= 2], weight_decay=0.1),
              dict(params=[m for m in masters if m.dim() < 2], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)
    losses = []
    for step in range(1, steps + 1):
        for p in params:
            p.grad = None
        total = 0.0
        for micro in data[step - 1]:
            loss = lm_loss(model, micro) / MICRO_BATCHES
            loss.backward()
            total += loss.item()
        for master, p in zip(masters, params):
            master.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(masters, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.step()
        with torch.no_grad():
            for master, p in zip(masters, params):
                p.copy_(master)
        losses.append(total)
    return losses, {name: m for (name, _), m in zip(model.named_parameters(), masters)}


def group_of(name: str) -> str:
    for key in ("phi", "alpha", "bias"):
        if name.endswith(f"_hc.{key}"):
            return f"mhc {key}"
    for key, group in (("embedding", "embedding"), ("output_layer", "output layer"),
                       ("self_attention", "attention"), ("mlp", "mlp")):
        if key in name:
            return group
    return "norms"


def gradients(model, variant: str, state, tokens):
    from megatron_mhc.training.small_gpt import lm_loss

    use_variant(model, variant)
    load(model, state)
    model.zero_grad(set_to_none=True)
    lm_loss(model, tokens).backward()
    return {name: p.grad.double() for name, p in model.named_parameters()}


def grad_table(model32, model16, variants, state, tokens, label: str) -> None:
    """Per-group relative error and norm ratio of each variant's gradients against float32."""
    state16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    ref = gradients(model32, "torch", state16, tokens)
    names = list(ref)
    groups = sorted({group_of(n) for n in names})
    print(f"\n## grads at {label}: |g - g32| / |g32| (norm ratio |g| / |g32|), one micro-batch")
    print("| variant | total | " + " | ".join(groups) + " |")
    print("|---" * (len(groups) + 2) + "|")
    for variant in variants:
        got = gradients(model16, variant, state16, tokens)
        cells = []
        for group in ["total"] + groups:
            keys = [n for n in names if group == "total" or group_of(n) == group]
            diff = math.sqrt(sum(float((got[k] - ref[k]).square().sum()) for k in keys))
            norm_ref = math.sqrt(sum(float(ref[k].square().sum()) for k in keys))
            norm_got = math.sqrt(sum(float(got[k].square().sum()) for k in keys))
            cells.append(f"{diff / norm_ref:.2e} ({norm_got / norm_ref:.5f})")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    ref_norm = math.sqrt(sum(float(g.square().sum()) for g in ref.values()))
    print(f"(float32 reference: total grad norm {ref_norm:.4f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=2, help="data orders per variant")
    parser.add_argument("--first-seed", type=int, default=0, help="the first data order")
    parser.add_argument("--variants", default="torch,triton,triton-tf32",
                        help=f"curve variants, comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--grad-variants", default=",".join(VARIANTS))
    parser.add_argument("--trained-steps", type=int, default=30,
                        help="torch-backend steps before the second gradient table (0: none)")
    parser.add_argument("--skip-curves", action="store_true")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer C=64 model (the CPU smoke test; Triton interpreted)")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    grad_variants = [v for v in args.grad_variants.split(",") if v]
    for v in variants + grad_variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}: allowed {', '.join(VARIANTS)}")
    if any(v != "torch" for v in variants + grad_variants):
        from megatron_mhc.core.backends import resolve_backend

        try:
            resolve_backend("triton")
        except RuntimeError as exc:  # no GPU and no interpreter: say so before any work
            sys.exit(f"check_training_numerics.py: the triton variants cannot run here ({exc}); "
                     "on CPU set TRITON_INTERPRET=1, or pass only the torch variant")
    shape = SHAPES["tiny" if args.tiny else "example"]
    if DEVICE == "cuda":
        init_single_gpu()
        device_name = torch.cuda.get_device_name()
    elif args.tiny:
        from megatron_mhc.training.cpu import free_port, init_cpu_distributed

        init_cpu_distributed(port=free_port())  # not an inherited MASTER_PORT
        device_name = "CPU (Triton interpreter)"
    else:
        sys.exit("check_training_numerics.py needs a CUDA GPU (or --tiny on CPU)")
    layers, hidden, _, _, seq = shape
    print(f"device: {device_name} | {layers} layers C={hidden} n=4 seq {seq}, "
          f"global batch {MICRO * MICRO_BATCHES}, mock tokens")
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference is float32 throughout
    torch.manual_seed(0)
    model32 = build_model(shape, torch.float32)
    init_state = {n: p.detach().clone() for n, p in model32.named_parameters()}
    model16 = build_model(shape, torch.bfloat16)
    data0 = batches(seq, 0, max(args.steps, args.trained_steps, 1))
    if grad_variants:
        grad_table(model32, model16, grad_variants, init_state, data0[0, 0], "the initial weights")
    if args.trained_steps and grad_variants:
        start = time.time()
        _, trained = train(model16, "torch", init_state, data0, args.trained_steps)
        print(f"(trained {args.trained_steps} torch steps in {time.time() - start:.0f} s)")
        grad_table(model32, model16, grad_variants, trained, data0[args.trained_steps - 1, 0],
                   f"the weights after {args.trained_steps} torch-backend steps")
    if args.skip_curves:
        return
    marks = list(range(5, args.steps + 1, 5))
    print(f"\n## curves: loss at steps {marks}; mean over 20..{args.steps}")
    print("| variant | seed | " + " | ".join(str(m) for m in marks) + " | mean 20.. | s |")
    print("|---" * (len(marks) + 4) + "|")
    means = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        data = data0 if seed == 0 else batches(seq, seed, args.steps)
        for variant in variants:
            start = time.time()
            losses, _ = train(model16, variant, init_state, data, args.steps)
            tail = losses[19:] or losses  # fewer than 20 steps: all of them
            means.setdefault(variant, []).append(sum(tail) / len(tail))
            print(f"| {variant} | {seed} | " + " | ".join(f"{losses[m - 1]:.3f}" for m in marks)
                  + f" | {means[variant][-1]:.3f} | {time.time() - start:.0f} |", flush=True)
    print("\nmean over the cliff, per variant (each seed):")
    for variant, values in means.items():
        print(f"  {variant}: " + ", ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
