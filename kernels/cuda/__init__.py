"""The project's own CUDA C++ kernels (Hopper, sm_90), built with nvcc on first use.

Importing this package needs only torch: nothing is compiled or loaded until a kernel is called
(or ``entry.availability()`` is asked). ``entry`` holds the one-pass entry forward.
"""
