"""The ``megatron-mhc`` command.

    megatron-mhc info            versions and which kernel backends can run here (and why not)
    megatron-mhc demo [ARGS]     the residual-vs-mHC demo (see ``megatron-mhc demo --help``)
"""

from __future__ import annotations

import sys
from typing import List, Optional

COMMANDS = ("info", "demo")


def info() -> int:
    """Print versions and the availability of every optional backend."""
    import torch

    import megatron_mhc
    from megatron_mhc.backends import backend_report, resolve_backend, transformer_engine_availability

    try:
        import megatron.core as mcore

        mcore_version = mcore.__version__
    except Exception as exc:  # pragma: no cover - megatron-core is a hard dependency
        mcore_version = f"not importable ({exc})"
    print(f"megatron-mhc {megatron_mhc.__version__} | megatron-core {mcore_version} | "
          f"torch {torch.__version__} | CUDA device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for name, status in backend_report().items():
        print(f"  kernel backend {name:8s} {'available' if status.available else 'unavailable'}"
              f"{': ' + status.reason if status.reason else ''}")
    te = transformer_engine_availability()
    print(f"  transformer-engine      {'available' if te.available else 'unavailable: ' + te.reason}")
    print(f"  --mhc-kernel-backend auto resolves to: {resolve_backend('auto')}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``megatron-mhc`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        return info()
    if command == "demo":
        from megatron_mhc.demo import main as demo_main

        demo_main(rest)
        return 0
    print(f"megatron-mhc: unknown command {command!r}; allowed: {', '.join(COMMANDS)}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
