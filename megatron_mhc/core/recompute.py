"""Recompute of the n-stream residual in blocks of L_r layers (the paper's mHC recompute).

Without recompute every sublayer keeps its n*C-wide input stream x_k for the backward (the
mappings and the merge need it): n times the plain model's residual memory. With blocks of L_r
layers, only each block's first stream is stored; a later stream of the block is rebuilt in the
backward from the one before it, x_{k+1} = H_res,k x_k + H_post,k^T y_k, using the sublayer output
y_k and the per-token mappings, which the merge keeps anyway (C-wide and tiny).

Mechanism: saved-tensor hooks around the mHC ops of each sublayer. When an op saves a stream that
this module produced (recognised by its storage), the hook stores a small token instead; the
unpack hook rebuilds the stream on first use in the backward and caches it until its last use.

Rebuild policies (``MHCConfig.recompute_rebuild``). The backward meets a block's streams last
first, so the first rebuild runs the whole chain from the block input:

* ``block`` keeps every stream of that chain until its own last use: one merge per stream, but
  the whole block (2*L_r - 1 streams of a GPT block) is alive at the start of the block's
  backward;
* ``sublayer`` keeps only the stream asked for, and rebuilds the one the backward asks for next
  again from the block input (or the nearest stream still cached): at most one rebuilt stream
  alive, for L_r*(2*L_r - 1) merges per GPT block instead of 2*L_r - 1. Backends with
  ``merge_into`` (Triton) merge along the chain in one buffer, so a rebuild allocates one stream;
* ``auto`` (the default) rebuilds the last block of a forward chain (a model chunk's last
  layers, whose backward starts while every activation of the micro-batch is still held: the
  memory peak) sublayer by sublayer, and every other block as ``block``: by the time an earlier
  block is rebuilt, the later layers' activations are freed, far more than its streams take.

L_r choice: per token, the stored block inputs take n*C*ceil(L/L_r) and the backward of one
block holds about (n+2)*C*L_r (its rebuilt streams and sublayer data); minimising
n*C*L/L_r + (n+2)*C*L_r gives the paper's L_r* = sqrt(n*L/(n+2)), rounded and at least 1, the
default for ``recompute_block=0`` (L = the layers of one pipeline stage). Measured on an H100 with
8 layers (benchmarks/RESULTS.md): peak memory 1.43x the plain model without recompute, 1.27x /
1.23x / 1.27x with L_r = 1 / 2 / 4 (2 = L_r*), for +1.3 points of step time (local spec,
``block`` rebuilds). The ``auto`` rebuild keeps the last block's term at one stream, so a larger
L_r then trades merges for memory: on TE (8 layers, C = 4096) 1.32x at L_r = 2 and 1.26x at
L_r = 4, for +2.7 / +5.1 points over no recompute (RESULTS.md, sixth part).
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from megatron_mhc.core.config import RECOMPUTE_REBUILDS


def optimal_recompute_block(n: int, num_layers: int) -> int:
    """The paper's memory-optimal block size L_r* = sqrt(n L / (n + 2)), rounded, at least 1."""
    return max(1, round(math.sqrt(n * num_layers / (n + 2))))


class _Stream:
    """One stream of a block: the stored block input (a root), or how to rebuild a merged stream.

    A root also holds its block's rebuild policy: ``keep_chain`` (True: ``block``, False:
    ``sublayer``), which under ``auto`` turns True once a later block follows this one."""

    __slots__ = ("tensor", "parent", "root", "rebuild", "stored", "keep_chain", "auto",
                 "uses_left", "cache", "__weakref__")

    def __init__(self, tensor: Tensor, parent: Optional["_Stream"],
                 rebuild: Optional[Callable[[Tensor, Optional[Tensor]], Tensor]],
                 policy: str = "block"):
        self.tensor = weakref.ref(tensor)  # alive while the forward still holds it
        self.parent = parent
        # None for a root (no reference cycle: a root must be freed as soon as unused).
        self.root = None if parent is None else (parent.root or parent)
        self.rebuild = rebuild
        # The block input is saved by the mHC ops anyway; holding it here costs nothing extra
        # and ends with the last token of its block (tokens -> entries -> parent chain).
        self.stored = tensor if parent is None else None
        self.keep_chain = policy == "block"
        self.auto = policy == "auto"
        self.uses_left = 0
        self.cache: Optional[Tensor] = None

    def _value(self) -> Optional[Tensor]:
        return self.stored if self.stored is not None else self.cache

    def materialise(self) -> Tensor:
        """This stream's value, rebuilt (and cached) from the nearest stored or cached ancestor.

        Ancestors rebuilt on the way are cached too when the block keeps its chain (``block``:
        they are asked for next), dropped otherwise (``sublayer``)."""
        keep_chain = (self.root or self).keep_chain
        chain = []
        node = self
        while node._value() is None:
            chain.append(node)
            node = node.parent
        value, owned = node._value(), False
        with torch.no_grad():
            for stream in reversed(chain):
                # A value no stream holds is overwritten by its child (the rebuild may merge in
                # place), so a sublayer rebuild keeps one buffer for its whole chain.
                value = stream.rebuild(value, value if owned else None)
                owned = not (stream is self or keep_chain)
                if not owned:
                    stream.cache = value
        return value


class StreamRecompute:
    """Registry of the live streams of the blocks in flight (micro-batches included).

    Live streams are found by their storage; a saved stream becomes a token holding its
    ``_Stream``, so a later reuse of the same memory cannot be mistaken for it.
    """

    def __init__(self):
        # Weak values: an entry lives as long as its tensor (which carries it as an attribute),
        # its tokens in the autograd graph, or a child stream; then it leaves this map by itself.
        self.live: "weakref.WeakValueDictionary[int, _Stream]" = weakref.WeakValueDictionary()
        self.lock = threading.Lock()

    @staticmethod
    def _key(t: Tensor) -> int:
        return t.untyped_storage().data_ptr()

    def _lookup(self, t: Tensor) -> Optional[_Stream]:
        entry = self.live.get(self._key(t))
        if entry is None or entry.tensor() is None:
            return None
        return entry

    def is_live(self, t: Tensor) -> bool:
        """Whether ``t`` (or a view of its storage) is a registered stream still in use."""
        with self.lock:
            return self._lookup(t) is not None

    def retarget(self, t: Tensor) -> None:
        """Let the live stream sharing ``t``'s storage be tracked through ``t`` (a new tensor
        object for the same memory, e.g. a layer's returned viewless output)."""
        with self.lock:
            entry = self._lookup(t)
            if entry is not None:
                entry.tensor = weakref.ref(t)
                t._mhc_stream = entry

    def add_block_input(self, x: Tensor, policy: str = "block") -> _Stream:
        """Register x as a block input: stored as usual (the mHC ops save it), never rebuilt.
        ``policy``: how the backward rebuilds the streams merged from it (``RECOMPUTE_REBUILDS``).
        Under ``auto``, a block whose last stream x is stops rebuilding sublayer by sublayer:
        it is not the last block of its chain, so its backward does not start at the peak.

        The caller drops it (``drop``) once its layer's forward is done: the entry holds x
        strongly for the rebuilds, so its liveness cannot tell."""
        if policy not in RECOMPUTE_REBUILDS:
            raise ValueError(f"rebuild policy {policy!r}: allowed {', '.join(RECOMPUTE_REBUILDS)}")
        with self.lock:
            previous = self._lookup(x)
            if previous is not None:
                previous_root = previous.root or previous
                if previous_root.auto:
                    previous_root.keep_chain = True
            entry = _Stream(x, None, None, policy)
            self.live[self._key(x)] = entry
            return entry

    def drop(self, entry: _Stream) -> None:
        """Stop finding ``entry`` by storage (tokens and child streams still hold it)."""
        with self.lock:
            stored = entry.stored if entry.stored is not None else entry.tensor()
            if stored is not None and self.live.get(self._key(stored)) is entry:
                del self.live[self._key(stored)]

    def add_merged(self, out: Tensor, parent: Tensor,
                   rebuild: Callable[[Tensor, Optional[Tensor]], Tensor]) -> bool:
        """Register ``out = rebuild(parent, buffer)``; False when ``parent`` is in no block in
        flight. ``buffer`` is None or a tensor the rebuild may write its result into (possibly
        ``parent``'s own value, no longer needed)."""
        with self.lock:
            parent_entry = self._lookup(parent)
            if parent_entry is None:
                return False
            entry = _Stream(out, parent_entry, rebuild)
            out._mhc_stream = entry
            self.live[self._key(out)] = entry
            return True

    def pack(self, t: Tensor):
        """Saved-tensor pack hook: a token for a registered (non-input) stream, else the tensor."""
        with self.lock:
            entry = self._lookup(t) if t.dim() > 0 else None
            if entry is None or entry.stored is not None:
                return t
            entry.uses_left += 1
        return ("mhc-stream", entry, t.shape, t.stride(), t.storage_offset())

    def unpack(self, packed):
        """Saved-tensor unpack hook: rebuild a tokenised stream (cached until its last use)."""
        if not (isinstance(packed, tuple) and packed and packed[0] == "mhc-stream"):
            return packed
        _, entry, shape, stride, offset = packed
        with self.lock:
            full = entry.materialise()
            entry.uses_left -= 1
            if entry.uses_left == 0:
                entry.cache = None
        if full.is_cuda:
            # A rebuilt stream is cached for its next use, which may be a backward on another
            # stream (a merge on the high-priority stream, its entry on the compute stream): the
            # caching allocator must not hand its memory out before this stream is done with it.
            full.record_stream(torch.cuda.current_stream(full.device))
        return full.as_strided(shape, stride, offset)


REGISTRY = StreamRecompute()


def saved_stream_hooks():
    """The saved-tensor hooks context the mHC ops of a recomputed sublayer run under."""
    return torch.autograd.graph.saved_tensors_hooks(REGISTRY.pack, REGISTRY.unpack)
