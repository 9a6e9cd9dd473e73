#!/usr/bin/env python3
"""Summarise the stability runs (issue 6): table + PNG plots from the runs' logs.

    python tools/stability_report.py RUN_DIR [RUN_DIR ...] --out docs/stability

Each RUN_DIR holds ``<variant>.log`` (the Megatron stdout ``train_variant.sh`` tees to
``train.log``) and, for hc / mhc, ``<variant>.gains.jsonl`` (``--mhc-gain-log``); one RUN_DIR per
seed. Writes ``OUT/summary.md`` (the table) and ``OUT/{loss,grad_norm,gain_vs_iteration,
gain_by_depth}.png`` (matplotlib). Parsing lives in ``megatron_mhc.tools.stability`` (tested on CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_mhc.tools.stability import load_run, plot_runs, summary_table  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="folders with <variant>.log files")
    parser.add_argument("--out", type=Path, required=True, help="folder for summary.md and PNGs")
    parser.add_argument("--variants", default="residual,hc,mhc",
                        help="comma-separated variants to read (default residual,hc,mhc)")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    runs = []
    for run_dir in args.run_dirs:
        for variant in variants:
            log = run_dir / f"{variant}.log"
            if not log.is_file():
                parser.error(f"{log}: no such log (expected <variant>.log for {variants})")
            runs.append(load_run(log, variant, label=run_dir.name))
    args.out.mkdir(parents=True, exist_ok=True)
    table = summary_table(runs)
    (args.out / "summary.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    written = plot_runs(runs, args.out)
    print("plots: " + (", ".join(str(p) for p in written) if written else "none (no matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
