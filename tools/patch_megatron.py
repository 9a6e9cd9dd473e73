#!/usr/bin/env python3
"""Apply / check / revert the megatron-mhc hook patch set on a Megatron-LM core_v0.19.0 tree.

Same as ``megatron-mhc patch ...``; run with --help for the options.
"""

import sys

from megatron_mhc.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["patch", *sys.argv[1:]]))
