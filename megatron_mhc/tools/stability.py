"""Read the stability runs' logs (issue 6): Megatron's iteration / validation lines and the
``--mhc-gain-log`` JSON lines; a summary table and plots (``tools/stability_report.py``).

Loss spike: a logged training loss (Megatron averages over ``--log-interval`` iterations) more than
``SPIKE_RATIO`` above the median of the previous ``SPIKE_WINDOW`` logged values, counted after
the first ``SPIKE_SKIP`` iterations (warm-up). A gradient-norm spike uses ``GRAD_SPIKE_RATIO``.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SPIKE_RATIO = 1.10
GRAD_SPIKE_RATIO = 3.0
SPIKE_WINDOW = 5
SPIKE_SKIP = 100

_ITERATION = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.eE+-]+) \|.*?"
                        r"grad norm: ([0-9.eE+-]+|nan|inf)")
_VALIDATION = re.compile(r"validation loss at iteration (\d+)( on validation set)? \| "
                         r"lm loss value: ([0-9.eE+-]+)")
_SKIPPED = re.compile(r"number of skipped iterations:\s+(\d+) \| number of nan iterations:\s+(\d+)")


@dataclass
class Run:
    """One variant's logged curves."""

    variant: str
    label: str
    iterations: List[int] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    grad_norm: List[float] = field(default_factory=list)
    valid: Dict[int, float] = field(default_factory=dict)
    final_valid: Optional[float] = None
    skipped_or_nan: int = 0
    gains: List[dict] = field(default_factory=list)  # --mhc-gain-log records


def load_run(log: Path, variant: str, label: str = "") -> Run:
    """Parse ``log`` (and ``<variant>.gains.jsonl`` beside it, if present)."""
    run = Run(variant=variant, label=label)
    for line in Path(log).read_text(encoding="utf-8", errors="replace").splitlines():
        match = _ITERATION.search(line)
        if match:
            step = int(match.group(1))
            if run.iterations and step <= run.iterations[-1]:  # a resumed run logs again: keep last
                keep = [i for i, s in enumerate(run.iterations) if s < step]
                run.iterations = [run.iterations[i] for i in keep]
                run.train_loss = [run.train_loss[i] for i in keep]
                run.grad_norm = [run.grad_norm[i] for i in keep]
            run.iterations.append(step)
            run.train_loss.append(float(match.group(2)))
            run.grad_norm.append(float(match.group(3)))
            skipped = _SKIPPED.search(line)
            if skipped:
                run.skipped_or_nan += int(skipped.group(1)) + int(skipped.group(2))
            continue
        match = _VALIDATION.search(line)
        if match:
            if match.group(2):
                run.final_valid = float(match.group(3))
            else:
                run.valid[int(match.group(1))] = float(match.group(3))
    gains = Path(log).with_name(f"{variant}.gains.jsonl")
    if gains.is_file():
        run.gains = read_gain_records(gains)
    return run


def count_spikes(iterations: Sequence[int], values: Sequence[float], ratio: float) -> int:
    """Logged values above ``ratio`` x the median of the previous ``SPIKE_WINDOW`` (see module)."""
    spikes = 0
    for i in range(SPIKE_WINDOW, len(values)):
        if iterations[i] <= SPIKE_SKIP:
            continue
        if values[i] > ratio * statistics.median(values[i - SPIKE_WINDOW:i]):
            spikes += 1
    return spikes


def _max_gain(run: Run, key: str) -> Optional[float]:
    return max((record[key] for record in run.gains), default=None)


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_table(runs: Sequence[Run]) -> str:
    """A Markdown table: final train / validation loss, max composite gains, spikes per run."""
    rows = [
        "| run | variant | final train loss (mean of last 5 logs) | final val loss | "
        "max composite gain fwd / bwd | max sublayer gain fwd | loss spikes | grad-norm spikes "
        "| skipped / NaN iters |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        tail = run.train_loss[-5:]
        layer_max = max((max(r["layer_forward"]) for r in run.gains), default=None)
        rows.append(
            f"| {run.label} | {run.variant} | {_fmt(statistics.fmean(tail) if tail else None)} | "
            f"{_fmt(run.final_valid)} | {_fmt(_max_gain(run, 'composite_forward'), 3)} / "
            f"{_fmt(_max_gain(run, 'composite_backward'), 3)} | {_fmt(layer_max, 3)} | "
            f"{count_spikes(run.iterations, run.train_loss, SPIKE_RATIO)} | "
            f"{count_spikes(run.iterations, run.grad_norm, GRAD_SPIKE_RATIO)} | "
            f"{run.skipped_or_nan} |")
    return "\n".join(rows)


_COLOURS = {"residual": "tab:gray", "hc": "tab:red", "mhc": "tab:blue"}


def plot_runs(runs: Sequence[Run], out_dir: Path) -> List[Path]:
    """Write loss, grad-norm and gain PNGs to ``out_dir``; [] when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return []
    out_dir = Path(out_dir)
    labels = sorted({run.label for run in runs})
    styles = dict(zip(labels, ["-", "--", ":", "-."] * 4))
    written = []

    def style(run):
        return dict(color=_COLOURS.get(run.variant, "k"), linestyle=styles[run.label],
                    label=f"{run.variant} ({run.label})")

    fig, (ax_train, ax_valid) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        ax_train.plot(run.iterations, run.train_loss, lw=1, **style(run))
        ax_valid.plot(sorted(run.valid), [run.valid[k] for k in sorted(run.valid)], marker="o",
                      **style(run))
    ax_train.set(xlabel="iteration", ylabel="train lm loss", ylim=(3.8, 7.0), title="training loss")
    ax_valid.set(xlabel="iteration", ylabel="validation lm loss", title="validation loss")
    for ax in (ax_train, ax_valid):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "loss.png", plt))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ax.plot(run.iterations, run.grad_norm, lw=1, **style(run))
    ax.set(xlabel="iteration", ylabel="grad norm (before clipping at 1.0)", yscale="log",
           title="gradient norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "grad_norm.png", plt))

    written.extend(plot_gains(runs, out_dir))
    return written


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_gains(runs: Sequence[Run], out_dir: Path) -> List[Path]:
    """``gain_vs_iteration.png`` and ``gain_by_depth.png`` from the runs' gain records (the
    ``--mhc-gain-log`` / demo JSON lines); [] when matplotlib is missing or no run has gains."""
    plt = _pyplot()
    gain_runs = [run for run in runs if run.gains]
    if plt is None or not gain_runs:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = sorted({run.label for run in gain_runs})
    styles = dict(zip(labels, ["-", "--", ":", "-."] * 4))

    def style(run):
        name = f"{run.variant} ({run.label})" if run.label else run.variant
        return dict(color=_COLOURS.get(run.variant, "k"), linestyle=styles[run.label], label=name)

    written = []
    fig, (ax_fwd, ax_bwd) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in gain_runs:
        steps = [r["iteration"] for r in run.gains]
        ax_fwd.plot(steps, [r["composite_forward"] for r in run.gains], **style(run))
        ax_bwd.plot(steps, [r["composite_backward"] for r in run.gains], **style(run))
    for ax, kind in ((ax_fwd, "forward (max |row sum|)"), (ax_bwd, "backward (max |col sum|)")):
        ax.set(xlabel="iteration", ylabel=f"composite H_res gain, {kind}", yscale="log",
               title="composite gain over all sublayers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "gain_vs_iteration.png", plt))

    fig, (ax_layer, ax_comp) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in gain_runs:
        last = run.gains[-1]
        depth = range(1, len(last["layer_forward"]) + 1)
        ax_layer.plot(depth, last["layer_forward"], marker=".", **style(run))
        ax_comp.plot(depth, last["composite_forward_by_depth"], marker=".", **style(run))
    ax_layer.set(xlabel="sublayer (attention, MLP alternating)", ylabel="forward gain",
                 yscale="log", title="single-sublayer H_res gain (last logged step)")
    ax_comp.set(xlabel="depth k (sublayers)", ylabel="gain of H_k ... H_1", yscale="log",
                title="composite H_res gain by depth (last logged step)")
    for ax in (ax_layer, ax_comp):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    written.append(_save(fig, out_dir / "gain_by_depth.png", plt))
    return written


def read_gain_records(path: Path) -> List[dict]:
    """The gain records of a JSON-lines file (``--mhc-gain-log`` or the demo's), in order; steps
    whose mappings were not finite (logged without gains) are left out. ``ValueError`` naming the
    line for anything else that is not a gain record."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
        missing = [k for k in GAIN_KEYS if k not in record]
        if missing and record.get("non_finite_sublayers"):
            continue  # a step whose mappings were not finite: logged without gains
        if missing:
            raise ValueError(f"{path}:{number}: not a gain record (missing {', '.join(missing)})")
        records.append(record)
    return records


def load_gain_log(path: Path) -> List[Run]:
    """Runs from a gain JSON-lines file: the demo's (a ``variant`` key per record) or one
    written by ``--mhc-gain-log`` (one run, named after the file)."""
    runs: Dict[str, Run] = {}
    for record in read_gain_records(path):
        variant = record.get("variant") or Path(path).stem.split(".")[0]
        runs.setdefault(variant, Run(variant=variant, label="")).gains.append(record)
    if not runs:
        raise ValueError(f"{path}: no gain records")
    return list(runs.values())


#: Keys every gain record has (``megatron_mhc.training.metrics.collect_gains`` plus the step).
GAIN_KEYS = ("iteration", "layer_forward", "layer_backward", "composite_forward_by_depth",
             "composite_backward_by_depth", "composite_forward", "composite_backward")


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
