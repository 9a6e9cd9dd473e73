"""megatron-mhc: manifold-constrained hyper-connections (mHC, arXiv 2512.24880) for Megatron-LM.

Three floors, imports only downward:

* ``megatron_mhc.core``: the method on Megatron-Core — config, reference ops, kernel dispatch
  (``megatron_mhc.kernels``), the mHC layer and specs, recompute, overlap, pipeline widths, gains;
* ``megatron_mhc.training``: the Megatron-LM glue — flags and validation, the patch set, the
  runtime launcher, training-log metrics, checkpoint I/O, models from stored args, Megatron-Core
  on a CPU;
* ``megatron_mhc.tools``: what users run — convert, gain report, corpus, stability report, demo,
  the ``megatron-mhc`` command.

Importing this package needs only torch; megatron-core is imported by the modules that use it.
"""

from pathlib import Path as _Path

from megatron_mhc._version import __version__
from megatron_mhc.core.config import MHCConfig

# Installed (wheel, sdist, editable), setup.py maps the repository's kernels/ and patches/ folders
# in as megatron_mhc.kernels / megatron_mhc.patches. Imported straight from a source checkout
# (e.g. `python -m megatron_mhc` in the repository root, which shadows an installed copy), the
# package finds them beside itself instead.
_CHECKOUT = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "kernels").is_dir() and (
        _CHECKOUT / "kernels" / "__init__.py").is_file() and (_CHECKOUT / "setup.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 - the package's own search path

__all__ = ["MHCConfig", "__version__"]
