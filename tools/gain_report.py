#!/usr/bin/env python3
"""H_res gain report (per-sublayer and composite, forward and backward) from a checkpoint.

Same as ``megatron-mhc gain-report ...``; run with --help for the options.
"""

import sys

from megatron_mhc.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["gain-report", *sys.argv[1:]]))
