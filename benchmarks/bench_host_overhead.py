"""Host (CPU) time per call of the mHC pieces, against the GPU time they launch (GPU).

    python3 benchmarks/bench_host_overhead.py [--tokens 256] [--hidden 2048] [--layers 4]

A step is host-bound when the CPU needs longer to issue its kernels than the GPU needs to run
them. With few tokens the GPU work is tiny, so the wall time per call is the host time: the
Python, autograd and kernel-launch cost of each piece. Rows: an empty Triton kernel launch and a
torch op (the launch floors), the fused entry / merge ops forward and forward + backward, and a
block of ``--layers`` GPT layers plain vs mHC (forward + backward). The GPU time is taken at
``--gpu-tokens`` tokens (a real micro-batch) with the launches queued behind a sleep kernel, so
it is the GPU's work alone; "host / GPU" above 1 means that piece is host-bound at that size.
The last column counts the GPU kernels one call launches (torch.profiler), the launch budget of
issue 14 (the sublayer rows: identity sublayer, upstream gradient given, so only mHC kernels).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _specs import bf16_config, init_single_gpu, sdpa_gpt_layer_spec  # noqa: E402


@triton.jit
def _noop(a, b, c, d, e, f, g, h, N: tl.constexpr):
    pass


def host_us(fn, iters: int = 200) -> float:
    """Mean wall time per call in microseconds (GPU work small enough to hide behind the host)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def gpu_us(fn, host_us_per_call: float, iters: int) -> float:
    """GPU time per call in microseconds: a sleep kernel holds the GPU while the host queues
    ``iters`` calls, so the events around them time the GPU work alone, not the launch gaps."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(host_us_per_call * iters * 1.5 * 2000))  # ~2 GHz: cycles per us
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def op_cases(tokens: int, hidden: int, n: int):
    """(name, fn) pairs for the single ops at ``tokens`` tokens."""
    from megatron_mhc.kernels import triton as triton_ops

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, n, hidden, device=dev, dtype=dt, requires_grad=True)
    y = torch.randn(tokens, hidden, device=dev, dtype=dt, requires_grad=True)
    phi = (0.02 * torch.randn(n * hidden, n * n + 2 * n, device=dev, dtype=dt)).requires_grad_()
    alpha = torch.full((3,), 0.01, device=dev, dtype=dt, requires_grad=True)
    bias = torch.zeros(n * n + 2 * n, device=dev, dtype=dt, requires_grad=True)
    small = torch.empty(8, device=dev)

    def noop_launch():
        _noop[(1,)](small, small, small, small, small, small, small, small, N=4)

    def torch_op():
        small.add_(1.0)

    def entry_fwd():
        with torch.no_grad():
            triton_ops.enter(x, phi, alpha, bias)

    def merge_fwd():
        with torch.no_grad():
            agg, hp, hr = triton_ops.enter(x, phi, alpha, bias)
        triton_ops.post_res_merge(x.detach(), y.detach(), hp, hr)

    d_out = torch.randn(tokens, n, hidden, device=dev, dtype=dt)

    def sublayer_fwd_bwd():
        agg, hp, hr = triton_ops.enter(x, phi, alpha, bias)
        out = triton_ops.post_res_merge(x, agg, hp, hr)
        out.backward(d_out)

    def sublayer_fwd_bwd_linked():
        agg, hp, hr, x_link, link = triton_ops.enter_linked(x, phi, alpha, bias)
        out = triton_ops.merge_linked(x_link, agg, hp, hr, link)
        out.backward(d_out)

    projection = triton_ops.project_stream(x, phi)
    phi_next = phi.detach().flip(0).requires_grad_()

    def sublayer_fwd_bwd_fused():
        agg, hp, hr, x_link, link = triton_ops.enter_linked(x, phi, alpha, bias,
                                                            projection=projection)
        out, _ = triton_ops.merge_linked_project(x_link, agg, hp, hr, link, phi_next)
        out.backward(d_out)

    def residual_fwd_bwd():
        out = x + y.unsqueeze(1)
        out.sum().backward()

    return [
        ("empty Triton kernel launch (8 args)", noop_launch),
        ("one torch op (in-place add)", torch_op),
        ("mHC entry op (mappings + pre-apply), forward", entry_fwd),
        ("mHC entry + post/res merge, forward", merge_fwd),
        ("mHC sublayer ops unlinked (enter + merge), forward + backward", sublayer_fwd_bwd),
        ("mHC sublayer ops linked (enter_linked + merge_linked), forward + backward",
         sublayer_fwd_bwd_linked),
        ("mHC sublayer ops linked + cross-sublayer fusion (steady state), forward + backward",
         sublayer_fwd_bwd_fused),
        ("plain residual add, forward + backward (autograd)", residual_fwd_bwd),
    ]


def gpu_kernel_names(fn) -> list:
    """Names of the GPU kernels (incl. memsets and copies) one call of ``fn`` launches, in
    launch order."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [e.name for e in sorted(events, key=lambda e: e.time_range.start)]


def gpu_kernels(fn) -> int:
    """Number of GPU kernels (incl. memsets and copies) one call of ``fn`` launches."""
    return len(gpu_kernel_names(fn))


def block_cases(tokens: int, args):
    """Forward + backward of a block of GPT layers, plain and mHC."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_mhc import MHCConfig

    cases = []
    for name, mhc in (("plain", None), ("mHC n=%d triton" % args.n,
                                        MHCConfig(expansion_rate=args.n, kernel_backend="triton"))):
        config = bf16_config(num_layers=args.layers, hidden_size=args.hidden,
                             num_attention_heads=args.heads, ffn_hidden_size=4 * args.hidden)
        torch.manual_seed(0)
        block = TransformerBlock(config, sdpa_gpt_layer_spec(mhc)).cuda()
        x = torch.randn(tokens, 1, args.hidden, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True)

        def step(block=block, x=x):
            block(hidden_states=x, attention_mask=None).sum().backward()
            x.grad = None
            for p in block.parameters():
                p.grad = None

        cases.append((f"{args.layers} GPT layers {name}, forward + backward", step))
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens for the host timing")
    parser.add_argument("--gpu-tokens", type=int, default=4096,
                        help="tokens for the GPU timing (a real micro-batch)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--profile", action="store_true",
                        help="also print the CPU-side torch.profiler table of the mHC block step")
    parser.add_argument("--list-kernels", action="store_true",
                        help="also list the GPU kernels one call of each mHC sublayer row "
                             "launches (the mHC kernels marked), in launch order")
    parser.add_argument("--cprofile", action="store_true",
                        help="also print cProfile's top Python functions (own time) of the linked "
                             "sublayer ops and of the mHC block step")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_host_overhead.py needs a CUDA GPU")
    init_single_gpu()
    print(f"device: {torch.cuda.get_device_name()} | C={args.hidden}, n={args.n}, bf16 | host time "
          f"at {args.tokens} tokens, GPU time at {args.gpu_tokens} tokens (microseconds per call)")
    print("| piece | host time (us) | GPU time at real size (us) | host / GPU | GPU kernels "
          "per call |")
    print("|---|---|---|---|---|")
    host = dict(op_cases(args.tokens, args.hidden, args.n) + block_cases(args.tokens, args))
    gpu = dict(op_cases(args.gpu_tokens, args.hidden, args.n) + block_cases(args.gpu_tokens, args))
    for name, fn in host.items():
        block = "layers" in name
        h = host_us(fn, iters=50 if block else 200)
        big = host_us(gpu[name], iters=10)  # host time at the real size, to size the sleep
        g = gpu_us(gpu[name], big, iters=2 if block else 20)
        print(f"| {name} | {h:.1f} | {g:.1f} | {h / g:.2f} | {gpu_kernels(host[name])} |")
    if args.list_kernels:
        for name, fn in host.items():
            if name.startswith("mHC sublayer ops"):
                print_kernel_list(name, fn)
    if args.profile:
        step = host[f"{args.layers} GPT layers mHC n={args.n} triton, forward + backward"]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30,
                                        max_name_column_width=60))
    if args.cprofile:
        for name in ("mHC sublayer ops linked (enter_linked + merge_linked), forward + backward",
                     f"{args.layers} GPT layers mHC n={args.n} triton, forward + backward"):
            print_cprofile(name, host[name])


def print_kernel_list(name: str, fn) -> None:
    """The kernels one call of ``fn`` launches; the mHC ones (this package's Triton / CUDA
    kernels: ``*_kernel``, not PyTorch's ``at::native``) marked and counted apart from the
    identity sublayer's and autograd's own."""
    names = gpu_kernel_names(fn)
    ours = [k for k in names if "_kernel" in k and "at::native" not in k]
    print(f"\n{name}: {len(names)} GPU kernels, {len(ours)} of them mHC kernels")
    for k in names:
        print(f"  {'mHC ' if k in ours else '    '}{k[:110]}")


def print_cprofile(name: str, fn, calls: int = 20) -> None:
    """cProfile of ``calls`` calls of ``fn``: the 25 functions with the most own time."""
    import cProfile
    import io
    import pstats

    fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(f"\ncProfile, {name}, {calls} calls (own time first):")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
