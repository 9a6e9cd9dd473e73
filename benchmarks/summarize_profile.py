"""GPU time per training step by kind of kernel, from PyTorch-profiler traces of several runs.

    python3 benchmarks/summarize_profile.py [--steps 2] [--top 12] \
        plain=/tmp/prof_plain/torch_profile/rank-0.json.gz mhc=/tmp/prof_mhc/.../rank-0.json.gz

Each ``NAME=TRACE`` is a Chrome trace as Megatron's ``--profile --use-pytorch-profiler`` writes it
(``<tensorboard-dir>/../torch_profile/rank-<r>.json.gz``), covering ``--steps`` training
iterations (``--profile-step-end`` minus ``--profile-step-start``). Kernels inside CUDA graphs are
counted like the others (CUPTI reports them one by one). It prints:

* GPU time per step by kind: the mHC Triton kernels (the ``*_kernel`` functions of
  ``kernels/triton/*.py``), GEMMs, attention, norms, elementwise/copy kernels, optimizer
  kernels, NCCL, memcpy/memset, other; with each run's difference from the first run; then the
  GPU's busy time (overlapping kernels counted once) and idle time within the traced window,
  which is where host-bound stretches show;
* the kernels whose time per step changed most against the first run (by name), so extra work
  outside the mHC kernels (copies of the wider stream, casts, reductions) shows by name.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

KERNELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels", "triton")

#: (kind, regular expression on the kernel name), first match wins; the mHC kind comes first.
KINDS = [
    ("GEMM", r"gemm|cutlass|nvjet|xmma|cublas|sm\d+_.*(?:tensorop|hmma|gmma)|wgmma|matmul"),
    ("attention", r"flash|fmha|cudnn|attn|attention|sdpa|softmax"),
    ("norm", r"norm"),
    ("optimizer", r"multi_tensor|adam|optimizer"),
    ("NCCL", r"nccl"),
    ("elementwise/copy/reduce", r"elementwise|vectorized|copy|fill|cat|reduce|cast|index|"
                                r"gather|scatter|transpose|unrolled|where|bias|dropout|gelu|swiglu"
                                r"|silu|rotary|rope|cross_entropy|embedding|sum|mul|add"),
]


def mhc_kernel_names(folder: str = KERNELS_DIR) -> set:
    """The names of the Triton kernels of this project (``def <name>_kernel(`` in its modules)."""
    names = set()
    for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
        with open(path) as f:
            names.update(re.findall(r"^def (\w+_kernel)\(", f.read(), flags=re.M))
    return names


def load_events(path: str) -> list:
    """The trace's complete events (``ph == "X"``)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X"]


def kind_of(name: str, category: str, mhc_names: set) -> str:
    """The kind of one GPU event, from its name and trace category."""
    if category in ("gpu_memcpy", "gpu_memset"):
        return "memcpy/memset"
    if name in mhc_names or name.split("(")[0] in mhc_names:
        return "mHC Triton kernels"
    lowered = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "other"


def busy_and_window(events: list):
    """(GPU busy, traced window) in microseconds: the union of the GPU events' intervals, and
    the span from the first GPU event's start to the last one's end."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not spans:
        return 0.0, 0.0
    busy, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy, max(e for _, e in spans) - spans[0][0]


def gpu_time_by_name(events: list):
    """Microseconds of GPU time and the number of launches, each per (category, name)."""
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            totals[(e["cat"], e["name"])] += float(e.get("dur", 0.0))
            counts[(e["cat"], e["name"])] += 1
    return totals, counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=TRACE")
    parser.add_argument("--steps", type=int, default=2,
                        help="training iterations the traces cover (default 2)")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: allowed a positive integer")
    runs, launches, spans = {}, {}, {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"{item!r}: expected NAME=TRACE")
        if not os.path.isfile(path):
            sys.exit(f"summarize_profile.py: {name}: no trace file {path}")
        try:
            events = load_events(path)
            runs[name], launches[name] = gpu_time_by_name(events)
            spans[name] = busy_and_window(events)
        except (OSError, ValueError, KeyError) as err:
            sys.exit(f"summarize_profile.py: {name}: {path} is not a Chrome trace ({err})")
        if not runs[name]:
            sys.exit(f"summarize_profile.py: {name}: {path} has no GPU kernel events")
    mhc_names = mhc_kernel_names()
    per_step = 1e-3 / args.steps  # us in the whole trace -> ms per step
    by_kind = {name: collections.Counter() for name in runs}
    for name, totals in runs.items():
        for (category, kernel), us in totals.items():
            by_kind[name][kind_of(kernel, category, mhc_names)] += us * per_step
    names = list(runs)
    first = names[0]
    kinds = sorted({k for c in by_kind.values() for k in c},
                   key=lambda k: -max(c[k] for c in by_kind.values()))
    print(f"GPU time per step (ms), {args.steps} steps per trace; Δ against {first}")
    print("| kind | " + " | ".join(names) + " | " +
          " | ".join(f"Δ {n}" for n in names[1:]) + " |")
    print("|---" * (1 + 2 * len(names) - 1) + "|")
    for kind in kinds + ["total"]:
        values = [sum(by_kind[n].values()) if kind == "total" else by_kind[n][kind]
                  for n in names]
        deltas = [v - values[0] for v in values[1:]]
        print(f"| {kind} | " + " | ".join(f"{v:.2f}" for v in values) + " | " +
              " | ".join(f"{d:+.2f}" for d in deltas) + " |")
    for label, pick in (("GPU busy (kernels overlapped once)", lambda b, w: b),
                        ("GPU idle in the traced window", lambda b, w: w - b),
                        ("traced window", lambda b, w: w)):
        values = [pick(*spans[n]) * per_step for n in names]
        print(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " | " +
              " | ".join(f"{v - values[0]:+.2f}" for v in values[1:]) + " |")
    for other in names[1:]:
        print(f"\nKernels whose time per step changed most, {other} − {first} (ms per step)")
        print("| kernel | kind | " + f"{first} | {other} | Δ | launches per step |")
        print("|---|---|---|---|---|---|")
        keys = set(runs[first]) | set(runs[other])
        deltas = sorted(keys, key=lambda k: -abs(runs[other][k] - runs[first][k]))
        for key in deltas[:args.top]:
            category, kernel = key
            a, b = runs[first][key] * per_step, runs[other][key] * per_step
            counted = f"{launches[first][key] / args.steps:g} → {launches[other][key] / args.steps:g}"
            short = kernel if len(kernel) <= 90 else kernel[:87] + "..."
            print(f"| `{short}` | {kind_of(kernel, category, mhc_names)} | {a:.2f} | {b:.2f} "
                  f"| {b - a:+.2f} | {counted} |")


if __name__ == "__main__":
    main()
