"""Fused per-step kernels: the common dialect (``dialect``), the MLX launcher
(``launch``) and a host C++ harness that runs the exact Metal and CUDA sources
on the CPU (``host_harness``, for tests)."""
