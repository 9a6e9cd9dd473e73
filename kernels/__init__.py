"""Fused mHC kernels (shipped as ``megatron_mhc.kernels``). Triton is the default fused path."""
