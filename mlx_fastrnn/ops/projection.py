"""The input projection ``x W^T + b`` for a whole sequence, as one matmul.

Why not just ``mx.addmm(b, x, w.T)`` as stock does: with a transposed-view right
operand the CPU's reference BLAS runs ~1.7x slower than with a contiguous one
(measured here: 64x256 @ 256x768 5.5 ms vs 3.2 ms), and autodiff of the
contiguous form would in turn put the slow transposed view into the backward.
So the forward multiplies by a contiguous ``W^T`` and the VJP multiplies by
``W`` itself. The copy of ``W^T`` costs one pass over the weights, so it is
only made when at least ``MIN_ROWS`` rows share it, and only on the CPU.
"""

import mlx.core as mx

MIN_ROWS = 4


def transposed(w, rows):
    """``w.T`` (each problem's, for a stacked [NP, K, N] ``w``), made contiguous when
    ``rows`` rows will be multiplied by it on the CPU (GPU matmuls take the
    transposed view as it is)."""
    wt = w.T if w.ndim == 2 else w.swapaxes(-1, -2)
    if rows >= MIN_ROWS and mx.default_device().type == mx.cpu:
        return mx.contiguous(wt)
    return wt


@mx.custom_function
def _project(x, w, b):
    rows = x.size // x.shape[-1]
    return mx.addmm(b, x, transposed(w, rows))


@_project.vjp
def _project_vjp(primals, cotangent, output):
    x, w, b = primals
    d = cotangent
    d2 = d.reshape(-1, d.shape[-1])
    dx = d @ w
    dw = d2.T @ x.reshape(-1, x.shape[-1])
    # Sum over every (time, batch) row in float32: a bfloat16 sum of B*L rows
    # loses ~10% (stock's autodiff does that).
    db = d2.astype(mx.float32).sum(axis=0)
    return dx.astype(x.dtype), dw.astype(w.dtype), db.astype(b.dtype)


@mx.custom_function
def _project_no_bias(x, w):
    rows = x.size // x.shape[-1]
    return x @ transposed(w, rows)


@_project_no_bias.vjp
def _project_no_bias_vjp(primals, cotangent, output):
    x, w = primals
    d = cotangent
    dx = d @ w
    dw = d.reshape(-1, d.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return dx.astype(x.dtype), dw.astype(w.dtype)


def project(x, w, b=None):
    """``x @ w.T + b`` over the last axis of ``x`` (any leading axes)."""
    if x.size < MIN_ROWS * x.shape[-1]:  # a streaming step: exactly stock's ops
        return mx.addmm(b, x, w.T) if b is not None else x @ w.T
    return _project(x, w, b) if b is not None else _project_no_bias(x, w)
