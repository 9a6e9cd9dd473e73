"""megatron-mhc: manifold-constrained hyper-connections (mHC, arXiv 2512.24880) for Megatron-LM.

Importing this package needs only torch; the Megatron-facing modules (``megatron_mhc.layer``,
``megatron_mhc.specs``) import megatron-core when first used.
"""

from megatron_mhc.config import MHCConfig

__version__ = "0.1.0"

__all__ = ["MHCConfig", "__version__"]
