"""One table row per ``pretrain_gpt.py`` log: losses, step time and memory read off Megatron's log.

    python benchmarks/summarize_pretrain_logs.py NAME=LOG [NAME=LOG ...]

Columns: the lm loss at every logged iteration (``--log-interval``), the elapsed time per
iteration of the last logged window (Megatron averages over the window) and the mean over the
windows after the first full one (iteration 1 and the first window hold warm-up, compilation and
CUDA-graph capture, so they are left out), the max allocated
memory Megatron reports after the first window, and the last mHC gain line.
"""

from __future__ import annotations

import re
import sys

ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?elapsed time per iteration \(ms\): ([\d.]+)"
                       r".*?lm loss: ([\d.E+-]+)")
MEMORY = re.compile(r"max allocated: ([\d.]+)")
GAIN = re.compile(r"\[mhc\] iteration\s+(\d+) \| H_res gain fwd/bwd: .*composite ([\d.]+) / ([\d.]+)")


def summarize(name: str, path: str) -> str:
    """A markdown row for one log (``failed`` with the last error line when it did not finish)."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError as exc:
        return f"| {name} | no log ({exc.strerror}) | | | | |"
    rows = [(int(i), int(total), float(ms), float(loss)) for i, total, ms, loss in ITERATION.findall(text)]
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


def main(argv):
    print("| run | lm loss by iteration | ms/it (last window) | ms/it (mean of later windows) "
          "| max allocated (MB) | mHC composite gain fwd / bwd |")
    print("|---|---|---|---|---|---|")
    for item in argv:
        name, _, path = item.partition("=")
        print(summarize(name, path))


if __name__ == "__main__":
    main(sys.argv[1:])
