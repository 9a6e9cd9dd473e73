"""Run-time detection of the optional kernel backends and of the optional Megatron extensions.

Nothing here imports an optional package at module import time: each probe runs on first use and
its answer (available or not, and why) is cached, so ``import megatron_mhc`` never fails for a
missing backend and a user who asks for one gets a clear message.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from megatron_mhc.core.config import KERNEL_BACKENDS


class Availability(NamedTuple):
    """Whether an optional component can be used here, and why not when it cannot."""

    available: bool
    reason: str


def _probe_import(module: str) -> Availability:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return Availability(False, f"cannot import {module}: {type(exc).__name__}: {exc}")
    return Availability(True, "")


@functools.lru_cache(maxsize=None)
def triton_availability() -> Availability:
    """Triton kernels run on a CUDA device, or anywhere under TRITON_INTERPRET=1."""
    probe = _probe_import("triton")
    if not probe.available:
        return probe
    if os.environ.get("TRITON_INTERPRET") == "1":
        return Availability(True, "interpreter (TRITON_INTERPRET=1)")
    import torch

    if not torch.cuda.is_available():
        return Availability(False, "triton is installed but no CUDA device is visible")
    return Availability(True, "")


@functools.lru_cache(maxsize=None)
def tilelang_availability() -> Availability:
    """The TileLang path needs tilelang, DeepSeek's tile-kernels package and a CUDA device (and
    Triton, which serves the ops TileKernels does not have)."""
    for module in ("tilelang", "tile_kernels", "triton"):
        probe = _probe_import(module)
        if not probe.available:
            return probe
    import torch

    if not torch.cuda.is_available():
        return Availability(False, "tilelang is installed but no CUDA device is visible")
    return Availability(True, "")


@functools.lru_cache(maxsize=None)
def transformer_engine_availability() -> Availability:
    """Transformer-Engine (for the TE layer spec)."""
    return _probe_import("transformer_engine.pytorch")


def backend_report() -> Dict[str, Availability]:
    """Availability of every kernel backend, for logs and ``megatron-mhc info``."""
    return {
        "torch": Availability(True, ""),
        "triton": triton_availability(),
        "tilelang": tilelang_availability(),
    }


#: Preference order of ``auto``: Triton first, since it serves every dtype and hidden size and
#: measured within a point of ``tilelang`` at the layer level (benchmarks/RESULTS.md).
AUTO_ORDER = ("triton", "tilelang", "torch")

#: The committed measurements behind ``auto``'s order, per GPU generation (compute capability
#: major). A generation not listed was not measured: ``auto`` keeps ``AUTO_ORDER`` there.
AUTO_MEASURED = {
    9: "measured on Hopper (H100): Triton's entry forward 231 us against 546 us for this "
       "project's CUDA entry forward (kernels/cuda, one read of x; C 4096, 8192 tokens, n 4, "
       "bf16; benchmarks/results/2026-12-06_h100/), so the CUDA kernel is no backend; the CUDA "
       "merge + projection runs inside Triton's cross-sublayer fusion, which stays off: no faster "
       "end to end (TE block C 4096 +13.6 % vs +13.7 %, graphed 12-layer C 768 about 1 % slower; "
       "benchmarks/results/2026-12-06_h100_wgrad_moe_fusion/)",
}


def auto_choice_reason(capability: Optional[Tuple[int, int]] = None) -> str:
    """Why ``auto`` resolves as it does on a GPU of compute ``capability`` (default: the current
    device's; ``None`` without a GPU), for ``megatron-mhc info``."""
    if capability is None and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
    order = ", ".join(AUTO_ORDER)
    if capability is None:
        return f"no GPU: the first available of {order}"
    measured = AUTO_MEASURED.get(capability[0])
    if measured is None:
        return (f"sm_{capability[0]}{capability[1]} not measured: the first available of {order} "
                "(benchmarks/bench_entry_forward.py and bench_layer.py measure a GPU)")
    return f"the first available of {order}; {measured}"


def resolve_backend(requested: str) -> str:
    """Turn a requested backend (``auto`` included) into one that can run here.

    ``auto`` picks the first available of ``AUTO_ORDER``; an explicitly requested backend that is
    not available raises a ``RuntimeError`` saying why (never a silent fallback).
    """
    if requested not in KERNEL_BACKENDS:
        raise ValueError(
            f"--mhc-kernel-backend {requested!r} is invalid; allowed: {', '.join(KERNEL_BACKENDS)}"
        )
    report = backend_report()
    if requested == "auto":
        for name in AUTO_ORDER:
            if report[name].available:
                return name
    status = report[requested]
    if not status.available:
        raise RuntimeError(
            f"--mhc-kernel-backend {requested} is not available here: {status.reason}. "
            f"Use --mhc-kernel-backend auto or torch, or install it "
            f"(pip install 'megatron-mhc[{requested}]')."
        )
    return requested


def get_backend_ops(name: str):
    """The ``MHCOps`` of a *resolved* backend name (``torch``, ``triton`` or ``tilelang``).

    Use ``resolve_backend`` first to turn ``auto`` into a name and to get a clear error for a
    backend that is not installed. The kernel modules are imported here, on first use.
    """
    if name == "torch":
        from megatron_mhc.core.ops.opset import TORCH_OPS

        return TORCH_OPS
    if name == "triton":
        from megatron_mhc.kernels.triton import TRITON_OPS

        return TRITON_OPS
    if name == "tilelang":
        from megatron_mhc.kernels.tilelang import TILELANG_OPS

        return TILELANG_OPS
    raise ValueError(f"unknown mHC kernel backend {name!r}; allowed: torch, triton, tilelang")
