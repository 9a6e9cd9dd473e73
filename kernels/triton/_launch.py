"""Shared pieces of the Triton ops: dtype rules, plain-Python launch arithmetic and the jit
helpers that kernels of several ops call (``_dot_acc``)."""

import os

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Triton's interpreter has no 16-bit tl.dot: 16-bit inputs take the (exact) tf32 path there.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _env_switch(name: str) -> str:
    """The on/off environment switch ``name``: "0" (unset) or "1"; any other value stops with
    an error naming the variable and the allowed values."""
    value = os.environ.get(name, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: allowed 0, 1")
    return value


#: The linked pair's "dx once" backward (``MHC_BACKWARD_DX_ONCE=1``): the merge backward reads
#: only its upstream gradient g and y (dy, dH_post), the entry's mapping pass also sums
#: dH_res = g·xᵀ, and the entry's dx pass applies H_resᵀ·g itself, so the stream's dx is written
#: once per sublayer (56·C instead of 64·C bytes per token at n = 4, bf16). Off by default: not
#: yet timed on a GPU (benchmarks/NOTES_kernels.md, "After v16"). Read at every backward.
BACKWARD_DX_ONCE = _env_switch("MHC_BACKWARD_DX_ONCE")


# Plain-Python launch arithmetic: triton.cdiv / triton.next_power_of_2 are constexpr-function
# wrappers costing several microseconds of host time per call, and every op makes several.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(value: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (value - 1).bit_length())


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous float32 tensor, without a dispatcher call when it already is one."""
    if t.dtype is torch.float32 and t.is_contiguous():
        return t
    return t.to(torch.float32).contiguous()


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _check(x: torch.Tensor, name: str) -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"triton mHC op {name}: dtype {x.dtype} not supported "
                        f"(use float32, bfloat16 or float16, or --mhc-kernel-backend torch)")


def _grad_f32(g, shape, device):
    if g is None:
        return torch.zeros(shape, device=device, dtype=torch.float32)
    return _f32(g.reshape(shape))


@triton.jit
def _dot_acc(a, a_f32, b, acc, DOT_MODE: tl.constexpr):
    """``acc + a @ b`` per DOT_MODE: 0 on ``a``'s 16-bit dtype (``b`` cast by the caller); 1
    float32 ieee; 2 float32 via tf32 (``a_f32`` is ``a`` in float32)."""
    if DOT_MODE == 0:
        return tl.dot(a, b, acc)
    elif DOT_MODE == 1:
        return tl.dot(a_f32, b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a_f32, b.to(tl.float32), acc, input_precision="tf32")
