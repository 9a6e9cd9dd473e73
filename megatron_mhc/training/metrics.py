"""mHC gain metrics during Megatron training (the patched ``train()`` calls ``after_train_step``).

On a logging iteration (every ``--mhc-log-interval``, default ``--log-interval``) each
``HyperConnection`` records its H_res for the first micro-batch it sees (under CUDA graphs, where a
replay runs no Python: the last micro-batch's, from the buffer each forward copies it into); after
the step the per
sublayer forward gain (max abs row sum) and backward gain (max abs column sum) and the composite
gains of the products are computed, reduced with MAX over all ranks, printed on rank 0 and written
to TensorBoard / W&B as ``mhc/*`` and, with ``--mhc-gain-log PATH``, appended to ``PATH`` as one JSON
line per logging step (per-sublayer gains and the composite gain at every depth, for plots).

With pipeline parallelism a stage only holds its own layers, so the composite is the product over
each stage's layers and the logged value is the max over stages (the full product at PP = 1; the
``megatron-mhc gain-report`` tool computes the full product from a checkpoint).
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional

import torch

from megatron_mhc.core.gains import gain_report
from megatron_mhc.core.hyper_connection import HyperConnection


class _FirstOnly(list):
    """A list that keeps only the first item appended (one micro-batch per logging step)."""

    def append(self, item):  # noqa: D102
        if not self:
            super().append(item)


_ARMED: List[HyperConnection] = []


def hyper_connections(model) -> List[HyperConnection]:
    """Every ``HyperConnection`` of the model (chunks), ordered by global sublayer index."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    found = [m for chunk in chunks for m in chunk.modules() if isinstance(m, HyperConnection)]
    return sorted(found, key=lambda m: m.sublayer_index)


def arm(model) -> None:
    """Make every hyper-connection record its H_res of the next micro-batch."""
    disarm()
    for module in hyper_connections(model):
        module.recorded_h_res = _FirstOnly()
        _ARMED.append(module)


def disarm() -> None:
    """Stop recording and drop what was recorded."""
    for module in _ARMED:
        module.recorded_h_res = None
    _ARMED.clear()


def _recorded(module: HyperConnection):
    """The H_res the module recorded this step (under CUDA graphs: its latest snapshot)."""
    if module.snapshot_h_res:
        return module.h_res_snapshot
    return module.recorded_h_res[0] if module.recorded_h_res else None


def collect_gains(num_sublayers: int) -> Dict[str, object]:
    """Gains of the recorded H_res, reduced with MAX over ranks (call on every rank)."""
    recorded = [(m.sublayer_index, _recorded(m)) for m in _ARMED]
    recorded = [(index, h_res) for index, h_res in recorded if h_res is not None]
    # [layer fwd | layer bwd | composite fwd | composite bwd | non-finite flag] per global
    # sublayer (the composite of a sublayer: the product of H_res from the stage's first sublayer
    # up to it), then the stage-local max composite fwd, bwd. Non-finite gains are sent as 0 and
    # flagged, so one rank's NaN never hides the other ranks' values in the MAX reduction.
    values = torch.zeros(5 * num_sublayers + 2, dtype=torch.float64)
    if recorded:
        report = gain_report([h.float().cpu() for _, h in recorded])
        per_depth = zip(recorded, report.layer_forward, report.layer_backward,
                        report.composite_forward, report.composite_backward)
        for (index, _), fwd, bwd, comp_fwd, comp_bwd in per_depth:
            values[index] = fwd
            values[num_sublayers + index] = bwd
            values[2 * num_sublayers + index] = comp_fwd
            values[3 * num_sublayers + index] = comp_bwd
        for position in report.non_finite_sublayers:
            values[4 * num_sublayers + recorded[position][0]] = 1.0
        values[-2] = report.max_composite_forward
        values[-1] = report.max_composite_backward
        values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        reduced = values.to(device)
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
        values = reduced.cpu()
    flags = values[4 * num_sublayers:5 * num_sublayers]
    return {
        "layer_forward": values[:num_sublayers].tolist(),
        "layer_backward": values[num_sublayers:2 * num_sublayers].tolist(),
        "composite_forward_by_depth": values[2 * num_sublayers:3 * num_sublayers].tolist(),
        "composite_backward_by_depth": values[3 * num_sublayers:4 * num_sublayers].tolist(),
        "composite_forward": values[-2].item(),
        "composite_backward": values[-1].item(),
        "non_finite_sublayers": [i for i in range(num_sublayers) if flags[i] > 0],
    }


def after_train_step(model, iteration: int) -> None:
    """Log the gains if this step was armed; arm the next step if it is a logging step."""
    from megatron.training.global_vars import get_args, get_tensorboard_writer, get_wandb_writer

    args = get_args()
    if not getattr(args, "enable_mhc", False) or getattr(args, "mhc_variant", None) == "residual":
        return
    interval = args.mhc_log_interval if args.mhc_log_interval is not None else args.log_interval
    if not interval:
        return
    if _ARMED:
        gains = collect_gains(2 * args.num_layers)
        disarm()
        _log(gains, iteration, get_tensorboard_writer(), get_wandb_writer(),
             getattr(args, "mhc_gain_log", None))
    if (iteration + 1) % interval == 0:
        arm(model)


def _log(gains: Dict[str, object], iteration: int, writer, wandb_writer,
         gain_log_path: Optional[str] = None) -> None:
    """Print (rank 0), append to ``gain_log_path`` as one JSON line (rank 0), and write the
    scalars to TensorBoard / W&B where Megatron made writers."""
    layer_fwd, layer_bwd = gains["layer_forward"], gains["layer_backward"]
    scalars = {
        "mhc/composite_gain_forward": gains["composite_forward"],
        "mhc/composite_gain_backward": gains["composite_backward"],
        "mhc/max_layer_gain_forward": max(layer_fwd),
        "mhc/max_layer_gain_backward": max(layer_bwd),
    }
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    bad = gains.get("non_finite_sublayers") or []
    if bad:
        where = ", ".join(f"sublayer {i} (layer {i // 2 + 1} {'attention' if i % 2 == 0 else 'MLP'})"
                          for i in bad)
        if rank == 0:
            print(f" [mhc] iteration {iteration:8d} | non-finite H_res (NaN or Inf) in {where}; "
                  "gains not logged for this step", flush=True)
            if gain_log_path:
                with open(gain_log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"iteration": iteration, "non_finite_sublayers": bad})
                                 + "\n")
        if writer is not None:
            writer.add_scalar("mhc/non_finite_sublayers", len(bad), iteration)
        if wandb_writer is not None:
            wandb_writer.log({"mhc/non_finite_sublayers": len(bad)}, iteration)
        return
    if rank == 0:
        print(
            f" [mhc] iteration {iteration:8d} | H_res gain fwd/bwd: max per sublayer "
            f"{scalars['mhc/max_layer_gain_forward']:.4f} / "
            f"{scalars['mhc/max_layer_gain_backward']:.4f} | composite "
            f"{scalars['mhc/composite_gain_forward']:.4f} / "
            f"{scalars['mhc/composite_gain_backward']:.4f}",
            flush=True,
        )
        if gain_log_path:
            with open(gain_log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"iteration": iteration, **gains}) + "\n")
    if writer is not None:
        for name, value in scalars.items():
            writer.add_scalar(name, value, iteration)
        for index, (fwd, bwd) in enumerate(zip(layer_fwd, layer_bwd)):
            writer.add_scalar(f"mhc/sublayer_{index:03d}_gain_forward", fwd, iteration)
            writer.add_scalar(f"mhc/sublayer_{index:03d}_gain_backward", bwd, iteration)
    if wandb_writer is not None:
        wandb_writer.log(scalars, iteration)
