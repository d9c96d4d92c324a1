import mlx.core as mx


def split_time(a):
    """Split a time-major [L, B, ...] array into L row-contiguous pieces [B, ...].

    One multi-output op instead of L slices (each op costs microseconds on the
    CPU, and the loop runs one per time step).
    """
    length = a.shape[0]
    flat = a.reshape(length * a.shape[1], *a.shape[2:])
    return mx.split(flat, length, axis=0) if length > 1 else [flat]


def f32(a):
    """``a`` as float32, without an op when it already is (ops cost time on the CPU)."""
    return a if a.dtype == mx.float32 else a.astype(mx.float32)


def per_problem_matmul(a, w):
    """``a @ w``; with ``w`` [NP, K, N] each problem's rows of ``a`` [NP*B, K]
    (problem-major) by its own ``w[p]``: one batched matmul."""
    if w.ndim == 2:
        return a @ w
    return (a.reshape(w.shape[0], -1, a.shape[-1]) @ w).reshape(a.shape[0], w.shape[-1])
