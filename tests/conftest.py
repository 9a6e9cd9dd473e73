"""Shared fixtures: Megatron-Core on CPU (gloo), patched inside the test process only."""

import os
import sys
import warnings

import pytest
import torch

# Triton kernels run under the interpreter on a machine without a GPU. It must be set before the
# kernels are first imported (triton.jit reads it when it wraps a function).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Spawned worker processes import helpers from this folder.
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*absl.logging is not installed.*")


# Environment variables that the product (init_cpu_distributed, the demo) sets for the process.
_PROCESS_ENV = ("MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def _undo_process_wide_patches():
    """Whatever a test (or the product code it ran in process) changed for the whole process is
    undone after it, so no test passes or fails because of another test that ran before it:
    Megatron's gradient-buffer layout (``apply_mhc_to_spec`` aligns it), the CPU replacements of
    ``patch_megatron_for_cpu`` (made by ``init_cpu_distributed``, also inside the demo or the
    converter run in process) and the rendezvous / interpreter environment variables."""
    env = {name: os.environ.get(name) for name in _PROCESS_ENV}
    yield
    from megatron_mhc.training import cpu, grad_buffer_layout

    grad_buffer_layout.unalign_grad_buffers()
    cpu.unpatch_megatron_for_cpu()
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def megatron_cpu():
    """A world-size-1 gloo process group with Megatron's model-parallel groups (TP=PP=1), and
    Megatron's CUDA-only helpers replaced for CPU; all undone after the test."""
    from megatron_mhc.training.cpu import (
        destroy_cpu_distributed,
        init_cpu_distributed,
        unpatch_megatron_for_cpu,
    )

    init_cpu_distributed()
    torch.manual_seed(1234)
    yield
    destroy_cpu_distributed()
    unpatch_megatron_for_cpu()


@pytest.fixture
def merge_x_reads(monkeypatch):
    """A list of the ``with_x`` of every Triton merge backward that runs from here on (False: the
    "dx once" backward's merge, which reads no x and writes no dx). Skips without Triton."""
    pytest.importorskip("triton")
    from megatron_mhc.kernels.triton import merge

    calls = []
    real = merge._post_res_backward

    def spy(ctx, dout, with_x=True):
        calls.append(with_x)
        return real(ctx, dout, with_x)

    monkeypatch.setattr(merge, "_post_res_backward", spy)
    return calls
