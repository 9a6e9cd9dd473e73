"""The functions the patched Megatron-LM calls (``patches/core_v0.19.0``); all mHC logic is here.

Each patched file holds only a guarded import of ``megatron_mhc.hooks`` (the stable name that
re-exports this module's hooks) and one call per hook:

* ``megatron/training/arguments.py``: ``add_mhc_args(parser)`` in ``add_megatron_arguments`` and
  ``validate_mhc_args(args)`` at the end of ``validate_args``;
* ``megatron/training/models/{gpt,hybrid}.py`` (the builders ``pretrain_gpt.py`` /
  ``pretrain_hybrid.py`` use) and ``gpt_builders.py`` / ``hybrid_builders.py`` (the other entry
  points): ``apply_mhc_to_spec(spec, args, config)`` once the layer (or block / stack) spec is
  chosen;
* ``megatron/core/pipeline_parallel/schedules.py``: ``pipeline_hidden_size(config)`` where the
  schedules size the stage-to-stage tensors (n*C wide with mHC);
* ``megatron/core/models/common/model_chunk_schedule_plan.py``: ``add_mhc_post_node(plan, ...)``
  at the end of ``TransformerLayerSchedulePlan._build_callable_nodes`` (the EP-overlap schedule:
  an mHC MoE layer's MLP merge as a node of its own, ``megatron_mhc.core.schedule_nodes``);
* ``megatron/training/training.py``: ``after_train_step(model, iteration)`` in the training loop
  (mHC gain metrics on logging iterations).

Importing this module is cheap (no Megatron import at module level), so ``schedules.py`` can import
it while ``megatron.core`` itself is still importing.
"""

from __future__ import annotations

import argparse
from typing import Any

from megatron_mhc.core.compat import refused_feature_problems
from megatron_mhc.core.config import (
    ARG_DESTS,
    FLAG_NAMES,
    INIT_METHODS,
    KERNEL_BACKENDS,
    RECOMPUTE_REBUILDS,
    VARIANTS,
    MHCConfig,
    mhc_config_from_args,
)
from megatron_mhc.core.pipeline import (  # noqa: F401 - pipeline_hidden_size is a hook
    PIPELINE_STREAMS_ATTR,
    pipeline_hidden_size,
    schedules_are_hooked,
)
from megatron_mhc.core.schedule_nodes import add_mhc_post_node  # noqa: F401 - a hook
from megatron_mhc.training.checkpoint_match import check_checkpoint_matches_flags

ENABLE_FLAG = "--enable-mhc"
#: Flags beyond the MHCConfig fields.
LOG_INTERVAL_FLAG = "--mhc-log-interval"
GAIN_LOG_FLAG = "--mhc-gain-log"
#: HybridModel layer symbols mHC does not wrap: their layers are not TransformerLayers (they add
#: their own residual inside), so n-stream activations cannot pass through them.
HYBRID_UNCOVERED_SYMBOLS = {"M": "Mamba", "G": "gated delta net"}


def _recompute_block(value: str) -> int:
    if value == "auto":
        return 0
    try:
        block = int(value)
    except ValueError:
        block = -1
    if block < 1:
        raise argparse.ArgumentTypeError(
            f"{FLAG_NAMES['recompute_block']} {value!r}: allowed 'auto' or a positive integer"
        )
    return block


def add_mhc_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the ``--enable-mhc`` / ``--mhc-*`` flags (defaults None: unset means MHCConfig's)."""
    defaults = MHCConfig()
    group = parser.add_argument_group(title="mHC (megatron-mhc)")
    group.add_argument(ENABLE_FLAG, action="store_true", dest="enable_mhc",
                       help="Use manifold-constrained hyper-connections (n residual streams).")
    group.add_argument(FLAG_NAMES["expansion_rate"], type=int, default=None,
                       dest="mhc_expansion_rate",
                       help=f"n, the number of residual streams (default {defaults.expansion_rate}).")
    group.add_argument(FLAG_NAMES["variant"], choices=VARIANTS, default=None, dest="mhc_variant",
                       help="mhc (Sinkhorn-constrained, default), hc (unconstrained) or residual "
                            "(the plain residual through the same code path, for ablations).")
    group.add_argument(FLAG_NAMES["sinkhorn_iters"], type=int, default=None,
                       dest="mhc_sinkhorn_iters",
                       help=f"Sinkhorn-Knopp iterations (default {defaults.sinkhorn_iters}).")
    group.add_argument(FLAG_NAMES["gate_init"], type=float, default=None, dest="mhc_gate_init",
                       help=f"Initial alpha gates (default {defaults.gate_init}).")
    group.add_argument(FLAG_NAMES["init_method"], choices=INIT_METHODS, default=None,
                       dest="mhc_init_method",
                       help="default (gates --mhc-gate-init) or function_preserving (gates 0: "
                            "the fresh model computes exactly the plain model's function).")
    group.add_argument(FLAG_NAMES["res_init_logit"], type=float, default=None,
                       dest="mhc_res_init_logit",
                       help=f"Diagonal of the static H_res logits (default {defaults.res_init_logit}).")
    group.add_argument(FLAG_NAMES["norm_eps"], type=float, default=None, dest="mhc_norm_eps",
                       help=f"Epsilon of the n*C RMS norm (default {defaults.norm_eps}).")
    group.add_argument(FLAG_NAMES["kernel_backend"], choices=KERNEL_BACKENDS, default=None,
                       dest="mhc_kernel_backend",
                       help="auto (triton, else tilelang, else torch), torch, triton or tilelang.")
    group.add_argument(FLAG_NAMES["recompute_block"], type=_recompute_block, default=None,
                       dest="mhc_recompute_block",
                       help="Recompute mHC work in blocks of L_r layers: a positive integer or "
                            "'auto' (L_r* = round(sqrt(n L / (n + 2))) per pipeline stage).")
    group.add_argument(FLAG_NAMES["recompute_rebuild"], choices=RECOMPUTE_REBUILDS, default=None,
                       dest="mhc_recompute_rebuild",
                       help="How the backward rebuilds a recompute block's streams: block "
                            "(all at once, one merge each), sublayer (one at a time from the "
                            "block input: lower peak memory, more merges) or auto (default: "
                            "sublayer for each model chunk's last block, where the backward "
                            "starts at the memory peak, block elsewhere). Needs "
                            f"{FLAG_NAMES['recompute_block']}.")
    group.add_argument(FLAG_NAMES["overlap"], action="store_true", default=None,
                       dest="mhc_overlap",
                       help="The overlapped schedule: MLP post/residual merges on a high-priority "
                            "CUDA stream; 1F1B pipelining without the host synchronisation after "
                            "each stage-to-stage transfer; interleaved pipelining with Megatron's "
                            "p2p overlap in the warm-up and flush phases too. Off: Megatron's "
                            "own behaviour.")
    group.add_argument(LOG_INTERVAL_FLAG, type=int, default=None, dest="mhc_log_interval",
                       help="Log the H_res gain metrics every this many iterations (default: "
                            "--log-interval; 0 turns them off).")
    group.add_argument(GAIN_LOG_FLAG, default=None, dest="mhc_gain_log", metavar="PATH",
                       help="Also append the gain metrics of each logging step to PATH as JSON "
                            "lines (per-sublayer and composite gains by depth; rank 0 writes).")
    return parser


def validate_mhc_args(args: Any) -> None:
    """Check the mHC flags and their compatibility with the rest of the command line.

    Raises ``ValueError`` naming the flag and the allowed values; nothing is changed on error.
    Also refuses a checkpoint to load (``--load`` / ``--pretrained-checkpoint``) that holds another
    model than the flags ask for (``training.checkpoint_match``), with or without ``--enable-mhc``.
    """
    if not getattr(args, "enable_mhc", False):
        given = [FLAG_NAMES[f] for f, d in ARG_DESTS.items() if getattr(args, d, None) is not None]
        if getattr(args, "mhc_log_interval", None) is not None:
            given.append(LOG_INTERVAL_FLAG)
        if getattr(args, "mhc_gain_log", None) is not None:
            given.append(GAIN_LOG_FLAG)
        if given:
            raise ValueError(f"{', '.join(given)} given without {ENABLE_FLAG}: add {ENABLE_FLAG} "
                             "to train with mHC, or drop these flags")
        check_checkpoint_matches_flags(args, None)
        return
    mhc_config = mhc_config_from_args(args)  # raises a ValueError naming the flag
    problems = refused_feature_problems(args, mhc_config)
    pattern = getattr(args, "hybrid_layer_pattern", None)
    uncovered = sorted(set(pattern or "") & set(HYBRID_UNCOVERED_SYMBOLS))
    if uncovered:
        problems.append(
            f"--hybrid-layer-pattern {pattern!r} has layer types not covered by mHC: "
            + ", ".join(f"{s!r} ({HYBRID_UNCOVERED_SYMBOLS[s]})" for s in uncovered)
            + "; allowed with --enable-mhc: '*' attention, 'D' DSA, '+' MLA, '-' MLP, 'E' MoE")
    if "/" in (pattern or ""):
        problems.append(
            f"--hybrid-layer-pattern {pattern!r} has multi-token-prediction depths ('/'): "
            "HybridModel builds its MTP layers from the mHC stack spec, which widens the MTP "
            "block's hidden state; not supported with --enable-mhc (GPT's --mtp-num-layers is)")
    if getattr(args, "mhc_overlap", None):
        problems.extend(_overlap_schedule_problems(args))
    interval = getattr(args, "mhc_log_interval", None)
    if interval is not None and interval < 0:
        problems.append(f"{LOG_INTERVAL_FLAG} {interval}: allowed 0 (off) or a positive integer")
    if problems:
        raise ValueError("megatron-mhc: " + "; ".join(problems))
    check_checkpoint_matches_flags(args, mhc_config)
    if getattr(args, "mhc_overlap", None) and getattr(
            args, "virtual_pipeline_model_parallel_size", None) is not None:
        # The interleaved schedule's p2p overlap (on by default) then also covers the warm-up and
        # flush phases, where the n-fold wider mHC activations are sent without compute to hide
        # behind otherwise.
        args.overlap_p2p_comm_warmup_flush = True


def _overlap_schedule_problems(args: Any) -> list:
    """What stops ``--mhc-overlap`` on this command line (empty when nothing)."""
    if getattr(args, "virtual_pipeline_model_parallel_size", None) is None:
        return []  # 1F1B has no p2p overlap in Megatron-Core 0.19; the stream part still applies
    if not getattr(args, "overlap_p2p_comm", True):
        return [f"{FLAG_NAMES['overlap']} with the interleaved pipeline schedule needs Megatron's "
                "p2p overlap: drop --no-overlap-p2p-communication (or drop "
                f"{FLAG_NAMES['overlap']})"]
    return []


def apply_mhc_to_spec(spec: Any, args: Any, config: Any) -> Any:
    """Wrap the model's layer spec with mHC when ``--enable-mhc`` is set; otherwise unchanged.

    Accepts what Megatron's builders produce: a layer ``ModuleSpec``, a block spec
    (``TransformerBlockSubmodules``, e.g. for MoE) or a ``HybridModel`` stack spec. Marks ``config``
    with the stream count so the patched pipeline schedules size stage-to-stage tensors n*C wide;
    with ``--mhc-overlap`` also sets ``config.batch_p2p_sync = False``. Also pads DDP's default
    gradient-buffer layout (``training.grad_buffer_layout.align_grad_buffers``).
    ``args`` None: Megatron's global args (``megatron.training.get_args()``).
    """
    if args is None:
        from megatron.training.global_vars import get_args

        args = get_args()
    mhc_config = mhc_config_from_args(args)
    if mhc_config is None:
        return spec
    from megatron_mhc.core.specs import with_mhc_any
    from megatron_mhc.training.grad_buffer_layout import align_grad_buffers

    wrapped = with_mhc_any(spec, mhc_config)
    # mHC's small parameters would shift later weights' main_grad off alignment (see there).
    align_grad_buffers()
    setattr(config, PIPELINE_STREAMS_ATTR, mhc_config.n)
    if mhc_config.overlap:
        # 1F1B sends through batched p2p followed by torch.cuda.synchronize() (a workaround for
        # an old PyTorch bug; Megatron has no flag for it): without it the host queues the next
        # micro-batch's kernels while the n-fold wider activations are in flight.
        config.batch_p2p_sync = False
    return wrapped


def after_train_step(model: Any, iteration: int) -> None:
    """Training-loop hook: log mHC gain metrics on logging iterations (``training.metrics``)."""
    from megatron_mhc.training import metrics

    metrics.after_train_step(model, iteration)
