"""The ``megatron-mhc`` command (also ``python -m megatron_mhc``).

    megatron-mhc --version                          the package version
    megatron-mhc info                               versions and which kernel backends can run
    megatron-mhc demo [ARGS]                        residual vs HC vs mHC on a small GPT (--help)
    megatron-mhc patch apply|check|revert DIR       the hook patch set for Megatron-LM core_v0.19.0
    megatron-mhc launch SCRIPT [ARGS]               run an unpatched pretrain_gpt.py with the hooks
    megatron-mhc convert plain-to-mhc|to-upstream|from-upstream SRC OUT [--overwrite ...]
                                                    checkpoint conversions (--help for options)
    megatron-mhc gain-report CKPT [--batch F] [--out D] | --log GAINS.jsonl
                                                    H_res gain table and PNG plots

Every command runs on a machine without a GPU (launch needs what the script needs).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

COMMANDS = ("info", "demo", "patch", "launch", "convert", "gain-report")


def info() -> int:
    """Print versions and the availability of every optional backend."""
    import torch

    import megatron_mhc
    from megatron_mhc.core.backends import (
        auto_choice_reason,
        backend_report,
        resolve_backend,
        transformer_engine_availability,
    )

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
    print(f"  --mhc-kernel-backend auto resolves to: {resolve_backend('auto')} "
          f"({auto_choice_reason()})")
    from megatron_mhc.kernels.cuda import merge_project  # torch only: no Triton import

    fusion = os.environ.get("MHC_CROSS_SUBLAYER_FUSION", "0")  # kernels/triton validates it
    print(f"  cross-sublayer fusion   {'on' if fusion == '1' else 'off'} "
          f"(MHC_CROSS_SUBLAYER_FUSION); its CUDA merge + projection kernel: "
          f"{merge_project.status_without_build()}")
    dx_once = os.environ.get("MHC_BACKWARD_DX_ONCE", "0")  # kernels/triton validates it
    print(f"  dx-once backward        {'on' if dx_once == '1' else 'off'} (MHC_BACKWARD_DX_ONCE; "
          "opt-in, not yet timed on a GPU)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``megatron-mhc`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from megatron_mhc import __version__

        print(f"megatron-mhc {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "info":
        return info()
    if command == "demo":
        from megatron_mhc.tools.demo import main as demo_main

        demo_main(rest)
        return 0
    if command == "patch":
        from megatron_mhc.training.patching import main as patch_main

        return patch_main(rest)
    if command == "launch":
        from megatron_mhc.training.launch import main as launch_main

        return launch_main(rest)
    if command == "convert":
        from megatron_mhc.tools.convert import main as convert_main

        return convert_main(rest)
    if command == "gain-report":
        from megatron_mhc.tools.gain_report import main as gain_main

        return gain_main(rest)
    print(f"megatron-mhc: unknown command {command!r}; allowed: {', '.join(COMMANDS)}, "
          "--version, --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
