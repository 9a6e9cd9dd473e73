"""The mHC entry forward as one CUDA kernel that reads x once (``entry_forward.cu``).

``entry_forward(x, phi, alpha, bias, variant_mhc, iters, eps)`` has the contract of
``triton.mappings._mappings_forward(..., with_pre=True)``: it returns
``(x2, phi_c, alpha_f, bias_f, proj, rinv), h_pre, h_post, h_res, agg`` -- the tensors the Triton
entry backward saves (``proj`` the raw ``x @ phi`` in float32, ``rinv = 1 / rms(x)``), the
mappings in float32 and ``agg = sum_i H_pre[i] x[i]`` in x's dtype. So the Triton entry's
backward runs unchanged on what it returns (``enter`` below is that pairing as an autograd op).

Where the kernel does not apply (no CUDA, not a Hopper GPU, float32 x, n > 8, C not a multiple of
8, no nvcc, a failed build, no plan that fits shared memory) ``entry_forward`` falls back to the
Triton forward; ``availability()`` / ``unsupported_reason()`` say why.

Build: the first call compiles ``entry_forward.cu`` with nvcc into a shared library loaded
through ctypes (``_build.py``: where it goes, how it is named).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from megatron_mhc.kernels.cuda._build import Library, hopper_availability

_DTYPES = {torch.bfloat16: 0, torch.float16: 1}
#: Tokens per tile of the default plan (8 or 16; MHC_CUDA_ENTRY_TOKENS overrides).
TOKENS_PER_TILE = int(os.environ.get("MHC_CUDA_ENTRY_TOKENS", "8"))


def _declare(lib) -> None:
    lib.mhc_entry_forward.restype = ctypes.c_int
    lib.mhc_entry_forward.argtypes = (
        [ctypes.c_void_p] * 10
        + [ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_float]
        + [ctypes.c_int] * 9 + [ctypes.c_void_p])
    lib.mhc_entry_last_error.restype = ctypes.c_char_p
    lib.mhc_entry_last_plan.argtypes = [ctypes.POINTER(ctypes.c_int)]


LIBRARY = Library(Path(__file__).with_name("entry_forward.cu"), "libmhc_entry",
                  "CUDA entry kernel", _declare)


def library_path() -> Path:
    """Where the built library for the current source and flags lives (built or not)."""
    return LIBRARY.path()


def _load():
    """The loaded library, building it first if needed; raises RuntimeError with the reason."""
    return LIBRARY.get()


def availability() -> Tuple[bool, str]:
    """(usable on this machine, reason): a Hopper GPU and a library that builds and loads.
    Builds the library on first call."""
    return hopper_availability(LIBRARY)


def unsupported_reason(x: torch.Tensor, phi: torch.Tensor) -> Optional[str]:
    """Why the CUDA kernel does not take these inputs (None: it does)."""
    if not x.is_cuda:
        return "x is not on a CUDA device"
    if x.dtype not in _DTYPES:
        return f"x dtype {x.dtype} (the kernel takes bfloat16 / float16)"
    n, c = x.shape[-2], x.shape[-1]
    if not 1 <= n <= 8:
        return f"n = {n} streams (the kernel takes 1..8)"
    if c % 8:
        return f"C = {c} is not a multiple of 8"
    if phi.shape != (n * c, n * n + 2 * n):
        return "phi shape"
    ok, reason = hopper_availability(LIBRARY, x.device)
    return None if ok else reason


def last_plan() -> dict:
    """The launch plan of the last call: cluster size, x stages, pre-apply distance, clusters,
    shared memory bytes per CTA."""
    lib = _load()
    buf = (ctypes.c_int * 6)()
    lib.mhc_entry_last_plan(buf)
    return dict(zip(("cluster", "stages", "distance", "clusters", "smem", "tokens"), list(buf)))


def _triton_forward(x, phi, alpha, bias, variant_mhc, iters, eps):
    from megatron_mhc.kernels.triton.mappings import _mappings_forward

    return _mappings_forward(x, phi, alpha, bias, variant_mhc, iters, eps, with_pre=True)


def entry_forward(x, phi, alpha, bias, variant_mhc=True, iters: int = 20, eps: float = 1e-6, *,
                  out=None, plan=None, max_clusters: int = 0, fallback: bool = True,
                  _debug: int = 0):
    """One-pass entry forward; same returns as ``_mappings_forward(..., with_pre=True)``.

    ``variant_mhc``: True / "mhc" or False / "hc". ``out``: optional preallocated
    ``(proj [T, M] f32, rinv [T] f32, h_pre [T, n] f32, h_post [T, n] f32, h_res [T, n, n] f32,
    agg [T, C] x.dtype)``. ``plan``: optional ``(cluster, stages, distance[, tokens])``
    overriding the default launch plan (0 / -1 entries keep the default); ``max_clusters``: cap
    on the persistent grid (tests). ``fallback``: inputs the kernel does not take go to the
    Triton forward (else ValueError)."""
    if isinstance(variant_mhc, str):
        if variant_mhc not in ("mhc", "hc"):
            raise ValueError(f"variant must be 'mhc' or 'hc', got {variant_mhc!r}")
        variant_mhc = variant_mhc == "mhc"
    reason = unsupported_reason(x, phi)
    if reason is not None:
        if fallback:
            return _triton_forward(x, phi, alpha, bias, variant_mhc, iters, eps)
        raise ValueError(f"CUDA entry forward does not take these inputs: {reason}")
    lib = _load()
    n, c = x.shape[-2], x.shape[-1]
    kdim, m = n * c, n * n + 2 * n
    x2 = x.reshape(-1, kdim)
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    t = x2.shape[0]
    dev = x2.device
    phi_c = phi if phi.is_contiguous() else phi.contiguous()  # saved for the backward
    alpha_c = alpha if alpha.is_contiguous() else alpha.contiguous()
    bias_c = bias if bias.is_contiguous() else bias.contiguous()
    phi_k = phi_c if phi_c.dtype == x.dtype else phi_c.to(x.dtype)  # the projection's operand
    if x2.data_ptr() % 16:  # 16-byte bulk copies and vector loads
        x2 = x2.clone()
    if phi_k.data_ptr() % 16:
        phi_k = phi_k.clone()
    alpha_k = alpha_c if alpha_c.dtype == torch.float32 else alpha_c.float()
    bias_k = bias_c if bias_c.dtype == torch.float32 else bias_c.float()
    if out is None:
        proj = torch.empty(t, m, device=dev, dtype=torch.float32)
        rinv = torch.empty(t, device=dev, dtype=torch.float32)
        h_pre = torch.empty(t, n, device=dev, dtype=torch.float32)
        h_post = torch.empty(t, n, device=dev, dtype=torch.float32)
        h_res = torch.empty(t, n, n, device=dev, dtype=torch.float32)
        agg = torch.empty(t, c, device=dev, dtype=x.dtype)
    else:
        proj, rinv, h_pre, h_post, h_res, agg = out
        if agg.data_ptr() % 16 or not all(v.is_contiguous() for v in out):
            raise ValueError("out tensors must be contiguous, agg 16-byte aligned")
    cl, stages, dist, tokens = (tuple(plan) + (TOKENS_PER_TILE,))[:4] if plan else (
        0, 0, -1, TOKENS_PER_TILE)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        rc = lib.mhc_entry_forward(
            x2.data_ptr(), phi_k.data_ptr(), alpha_k.data_ptr(), bias_k.data_ptr(),
            proj.data_ptr(), rinv.data_ptr(), h_pre.data_ptr(), h_post.data_ptr(),
            h_res.data_ptr(), agg.data_ptr(), t, n, c, float(eps), int(iters),
            int(bool(variant_mhc)), _DTYPES[x.dtype], int(cl), int(stages), int(dist),
            int(tokens), int(max_clusters), int(_debug), stream)
    if rc != 0:
        msg = lib.mhc_entry_last_error().decode()
        if fallback and "fits" in msg:  # no launch plan for this shape: Triton
            return _triton_forward(x, phi, alpha, bias, variant_mhc, iters, eps)
        raise RuntimeError(f"CUDA entry forward failed: {msg}")
    return (x2, phi_c, alpha_c, bias_c, proj, rinv), h_pre, h_post, h_res, agg


class _CudaEntryFunction(torch.autograd.Function):
    """``triton.entry._EntryFunction`` with this forward: the same saved tensors, the same backward
    (``triton.entry._entry_backward``)."""

    @staticmethod
    def forward(ctx, x, phi, alpha, bias, variant_mhc: bool, iters: int, eps: float):
        lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
        saved, h_pre, h_post, h_res, agg = entry_forward(x, phi, alpha, bias, variant_mhc,
                                                         iters, eps)
        ctx.save_for_backward(*saved, h_pre)
        ctx.meta = (lead, n, c, variant_mhc, iters, (phi.dtype, alpha.dtype, bias.dtype))
        ctx.params = (phi, alpha, bias)
        return agg.view(*lead, c), h_post.view(*lead, n), h_res.view(*lead, n, n)

    @staticmethod
    def backward(ctx, d_agg, dh_post, dh_res):
        from megatron_mhc.kernels.triton.entry import _entry_backward

        return (*_entry_backward(ctx, d_agg, dh_post, dh_res), None, None, None)


def enter(x, phi, alpha, bias, variant="mhc", sinkhorn_iters=20, eps=1e-6):
    """``triton.enter`` with the one-pass CUDA forward (Triton forward where it does not
    apply); the backward is the Triton entry's."""
    from megatron_mhc.kernels.triton.mappings import _check_mapping_args

    _check_mapping_args(x, phi, variant, "enter")
    return _CudaEntryFunction.apply(x, phi, alpha, bias, variant == "mhc", int(sinkhorn_iters),
                                    float(eps))
