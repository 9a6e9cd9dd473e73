"""The project's own CUDA C++ kernels (Hopper, sm_90), built with nvcc on first use.

Importing this package needs only torch: nothing is compiled or loaded until a kernel is called
(or an ``availability()`` is asked). ``entry`` holds the one-pass entry forward (no backend uses
it: slower than Triton's, benchmarks/RESULTS.md); ``merge_project`` the merge fused with the next
sublayer's projection partials, which the Triton backend's ``merge_linked_project`` runs where it
applies; ``_build`` how both are built and loaded.
"""
