"""``python -m megatron_mhc``: the ``megatron-mhc`` command."""

import sys

from megatron_mhc.tools.cli import main

sys.exit(main())
