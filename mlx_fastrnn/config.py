"""Which implementation the layers run: chosen once at import from ``MLX_RNN_IMPL``.

``use_impl`` overrides it for the calls made inside a ``with`` block (per thread),
so tests and benchmarks can run both paths in one process.
"""

import contextlib
import os
import threading

IMPLS = {
    "fast": "fused kernels on the GPU, compiled cells on the CPU (default)",
    "legacy": "stock mlx.nn, bit for bit",
    "cell": "fused per-step cells only, no whole-sequence kernels (for comparisons)",
}
DEFAULT_IMPL = "fast"


def _impl_from_env():
    value = os.environ.get("MLX_RNN_IMPL", "").strip()
    if value == "":
        return DEFAULT_IMPL
    if value.lower() not in IMPLS:
        raise ImportError(
            f"MLX_RNN_IMPL={value!r} is not valid; use one of: {', '.join(IMPLS)}"
        )
    return value.lower()


IMPL = _impl_from_env()
_override = threading.local()


def current_impl():
    """The implementation calls made now will use."""
    return getattr(_override, "impl", None) or IMPL


@contextlib.contextmanager
def use_impl(impl):
    """Run the layers with ``impl`` (one of ``IMPLS``) inside the block."""
    if not isinstance(impl, str) or impl.strip().lower() not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; use one of: {', '.join(IMPLS)}")
    impl = impl.strip().lower()  # as MLX_RNN_IMPL is read
    previous = getattr(_override, "impl", None)
    _override.impl = impl
    try:
        yield
    finally:
        _override.impl = previous
