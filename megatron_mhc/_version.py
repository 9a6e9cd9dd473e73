"""The one version string of megatron-mhc (``setup.py`` reads it from here)."""

__version__ = "0.2.0"
