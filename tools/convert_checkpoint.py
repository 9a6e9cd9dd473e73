#!/usr/bin/env python3
"""Convert Megatron torch_dist checkpoints: plain -> mHC (function-preserving), ours <-> upstream layout.

Same as ``megatron-mhc convert ...``; run with --help for the options.
"""

import sys

from megatron_mhc.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
