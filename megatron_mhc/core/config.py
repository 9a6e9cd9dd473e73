"""MHCConfig: every mHC knob in one validated dataclass.

Each field maps to one Megatron-LM flag (see ``FLAG_NAMES``); a bad value raises a ``ValueError``
that names the field, its flag and the allowed values, at construction time (``__post_init__``),
following Megatron-Core's own ``TransformerConfig`` idiom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

VARIANTS = ("mhc", "hc", "residual")
INIT_METHODS = ("default", "function_preserving")
KERNEL_BACKENDS = ("auto", "torch", "triton", "tilelang")
#: How the mHC recompute's backward rebuilds a block's streams (``megatron_mhc.core.recompute``).
RECOMPUTE_REBUILDS = ("auto", "block", "sublayer")
MAX_EXPANSION_RATE = 16

#: Field name -> the Megatron-LM command-line flag that sets it.
FLAG_NAMES = {
    "expansion_rate": "--mhc-expansion-rate",
    "variant": "--mhc-variant",
    "sinkhorn_iters": "--mhc-sinkhorn-iters",
    "gate_init": "--mhc-gate-init",
    "init_method": "--mhc-init-method",
    "res_init_logit": "--mhc-res-init-logit",
    "norm_eps": "--mhc-norm-eps",
    "kernel_backend": "--mhc-kernel-backend",
    "recompute_block": "--mhc-recompute-block",
    "recompute_rebuild": "--mhc-recompute-rebuild",
    "overlap": "--mhc-overlap",
}


#: Field name -> the ``argparse`` destination of its flag (``args.mhc_<field>``).
ARG_DESTS = {field: "mhc_" + field for field in FLAG_NAMES}


def _bad(field: str, value, allowed: str) -> ValueError:
    return ValueError(
        f"MHCConfig.{field}={value!r} ({FLAG_NAMES[field]}) is invalid; allowed: {allowed}"
    )


@dataclass
class MHCConfig:
    """Configuration of the manifold-constrained hyper-connections wrapped around each sublayer.

    Attributes:
        expansion_rate: n, the number of residual streams (2..16; forced to 1 for residual).
        variant: ``mhc`` (Sinkhorn-projected H_res), ``hc`` (unconstrained Hyper-Connections with
            tanh on the dynamic part) or ``residual`` (the plain residual stream, n = 1).
        sinkhorn_iters: alternating row/column normalisations in the Sinkhorn-Knopp projection.
        gate_init: initial value of the three scalar gates alpha_pre, alpha_post, alpha_res.
        init_method: ``default`` (gates ``gate_init``) or ``function_preserving`` (gates 0: a
            fresh model computes exactly the plain model's function; phi is random either way).
        res_init_logit: diagonal of the static H_res logits at init (off-diagonal 0); larger is
            closer to the identity. Only used by ``mhc``.
        norm_eps: epsilon of the RMS norm over the flattened n*C vector.
        kernel_backend: ``auto`` | ``torch`` | ``triton`` | ``tilelang``.
        recompute_block: L_r, layers per mHC recompute block (None: no mHC recompute; 0: choose
            the memory-optimal value automatically).
        recompute_rebuild: how the backward rebuilds a recompute block's streams: ``block`` (all
            of them at its first use, each kept until its last use: one merge per stream),
            ``sublayer`` (each from the block input when its sublayer's backward needs it, only
            that one kept: one rebuilt stream alive, for L_r*(2*L_r - 1) merges per block
            instead of 2*L_r - 1) or ``auto`` (``sublayer`` for the last block of a model
            chunk, where the backward starts at the memory peak; ``block`` for the others).
            Other than ``auto`` only with ``recompute_block``.
        overlap: the overlapped schedule (``megatron_mhc.core.overlap``): each MLP sublayer's
            post/residual merge runs on a high-priority CUDA stream; through ``--mhc-overlap``
            (``megatron_mhc.training.hooks``) the 1F1B schedule also stops synchronising the host after
            every stage-to-stage transfer (``batch_p2p_sync``), and the interleaved schedule's
            p2p overlap covers the warm-up and flush phases. False keeps Megatron's behaviour.
    """

    expansion_rate: int = 4
    variant: str = "mhc"
    sinkhorn_iters: int = 20
    gate_init: float = 0.01
    init_method: str = "default"
    res_init_logit: float = 4.0
    norm_eps: float = 1e-6
    kernel_backend: str = "auto"
    recompute_block: Optional[int] = None
    recompute_rebuild: str = "auto"
    overlap: bool = False

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise _bad("variant", self.variant, ", ".join(VARIANTS))
        if self.variant == "residual":
            # The plain residual has one stream: the rate is ignored, so an ablation is exactly
            # one flag (--mhc-variant) away from the mHC run.
            self.expansion_rate = 1
        elif (
            isinstance(self.expansion_rate, bool)
            or not isinstance(self.expansion_rate, int)
            or not 2 <= self.expansion_rate <= MAX_EXPANSION_RATE
        ):
            raise _bad(
                "expansion_rate", self.expansion_rate, f"an integer in 2..{MAX_EXPANSION_RATE}"
            )
        if not isinstance(self.sinkhorn_iters, int) or not 1 <= self.sinkhorn_iters <= 1000:
            raise _bad("sinkhorn_iters", self.sinkhorn_iters, "an integer in 1..1000")
        if not _finite(self.gate_init) or self.gate_init < 0:
            raise _bad("gate_init", self.gate_init, "a finite float >= 0")
        if self.init_method not in INIT_METHODS:
            raise _bad("init_method", self.init_method, ", ".join(INIT_METHODS))
        if not _finite(self.res_init_logit) or not 0 <= self.res_init_logit <= 30:
            raise _bad("res_init_logit", self.res_init_logit, "a float in [0, 30]")
        if not _finite(self.norm_eps) or not 0 < self.norm_eps < 1:
            raise _bad("norm_eps", self.norm_eps, "a float in (0, 1)")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise _bad("kernel_backend", self.kernel_backend, ", ".join(KERNEL_BACKENDS))
        if self.recompute_block is not None and (
            not isinstance(self.recompute_block, int) or self.recompute_block < 0
        ):
            raise _bad(
                "recompute_block", self.recompute_block, "None, 0 (automatic) or a positive integer"
            )
        if self.recompute_rebuild not in RECOMPUTE_REBUILDS:
            raise _bad("recompute_rebuild", self.recompute_rebuild, ", ".join(RECOMPUTE_REBUILDS))
        if self.recompute_rebuild != "auto" and self.recompute_block is None:
            raise _bad("recompute_rebuild", self.recompute_rebuild,
                       f"'auto' unless {FLAG_NAMES['recompute_block']} is set (there is no mHC "
                       "recompute to rebuild streams for)")
        if not isinstance(self.overlap, bool):
            raise _bad("overlap", self.overlap, "True or False")

    @property
    def n(self) -> int:
        """The number of residual streams."""
        return self.expansion_rate

    @property
    def is_residual(self) -> bool:
        """True when the layer runs as the plain residual (no streams, no mappings)."""
        return self.variant == "residual"

    @property
    def mapping_width(self) -> int:
        """Width of the projected mapping vector: n (pre) + n (post) + n*n (res)."""
        return self.n * self.n + 2 * self.n

    def as_dict(self) -> dict:
        """The fields as a plain dict (for logging and checkpoint metadata)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def mhc_config_from_args(args) -> Optional["MHCConfig"]:
    """The ``MHCConfig`` that Megatron's parsed flags describe (unset ones: the defaults), or None
    without ``--enable-mhc``. Raises the ``ValueError`` of a bad value, naming its flag."""
    if not getattr(args, "enable_mhc", False):
        return None
    values = {}
    for field, dest in ARG_DESTS.items():
        value = getattr(args, dest, None)
        if value is not None:
            values[field] = value
    return MHCConfig(**values)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: ``--cuda-graph-impl`` values the mHC layer runs under.
CUDA_GRAPH_IMPLS = ("none", "local", "transformer_engine")
#: Why the other ``--cuda-graph-impl`` values are refused.
_REFUSED_GRAPH_IMPLS = {
    "full_iteration": "the whole-step capture was not run with mHC (the host-side state the layer "
                      "keeps between forwards is not replayed by it)",
}
#: ``--cuda-graph-modules`` scopes run with ``--cuda-graph-impl transformer_engine`` and mHC
#: (none given: the whole layer).
TE_GRAPH_MODULES = ("attn",)
#: TE graph scopes that stop inside the MoE layer (Megatron's partial-MoE replay).
_PARTIAL_MOE_GRAPH_MODULES = ("moe_router", "moe_preprocess")


def cuda_graph_problems(cuda_graph_impl: Optional[str], mhc_config: MHCConfig,
                        cuda_graph_modules=None) -> list:
    """Why ``--cuda-graph-impl`` (and ``--cuda-graph-modules``) cannot be used with this mHC
    configuration (empty: they can).

    ``local`` (per-layer graphs of Megatron's ``CudaGraphManager``) captures the layer's own
    ``forward``, so the mHC ops are inside the graph (replay = eager on an H100).
    ``transformer_engine`` (Megatron's ``TECudaGraphHelper``) captures ``_forward_attention`` /
    ``_forward_mlp``, which run the mHC work: the layer gives n*C-wide static inputs after the
    first layer and, with the ``attn`` scope, opens the MLP side's pass itself after a replay
    (replay = eager on an H100, whole layer and ``attn``; other scopes and the ``hc`` /
    ``residual`` variants were not run). ``full_iteration`` was never run with mHC.
    The mHC recompute registry and the high-priority merge stream are host-side logic a graph
    replay does not run, so they are refused with graphs.
    """
    impl = cuda_graph_impl or "none"
    if impl == "none":
        return []
    if impl not in CUDA_GRAPH_IMPLS:
        why = _REFUSED_GRAPH_IMPLS.get(impl, "unknown to megatron-mhc")
        return [f"--cuda-graph-impl {impl} is not supported with mHC ({why}); allowed: "
                + ", ".join(CUDA_GRAPH_IMPLS)]
    problems = []
    modules = [str(getattr(m, "name", m)) for m in (cuda_graph_modules or [])]
    if impl == "local" and modules:
        problems.append(f"--cuda-graph-modules {' '.join(modules)} with --cuda-graph-impl local "
                        "is not supported with mHC: only whole-layer graphs (no "
                        "--cuda-graph-modules) were run with mHC")
    if impl == "transformer_engine":
        unrun = [m for m in modules if m not in TE_GRAPH_MODULES]
        if unrun:
            partial = [m for m in unrun if m in _PARTIAL_MOE_GRAPH_MODULES]
            why = ("not run" if not partial else
                   f"{'/'.join(partial)} end the graph inside the MoE layer, after the MLP entry: "
                   "its H_post / H_res would have to leave the graph for the merge after the "
                   "experts, and Megatron's partial-MoE replay returns only the router's outputs "
                   "and the residual")
            problems.append(f"--cuda-graph-modules {' '.join(unrun)} with --cuda-graph-impl "
                            f"transformer_engine is not supported with mHC ({why}); allowed: "
                            + ", ".join(TE_GRAPH_MODULES) + " (or none: the whole layer)")
        if mhc_config.variant != "mhc":
            problems.append(f"--cuda-graph-impl transformer_engine with --mhc-variant "
                            f"{mhc_config.variant} is not supported (TE graphs were run with "
                            "--mhc-variant mhc only); use --cuda-graph-impl local")
    if mhc_config.is_residual:
        return problems
    if mhc_config.recompute_block is not None:
        problems.append(f"--mhc-recompute-block with --cuda-graph-impl {impl}: the mHC recompute "
                        "runs on the host and a graph replay skips it; drop --mhc-recompute-block")
    if mhc_config.overlap:
        problems.append(f"--mhc-overlap with --cuda-graph-impl {impl}: the high-priority merge "
                        "stream is not captured; drop --mhc-overlap")
    return problems
