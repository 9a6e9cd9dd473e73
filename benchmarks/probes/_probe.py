"""Shared helpers of the kernel probes (``probe_*.py``): the GPU check, timing in microseconds,
and ``bench_kernels.py``'s copy bandwidth (the probes' byte-floor rate). ``bench_kernels.py`` is
in the folder above (``benchmarks/``), which this puts on ``sys.path``."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_kernels import bench, copy_bandwidth

__all__ = ["copy_bandwidth", "require_gpu", "time_us"]


def require_gpu(script: str) -> None:
    """Stop with '<script> needs a CUDA GPU' where there is none."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU")


def time_us(fn) -> float:
    """Median microseconds of ``fn()`` (``bench_kernels.bench``: L2 flushed before every run)."""
    return 1e3 * bench(fn)
