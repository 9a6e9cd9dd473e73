"""``megatron-mhc gain-report CHECKPOINT [--batch TOKENS] [--out DIR]`` or ``--log GAINS.jsonl``.

Per-sublayer and composite forward gain (max abs row sum) and backward gain (max abs column sum)
of the residual mappings H_res, as in the paper's stability figures; prints a table and writes
PNG plots (matplotlib, if installed) and a JSON file.

* Without ``--batch``: the input-independent part of each mapping, H_res = Sinkhorn(exp(b_res))
  for mhc (b_res itself for hc) — what every token gets when the dynamic term is zero.
* With ``--batch FILE`` (a ``.pt`` / ``.npy`` of token ids ``[b, s]``): the model is rebuilt from
  the checkpoint's args (dense GPT, Megatron-Core local layers) and run on the batch; the gains
  are the max over tokens of the per-token H_res and of their products, as the paper reports.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor

from megatron_mhc.core.gains import GainReport, gain_report
from megatron_mhc.core.ops.reference import sinkhorn
from megatron_mhc.tools.convert import OURS, UPSTREAM, ConversionError, from_upstream
from megatron_mhc.training.checkpoint_io import (
    CheckpointError,
    ModelCheckpoint,
    read_model_checkpoint,
)


def static_residual_mappings(checkpoint: ModelCheckpoint) -> List[Tensor]:
    """The input-independent H_res of every sublayer, in forward order (each ``[n, n]``)."""
    if not any(f".{OURS['attn']}." in k or f".{OURS['mlp']}." in k for k in checkpoint.tensors):
        if any(f".{v}." in k for v in UPSTREAM.values() for k in checkpoint.tensors):
            from_upstream(checkpoint)
        else:
            raise ConversionError("no mHC parameters in the checkpoint (plain residual model)")
    args = checkpoint.args
    variant = getattr(args, "mhc_variant", None) or "mhc"
    iters = getattr(args, "mhc_sinkhorn_iters", None) or 20
    per_layer: Dict[int, Dict[str, Tensor]] = {}
    for key, bias in checkpoint.tensors.items():
        match = re.match(r"decoder\.layers\.(?:(\d+)\.)?(attn_hc|mlp_hc)\.bias$", key)
        if match is None:
            continue
        sub = match.group(2)
        biases = bias.float() if match.group(1) is None else bias.float().unsqueeze(0)
        first = 0 if match.group(1) is None else int(match.group(1))
        for offset, b in enumerate(biases):
            per_layer.setdefault(first + offset, {})[sub] = b
    mappings = []
    for layer in sorted(per_layer):
        for sub in ("attn_hc", "mlp_hc"):
            if sub not in per_layer[layer]:
                continue
            b = per_layer[layer][sub].double()
            n = int(round((b.numel() + 1) ** 0.5 - 1))
            logits = b[2 * n:].view(n, n)
            mappings.append(sinkhorn(logits, iters) if variant == "mhc" else logits)
    return mappings


def batch_residual_mappings(checkpoint_path: Path, batch: Tensor) -> List[Tensor]:
    """Per-token H_res of every sublayer from running the checkpoint's model on ``batch``."""
    from megatron_mhc.core.gains import record_residual_mappings
    from megatron_mhc.training.model_from_args import build_model_from_checkpoint

    model, _ = build_model_from_checkpoint(checkpoint_path)
    device = next(model.parameters()).device
    tokens = batch.to(device=device, dtype=torch.long)
    b, s = tokens.shape
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, device=device, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    with torch.no_grad(), record_residual_mappings(model) as recorded:
        model(tokens, position_ids, mask)
    return [h.cpu() for h in recorded]


def format_table(report: GainReport) -> str:
    """The per-sublayer table (sublayer, kind, gains, composite gains)."""
    lines = ["sublayer | kind | fwd gain | bwd gain | composite fwd | composite bwd",
             "---|---|---|---|---|---"]
    for i, values in enumerate(zip(report.layer_forward, report.layer_backward,
                                   report.composite_forward, report.composite_backward)):
        kind = "attn" if i % 2 == 0 else "mlp"
        lines.append(f"{i} | {kind} | " + " | ".join(f"{v:.4f}" for v in values))
    lines.append(f"max composite gain: forward {report.max_composite_forward:.4f}, "
                 f"backward {report.max_composite_backward:.4f}")
    return "\n".join(lines)


def write_plots(report: GainReport, out_dir: Path, title: str) -> Optional[List[Path]]:
    """Two PNGs (per-sublayer and composite gains); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fwd, bwd in (("layer", report.layer_forward, report.layer_backward),
                           ("composite", report.composite_forward, report.composite_backward)):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(len(fwd)), fwd, marker="o", label="forward gain (max |row sum|)")
        ax.plot(range(len(bwd)), bwd, marker="s", label="backward gain (max |column sum|)")
        ax.set_xlabel("sublayer (attention, MLP alternating)")
        ax.set_ylabel("gain")
        if max(max(fwd), max(bwd)) > 10:
            ax.set_yscale("log")
        ax.set_title(f"{title}: {'per-sublayer' if name == 'layer' else 'composite'} H_res gain")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"gain_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def load_batch(path: Path) -> Tensor:
    """Token ids ``[b, s]`` from a ``.pt`` or ``.npy`` file."""
    if path.suffix == ".npy":
        import numpy as np

        batch = torch.from_numpy(np.load(path))
    else:
        batch = torch.load(path, map_location="cpu")
    if batch.dim() == 1:
        batch = batch.unsqueeze(0)
    if batch.dim() != 2:
        raise ValueError(f"--batch {path}: expected token ids [b, s], got shape {tuple(batch.shape)}")
    return batch


def report_gain_log(path: Path, out_dir: Path) -> int:
    """``--log FILE``: a table of each run's last gain record and the two gain plots."""
    from megatron_mhc.tools.stability import load_gain_log, plot_gains

    runs = load_gain_log(path)
    print(f"H_res gains logged in {path}:")
    print("run | records | last iteration | composite fwd | composite bwd | peak composite fwd")
    print("---|---|---|---|---|---")
    for run in runs:
        last = run.gains[-1]
        peak = max(r["composite_forward"] for r in run.gains)
        print(f"{run.variant} | {len(run.gains)} | {last['iteration']} | "
              f"{last['composite_forward']:.4g} | {last['composite_backward']:.4g} | {peak:.4g}")
    plots = plot_gains(runs, out_dir)
    print(f"wrote {', '.join(str(p) for p in plots)}" if plots else
          "no PNG written: install matplotlib for the plots")
    return 0


def main(argv: List[str]) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="megatron-mhc gain-report", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("checkpoint", type=Path, nargs="?",
                        help="a Megatron torch_dist checkpoint (root or iteration folder)")
    parser.add_argument("--batch", type=Path, default=None,
                        help="token ids [b, s] (.pt or .npy) to run the model on")
    parser.add_argument("--log", type=Path, default=None,
                        help="instead of a checkpoint: a gain JSON-lines file (the demo's "
                             "gains.jsonl or a --mhc-gain-log file) to tabulate and plot")
    parser.add_argument("--out", type=Path, default=Path("gain_report"),
                        help="folder for the PNG plots (and gains.json for a checkpoint)")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.log is None):
        parser.error("give either a CHECKPOINT or --log FILE")
    if args.log is not None:
        if args.batch is not None:
            parser.error("--batch goes with a CHECKPOINT, not with --log")
        if not args.log.is_file():
            parser.error(f"--log {args.log}: no such file")
        try:
            return report_gain_log(args.log, args.out)
        except ValueError as exc:
            print(f"megatron-mhc gain-report: {exc}", file=sys.stderr)
            return 2
    from tqdm import tqdm

    with tqdm(total=2, desc="gain-report", unit="step") as bar:
        try:
            if args.batch is None:
                mappings = static_residual_mappings(read_model_checkpoint(args.checkpoint))
                source = "static (input-independent) mappings"
            else:
                mappings = batch_residual_mappings(args.checkpoint, load_batch(args.batch))
                source = f"batch {args.batch}"
        except (CheckpointError, ValueError) as exc:
            print(f"megatron-mhc gain-report: {exc}", file=sys.stderr)
            return 2
        bar.update(1)
        report = gain_report(mappings)
        bar.update(1)
    print(f"H_res gains of {args.checkpoint} ({source}):")
    print(format_table(report))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gains.json").write_text(json.dumps(
        {"source": source, **{k: getattr(report, k) for k in (
            "layer_forward", "layer_backward", "composite_forward", "composite_backward")}},
        indent=1))
    plots = write_plots(report, args.out, args.checkpoint.name)
    print(f"wrote {args.out / 'gains.json'}" + (
        f", {', '.join(str(p) for p in plots)}" if plots else
        " (no PNG: install matplotlib for the plots)"))
    return 0
