"""The overlapped schedule's stream part (``MHCConfig.overlap`` / ``--mhc-overlap``).

The paper runs the MLP sublayer's fused post/residual kernel on a dedicated high-priority compute
stream, so that the n-fold wider stage-to-stage traffic and the kernels of the other micro-batch
in flight do not delay it (the stage output it produces is what the pipeline sends next).

``run_on_high_priority_stream(fn, *tensors)`` launches ``fn`` on a per-device stream created with
the highest priority the device offers:

* the side stream first waits for everything queued so far on the current stream (the inputs);
* the current stream then waits for the side stream (an event, no host synchronisation), so
  every later kernel sees the result;
* the caching allocator is told that the inputs are used on the side stream and the outputs on the
  current one (``record_stream``), so neither is reused before the other stream is done with it.

Autograd runs each backward function on the stream its forward ran on and synchronises the
streams at the boundaries itself, so the merge's backward also runs on the high-priority stream.
Off CUDA (CPU tests) the function simply runs ``fn``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch

_STREAMS: Dict[int, "torch.cuda.Stream"] = {}


def high_priority_stream(device: torch.device) -> "torch.cuda.Stream":
    """The process's high-priority side stream for ``device`` (created once)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _STREAMS.get(index)
    if stream is None:
        _, highest = torch.cuda.Stream.priority_range()
        stream = torch.cuda.Stream(device=index, priority=highest)
        _STREAMS[index] = stream
    return stream


def run_on_high_priority_stream(fn: Callable[..., Any], *tensors: torch.Tensor):
    """``fn(*tensors)`` on the high-priority stream, ordered with the current stream both ways.
    ``fn`` returns a tensor or a tuple of results with ``record_stream`` (or ``None``)."""
    if not tensors[0].is_cuda:
        return fn(*tensors)
    current = torch.cuda.current_stream(tensors[0].device)
    side = high_priority_stream(tensors[0].device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn(*tensors)
    current.wait_stream(side)
    for tensor in tensors:
        tensor.record_stream(side)
    for result in out if isinstance(out, tuple) else (out,):
        if result is not None:
            result.record_stream(current)
    return out
