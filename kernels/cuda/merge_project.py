"""The mHC merge fused with the next sublayer's norm + projection partials, one CUDA kernel
(``merge_project.cu``): the cross-sublayer fusion's forward (``merge_linked_project``) without
Triton's tile limits.

``merge_project_forward(x, y, h_post, h_res, next_phi)`` has the contract of
``triton.merge._post_res_proj_forward``'s kernel part: for ``x [T, n, C]``, ``y [T, C]`` (x's
16-bit dtype), ``h_post [T, n]`` and ``h_res [T, n, n]`` (float32) and the next sublayer's
``phi [n*C, n*n + 2n]`` it returns ``out [T, n, C]`` (the merged stream, x's dtype),
``proj_part [S, T, M]`` and ``ss_part [S, T]`` (float32 partial ``out @ phi`` and ``sum out^2``
over S channel slices, from the 16-bit ``out``), or None where the kernel does not apply (no
Hopper GPU, n not 2 or 4, C not a multiple of 8, float32, no nvcc or a failed build:
``unsupported_reason`` says which, and ``MHC_CUDA_MERGE_PROJECT=0`` turns the kernel off); the
caller then runs the Triton kernel. S = ceil(C / 256): more partial slices than Triton's (at
most 16) above C = 4096, so a larger ``proj_part`` and another specialisation of the mapping
kernel that sums them (C = 7168: 28; C = 16384: 64). ``MHC_CUDA_MERGE_PROJECT_VARIANT=1`` picks
the second launch shape for n = 4 (128-channel slices, two CTAs per SM; a probe:
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Optional

import torch

from megatron_mhc.kernels.cuda._build import Library, hopper_availability, hopper_problem

_DTYPES = {torch.bfloat16: 0, torch.float16: 1}
#: ``MHC_CUDA_MERGE_PROJECT``: 1 (default) uses the kernel where it applies, 0 never.
ENABLED = os.environ.get("MHC_CUDA_MERGE_PROJECT", "1")
if ENABLED not in ("0", "1"):
    raise ValueError(f"MHC_CUDA_MERGE_PROJECT={ENABLED!r}: allowed 0, 1")
#: ``MHC_CUDA_MERGE_PROJECT_VARIANT`` (read by the library at each launch): 0 (default) or 1.
if os.environ.get("MHC_CUDA_MERGE_PROJECT_VARIANT", "0") not in ("0", "1"):
    raise ValueError(f"MHC_CUDA_MERGE_PROJECT_VARIANT="
                     f"{os.environ['MHC_CUDA_MERGE_PROJECT_VARIANT']!r}: allowed 0, 1")


def _declare(lib) -> None:
    lib.mhc_merge_project.restype = ctypes.c_int
    lib.mhc_merge_project.argtypes = ([ctypes.c_void_p] * 8
                                      + [ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                         ctypes.c_int, ctypes.c_int, ctypes.c_void_p])
    lib.mhc_merge_project_last_error.restype = ctypes.c_char_p
    lib.mhc_merge_project_slice.restype = ctypes.c_int
    lib.mhc_merge_project_slice.argtypes = [ctypes.c_int]


LIBRARY = Library(Path(__file__).with_name("merge_project.cu"), "libmhc_merge_project",
                  "CUDA merge + projection kernel", _declare)


def availability():
    """(usable here, reason): a Hopper GPU and a library that builds and loads (built on first
    call)."""
    return hopper_availability(LIBRARY)


def status_without_build() -> str:
    """One line for ``megatron-mhc info``: whether the kernel can run here, without building it
    (the build happens at the first fused merge)."""
    from megatron_mhc.kernels.cuda._build import nvcc_path

    if ENABLED == "0":
        return "off (MHC_CUDA_MERGE_PROJECT=0)"
    problem = hopper_problem()
    if problem is not None:
        return f"unavailable: {problem}"
    if LIBRARY.path().is_file():
        return f"available (built: {LIBRARY.path()})"
    if nvcc_path() is None:
        return "unavailable: nvcc not found (set CUDA_HOME)"
    return f"available once built (nvcc, at the first fused merge, into {LIBRARY.path().parent})"


def unsupported_reason(x: torch.Tensor, next_phi: torch.Tensor, y: Optional[torch.Tensor] = None,
                       h_post: Optional[torch.Tensor] = None,
                       h_res: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why the kernel does not take these inputs (None: it does); ``y``, ``h_post``, ``h_res``
    are checked when given."""
    if ENABLED == "0":
        return "MHC_CUDA_MERGE_PROJECT=0"
    if x.dim() != 3 or x.shape[0] == 0 or x.shape[-1] == 0:
        return f"x shape {tuple(x.shape)} (the kernel takes [T > 0, n, C > 0])"
    t, n, c = x.shape
    if x.dtype not in _DTYPES:
        return f"x dtype {x.dtype} (the kernel takes bfloat16 / float16)"
    if n not in (2, 4):
        return f"n = {n} streams (the kernel takes 2 or 4)"
    if c % 8:
        return f"C = {c} is not a multiple of 8"
    expected = {"next_phi": (next_phi, (n * c, n * n + 2 * n)), "y": (y, (t, c)),
                "h_post": (h_post, (t, n)), "h_res": (h_res, (t, n, n))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            return f"{name} shape {tuple(tensor.shape)}, expected {shape}"
        if tensor is not None and tensor.device != x.device:
            return f"{name} on {tensor.device}, x on {x.device}"
    if not x.is_cuda:
        return "x is not on a CUDA device"
    ok, reason = hopper_availability(LIBRARY, x.device)
    return None if ok else reason


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t if t.is_contiguous() else t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def merge_project_forward(x, y, h_post, h_res, next_phi, *, max_ctas: int = 0):
    """``(out, proj_part, ss_part)`` for ``x [T, n, C]`` (see the module docstring), or None when
    ``unsupported_reason`` is not None. ``max_ctas``: cap on the persistent grid (tests)."""
    if unsupported_reason(x, next_phi, y, h_post, h_res) is not None:
        return None
    lib = LIBRARY.get()
    t, n, c = x.shape
    m = n * n + 2 * n
    slice_c = lib.mhc_merge_project_slice(n)
    slices = -(-c // slice_c)
    x3, y2 = _aligned(x), _aligned(y.to(x.dtype))
    hp, hr = _aligned(h_post.float()), _aligned(h_res.float())
    phi = _aligned(next_phi if next_phi.dtype == x.dtype else next_phi.to(x.dtype))
    out = torch.empty_like(x3)
    proj_part = torch.empty(slices, t, m, device=x.device, dtype=torch.float32)
    ss_part = torch.empty(slices, t, device=x.device, dtype=torch.float32)
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        rc = lib.mhc_merge_project(x3.data_ptr(), y2.data_ptr(), hp.data_ptr(), hr.data_ptr(),
                                   phi.data_ptr(), out.data_ptr(), proj_part.data_ptr(),
                                   ss_part.data_ptr(), t, n, c, _DTYPES[x.dtype], int(max_ctas),
                                   stream)
    if rc != 0:
        raise RuntimeError(f"CUDA merge + projection failed: "
                           f"{lib.mhc_merge_project_last_error().decode()}")
    return out, proj_part, ss_part
