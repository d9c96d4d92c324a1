"""Build, cache and launch the fused step kernels.

One thread per (row, hidden unit): ``grid = (B*H, 1, 1)``, threadgroups of
up to 256 threads (CUDA rounds the grid up to whole blocks; the bodies
bounds-check). The outputs and every operand but ``x`` share one dtype,
float32 unless the caller asks otherwise (the streaming step passes half
states through as they are). Inputs must be row-contiguous: MLX
(``ensure_row_contiguous=True``) copies any that are not.

``target`` is ``'metal'`` or ``'cuda'``; ``'host:metal'`` / ``'host:cuda'``
run the same sources through :mod:`.host_harness` on the CPU (tests).
"""

import functools
import math
from typing import NamedTuple

import mlx.core as mx

from .dialect import TARGETS, kernel_name, source

MAX_THREADGROUP = 256
HOST_PREFIX = "host:"
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)  # accepted for x (template T)


def gpu_target():
    """'metal' or 'cuda' when the default device (now) is a GPU with that
    backend, else None. (Asked on every layer call: only the device lookup is
    per call, the backend is found once.)"""
    if mx.default_device().type != mx.gpu:
        return None
    return _gpu_backend()


@functools.lru_cache(maxsize=None)
def _gpu_backend():
    try:
        if mx.metal.is_available():
            return "metal"
    except Exception:  # noqa: BLE001 - a build without the module
        pass
    try:
        if mx.cuda.is_available():
            return "cuda"
    except Exception:  # noqa: BLE001
        pass
    return None


@functools.lru_cache(maxsize=None)
def fused_kernel(ks, target):
    """The ``mx.fast`` kernel object for ``ks`` on ``target``, built on first use.

    Built lazily because creation can fail where the backend is missing
    (``cuda_kernel`` raises "No CUDA back-end" at creation; ``metal_kernel``
    only at call). A failure is not cached.
    """
    header, body = source(ks, target)
    common = dict(
        name=kernel_name(ks, target),
        input_names=list(ks.input_names),
        output_names=list(ks.output_names),
        source=body,
        header=header,
        ensure_row_contiguous=True,
    )
    if target == "metal":
        try:  # IEEE semantics for inf/NaN whatever MLX's default math mode is
            return mx.fast.metal_kernel(**common, compile_options={"math_mode": "safe"})
        except TypeError:  # an MLX without compile_options
            return mx.fast.metal_kernel(**common)
    return mx.fast.cuda_kernel(**common)


def launch_config(output_shapes, threads=None):
    """``(threads, grid, threadgroup)``: one thread per element of the last
    output (``[B, H]`` in every step kernel) unless ``threads`` is given."""
    if threads is None:
        threads = math.prod(output_shapes[-1])
    return threads, (threads, 1, 1), (max(1, min(MAX_THREADGROUP, threads)), 1, 1)


def launch(ks, target, inputs, output_shapes, template, *, threads=None, dtype=mx.float32):
    """Run ``ks`` on ``target``; returns the outputs (a list), all of ``dtype``."""
    output_shapes = [tuple(s) for s in output_shapes]
    output_dtypes = [dtype] * len(output_shapes)
    threads, grid, threadgroup = launch_config(output_shapes, threads)
    if threads == 0:
        return [mx.zeros(s, dtype) for s in output_shapes]
    if target.startswith(HOST_PREFIX):
        from . import host_harness

        return host_harness.run(ks, target[len(HOST_PREFIX):], inputs, output_shapes,
                                template, grid=grid, threadgroup=threadgroup,
                                output_dtypes=output_dtypes)
    if target not in TARGETS:
        raise ValueError(f"unknown kernel target {target!r}; expected one of {TARGETS}")
    return fused_kernel(ks, target)(
        inputs=inputs,
        output_shapes=output_shapes,
        output_dtypes=output_dtypes,
        grid=grid,
        threadgroup=threadgroup,
        template=template,
    )


# ------------------------------------------------------------ step helpers
# Shared by cells/<cell>/kernels.py. The step kernels index rows flat
# (row b of every operand at b * width), so operands keep their leading batch
# axes (no reshape ops) and the outputs get the same ones.

class StepShape(NamedTuple):
    x: mx.array  # [*lead, G*H] in a kernel dtype
    batch: int  # B, the product of the leading axes
    hidden: int  # H
    lead: tuple  # the leading axes of the step's arrays


@functools.lru_cache(maxsize=64)
def dims_array(batch):
    """The ``dims`` input: int32[4], dims[0] = B rows."""
    return mx.array([batch, 0, 0, 0], dtype=mx.int32)


def step_shape(x, num_gates):
    """``x`` [..., G*H] in a dtype the kernels take (any other float dtype goes
    to float32), with the step's sizes."""
    if x.dtype not in KERNEL_DTYPES:
        x = x.astype(mx.float32)
    lead, width = tuple(x.shape[:-1]), x.shape[-1]
    return StepShape(x, math.prod(lead), width // num_gates, lead)


def operand(a, sh, width, dtype=mx.float32):
    """A [*lead, width] kernel operand of ``dtype`` (``a`` is that or
    broadcasts to it); ``None`` (a zero state) gives zeros."""
    if a is None:
        return mx.zeros((*sh.lead, width), dtype)
    if a.dtype != dtype:
        a = a.astype(dtype)
    if tuple(a.shape) != (*sh.lead, width):
        a = mx.broadcast_to(a, (*sh.lead, width))
    return a


def vector_operand(a, width, dtype=mx.float32):
    """A [width] kernel operand of ``dtype`` (a per-unit parameter); ``None`` gives zeros."""
    if a is None:
        return mx.zeros((width,), dtype)
    if a.dtype != dtype:
        a = a.astype(dtype)
    return a if a.ndim == 1 else a.reshape(width)


def run_step(ks, target, sh, inputs, out_widths, template_extra=(), dtype=mx.float32):
    """Launch a step kernel on ``(dims, *inputs)``; outputs shaped ``[*lead, width]``,
    of ``dtype`` (the dtype of every operand but ``x``: template ``TS``)."""
    launcher = _step_launcher(ks, target, sh.x.dtype, dtype, sh.hidden, sh.lead, tuple(out_widths),
                              tuple(template_extra))
    return launcher([dims_array(sh.batch), *inputs])


@functools.lru_cache(maxsize=1024)
def _step_launcher(ks, target, x_dtype, dtype, hidden, lead, out_widths, template_extra):
    """``launch`` with everything but the inputs worked out once per step shape.
    (A streaming step is host-bound: the argument lists of a kernel call cost
    tens of microseconds per step when rebuilt every time.)"""
    template = [("T", x_dtype), ("TS", dtype), ("H", hidden), *template_extra]
    output_shapes = [(*lead, w) for w in out_widths]
    threads, grid, threadgroup = launch_config(output_shapes)
    if threads == 0 or target.startswith(HOST_PREFIX) or target not in TARGETS:
        return lambda inputs: launch(ks, target, inputs, output_shapes, template, dtype=dtype)
    kernel = fused_kernel(ks, target)
    kwargs = dict(output_shapes=output_shapes, output_dtypes=[dtype] * len(output_shapes),
                  grid=grid, threadgroup=threadgroup, template=template)
    return lambda inputs: kernel(inputs=inputs, **kwargs)
