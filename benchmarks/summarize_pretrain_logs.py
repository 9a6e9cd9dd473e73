"""One table row per ``pretrain_gpt.py`` log: losses, step time and memory read off Megatron's log.

    python benchmarks/summarize_pretrain_logs.py NAME=LOG [NAME=LOG ...] [--reference NAME]

Columns: the lm loss at every logged iteration (``--log-interval``), the elapsed time per
iteration of the last logged window (Megatron averages over the window) and the mean over the
windows after the first full one (iteration 1 and the first window hold warm-up, compilation and
CUDA-graph capture, so they are left out), the max allocated memory of Megatron's first memory
report (after iteration 1), and the last mHC gain line. With ``--reference NAME``, a second table
compares every other run's loss curve with that run's, iteration by logged iteration (the
loss-curve check of two kernel backends).
"""

from __future__ import annotations

import re
import sys

ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?elapsed time per iteration \(ms\): ([\d.]+)"
                       r".*?lm loss: ([\d.E+-]+)")
MEMORY = re.compile(r"max allocated: ([\d.]+)")
GAIN = re.compile(r"\[mhc\] iteration\s+(\d+) \| H_res gain fwd/bwd: .*composite ([\d.]+) / ([\d.]+)")


def _iterations(text: str) -> list[tuple[int, int, float, float]]:
    """(iteration, total iterations, ms per iteration, lm loss) of every logged iteration."""
    return [(int(i), int(total), float(ms), float(loss))
            for i, total, ms, loss in ITERATION.findall(text)]


def summarize(name: str, path: str) -> str:
    """A markdown row for one log (``failed`` with the last error line when it did not finish)."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError as exc:
        return f"| {name} | no log ({exc.strerror}) | | | | |"
    rows = _iterations(text)
    if not rows:
        errors = [line for line in text.splitlines() if "Error" in line or "error" in line]
        return f"| {name} | failed: {(errors or ['no iteration logged'])[-1][:160]} | | | | |"
    losses = ", ".join(f"{i}: {loss:.4f}" for i, _, _, loss in rows)
    # Megatron logs iteration 1 alone, then windows of --log-interval; the window ending at the
    # first interval still holds warm-up (compilation, autotuning, graph capture): both left out.
    skip = 2 if rows[0][0] == 1 else 1
    steady = [ms for _, _, ms, _ in rows[skip:]] or [rows[-1][2]]
    memory = MEMORY.search(text)
    gains = GAIN.findall(text)
    gain = f"{gains[-1][1]} / {gains[-1][2]}" if gains else "-"
    done = "" if rows[-1][0] == rows[-1][1] else f" (stopped at {rows[-1][0]}/{rows[-1][1]})"
    return (f"| {name}{done} | {losses} | {rows[-1][2]:.1f} | {sum(steady) / len(steady):.1f} | "
            f"{memory.group(1) if memory else '-'} | {gain} |")


def losses(path: str) -> dict[int, float]:
    """The lm loss at every logged iteration of one log ({} when it cannot be read)."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return {}
    return {i: loss for i, _, _, loss in _iterations(text)}


def compare(reference: str, runs: dict[str, str]) -> None:
    """A markdown table: each run's loss curve against ``reference``'s over their common
    logged iterations (max |difference|, max relative difference, the last iteration's pair)."""
    ref = losses(runs[reference])
    print(f"\nLoss curves against {reference}:")
    print("| run | iterations compared | max abs diff | max rel diff | last iteration: run / reference |")
    print("|---|---|---|---|---|")
    for name, path in runs.items():
        if name == reference:
            continue
        cur = losses(path)
        common = sorted(set(cur) & set(ref))
        if not common:
            print(f"| {name} | none | | | |")
            continue
        diffs = [abs(cur[i] - ref[i]) for i in common]
        rels = [abs(cur[i] - ref[i]) / max(abs(ref[i]), 1e-12) for i in common]
        last = common[-1]
        print(f"| {name} | {len(common)} ({common[0]}..{last}) | {max(diffs):.4g} | "
              f"{max(rels):.3%} | {last}: {cur[last]:.4f} / {ref[last]:.4f} |")


def main(argv):
    reference = None
    if "--reference" in argv:
        at = argv.index("--reference")
        if at + 1 >= len(argv):
            sys.exit("--reference needs a run NAME")
        reference = argv[at + 1]
        argv = argv[:at] + argv[at + 2:]
    runs = dict(item.partition("=")[::2] for item in argv)
    if reference is not None and reference not in runs:
        sys.exit(f"--reference {reference}: no such run (runs: {', '.join(runs)})")
    print("| run | lm loss by iteration | ms/it (last window) | ms/it (mean of later windows) "
          "| max allocated (MB) | mHC composite gain fwd / bwd |")
    print("|---|---|---|---|---|---|")
    for name, path in runs.items():
        print(summarize(name, path))
    if reference is not None:
        compare(reference, runs)


if __name__ == "__main__":
    main(sys.argv[1:])
