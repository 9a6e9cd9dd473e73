"""Shared helpers of the kernel probes (``probe_*.py``): the GPU check, timing, copy bandwidth."""

from __future__ import annotations

import functools

import torch
import triton


def time_us(fn) -> float:
    """Median microseconds of ``fn()`` (``triton.testing.do_bench``: L2 flushed before every run)."""
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth(script: str) -> float:
    """Bytes per second of a 1 GiB device copy (read + write), the probes' byte-floor rate; stops
    with '<script> needs a CUDA GPU' where there is none."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU")
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    return 2 * src.numel() / (time_us(functools.partial(torch.empty_like(src).copy_, src)) * 1e-6)
