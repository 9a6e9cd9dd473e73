"""Megatron-Core 0.19 on a machine without a GPU: gloo process groups and CUDA stand-ins.

Used by what users run on CPU-only machines (the demo, ``gain-report --batch``, the checkpoint
converter) and by the test suite. Two levels:

* ``cuda_calls_on_cpu()``: a context in which ``torch.cuda.synchronize`` / ``current_device``
  (which Megatron's dist-ckpt reader and writer call) work without a GPU; restored on exit.
* ``patch_megatron_for_cpu()``: process-wide replacements for a whole CPU training run (below);
  ``unpatch_megatron_for_cpu()`` puts the originals back (test fixtures undo what they patched).

Megatron-Core assumes CUDA in three places that a small CPU run reaches (see
shared/notes/megatron-core-on-cpu.md): the global memory buffer, the default causal mask and the
CUDA RNG tracker; with tensor/sequence parallelism also the collectives' output buffers, which
are allocated on ``torch.cuda.current_device()``, and with pipeline parallelism the schedules'
token counters (``device="cuda"``), with MoE the alltoall dispatcher's side CUDA stream.
``patch_megatron_for_cpu()`` replaces them in this process only, and only when no CUDA device is
visible.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import types

import torch

_PATCHED = False
# (object, attribute name, original value) of every replacement patch_megatron_for_cpu made.
_ORIGINALS: list = []


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """Within the block, ``torch.cuda.synchronize()`` is a no-op and ``current_device()`` is the
    CPU when no CUDA device is visible (Megatron's dist-ckpt calls both); unchanged otherwise."""
    if torch.cuda.is_available() or _PATCHED:
        yield
        return
    synchronize, current_device = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = synchronize, current_device


def patch_megatron_for_cpu() -> None:
    """Make Megatron-Core's CUDA-only helpers work on CPU in this process (idempotent).

    Does nothing where a CUDA device is visible."""
    global _PATCHED
    if _PATCHED or torch.cuda.is_available():
        return
    from megatron.core import utils as core_utils
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import utils as transformer_utils

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        return torch.empty(tuple(tensor_shape), dtype=dtype)

    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    def fork(self, name=None):
        return contextlib.nullcontext()

    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe import token_dispatcher

    move_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # On GPU the split sizes become numpy arrays here; CPU tensors were passed through.
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return move_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    replacements = [
        # Megatron allocates collective outputs with device=torch.cuda.current_device().
        (torch.cuda, "current_device", lambda: torch.device("cpu")),
        # dist-ckpt's writer synchronizes the device before copying tensors.
        (torch.cuda, "synchronize", lambda device=None: None),
        # The pipeline schedules count tokens in torch.zeros(..., device="cuda").
        (schedules, "torch", _TorchOnCPU()),
        # The MoE alltoall dispatcher copies its split sizes to the host on a side CUDA stream.
        (token_dispatcher, "torch", _TorchOnCPU()),
        (token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu),
        (core_utils.GlobalMemoryBuffer, "get_tensor", get_tensor),
        (transformer_utils, "get_default_causal_mask", causal_mask),
        (fused_softmax, "get_default_causal_mask", causal_mask),
        (tp_random.CudaRNGStatesTracker, "fork", fork),
    ]
    for owner, name, value in replacements:
        # vars(): a class's own attribute (a function, not the bound method getattr gives)
        original = vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)
        _ORIGINALS.append((owner, name, original))
        setattr(owner, name, value)
    _PATCHED = True


def unpatch_megatron_for_cpu() -> None:
    """Undo ``patch_megatron_for_cpu()``: every replaced attribute gets its original back, in
    reverse order (idempotent; nothing to do where it did not patch)."""
    global _PATCHED
    while _ORIGINALS:
        owner, name, original = _ORIGINALS.pop()
        setattr(owner, name, original)
    _PATCHED = False


def megatron_cpu_patched() -> bool:
    """Whether ``patch_megatron_for_cpu()``'s replacements are in place in this process."""
    return _PATCHED


class _NoStream:
    """A stand-in CUDA stream / event on CPU: everything is already synchronous."""

    def wait_stream(self, stream):
        return None

    def record_event(self, event=None):
        return self

    def synchronize(self):
        return None


class _CudaOnCPU(types.ModuleType):
    """``torch.cuda`` whose streams are no-ops (one shared stream, so nothing is "on the side")."""

    _stream = _NoStream()

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    def Stream(self, *args, **kwargs):  # noqa: N802 - mirrors torch.cuda.Stream
        return self._stream

    def current_stream(self, device=None):
        return self._stream

    def stream(self, stream):
        return contextlib.nullcontext()


class _TorchOnCPU(types.ModuleType):
    """``torch`` as one Megatron module sees it, with ``device="cuda"`` allocations on CPU and
    no-op CUDA streams."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCPU()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_cpu_distributed(
    rank: int = 0,
    world_size: int = 1,
    port: int | None = None,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
) -> None:
    """Start a gloo process group on loopback and Megatron's model-parallel groups on it."""
    from megatron.core import parallel_state

    patch_megatron_for_cpu()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if port is not None:
            os.environ["MASTER_PORT"] = str(port)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        torch.distributed.init_process_group(
            backend="gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=5),
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        distributed_timeout_minutes=5,
    )
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)


def destroy_cpu_distributed() -> None:
    """Tear down Megatron's groups, the MoE metrics tracker (sized for the last model's layer
    count) and the process group."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    parallel_state.destroy_model_parallel()
    destroy_moe_metrics_tracker()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
