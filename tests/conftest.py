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


@pytest.fixture
def megatron_cpu():
    """A world-size-1 gloo process group with Megatron's model-parallel groups (TP=PP=1)."""
    from megatron_mhc.training.cpu import destroy_cpu_distributed, init_cpu_distributed

    init_cpu_distributed()
    torch.manual_seed(1234)
    yield
    destroy_cpu_distributed()
