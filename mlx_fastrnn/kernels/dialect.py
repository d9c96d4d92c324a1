"""The common kernel dialect: one body per kernel, a thin prelude per target.

A kernel is written once, as the *body* of an MLX custom kernel
(``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel``: MLX generates the
signature from the input and output names and the template arguments). The
body may use only what every target prelude defines:

- ``gid``: the flat thread index (int), defined by the BODY prelude;
- ``RNN_FN``: the qualifier of helper functions written in a header;
- ``rnn_exp``, ``rnn_tanh``, ``rnn_sigmoid``, ``rnn_relu``: float32 math,
  IEEE-safe (no NaN for finite input of any size, NaN in -> NaN out);
- the template names of its :class:`KernelSource` (``T`` the dtype of ``x``,
  ``TS`` that of the other operands and the outputs, ``H`` the hidden size,
  ...), plain C++ arithmetic, ``static_cast``.

It must not fork per target (no ``#ifdef``), must not name any Metal
attribute (``grid_size``, ``threads_per_grid``, ...: MLX's Metal generator
adds a kernel parameter for every attribute name found in the body text) and
must not contain ``<input>_shape`` / ``_strides`` / ``_ndim`` (MLX would add
those parameters too). ``inf`` is a macro on CUDA: don't use it as a name.

``metal_source(ks)`` / ``cuda_source(ks)`` return ``(header, body)`` exactly
as handed to MLX; ``host_harness`` compiles those same strings with g++.
"""

import hashlib
from dataclasses import dataclass

TARGETS = ("metal", "cuda")


@dataclass(frozen=True)
class KernelSource:
    """One kernel in the common dialect.

    ``input_names`` / ``output_names`` are the kernel parameter names, in
    order; ``template_names`` the template arguments the launcher passes, in
    order (``T`` the dtype of ``x``, ``TS`` the dtype of every other operand
    and of the outputs, ``H`` the hidden size, RNN also ``RELU``). MLX types
    the parameters from the arrays it is given but names the compiled kernel
    only after the template, so every dtype a kernel sees must be in it.
    """

    name: str
    input_names: tuple
    output_names: tuple
    body: str
    template_names: tuple = ("T", "H")


# --------------------------------------------------------------------- preludes

# Per-target primitives. Metal: precise:: math, so the result does not depend
# on the library's math mode.
METAL_HEADER = """\
#include <metal_stdlib>
#define RNN_FN inline
RNN_FN float rnn_exp(float x) { return metal::precise::exp(x); }
RNN_FN float rnn_tanh_lib(float x) { return metal::precise::tanh(x); }
RNN_FN bool rnn_isnan(float x) { return metal::isnan(x); }
"""

# CUDA: MLX's NVRTC build uses no fast math, so expf/tanhf are the precise ones.
CUDA_HEADER = """\
#define RNN_FN __device__ __forceinline__
RNN_FN float rnn_exp(float x) { return expf(x); }
RNN_FN float rnn_tanh_lib(float x) { return tanhf(x); }
RNN_FN bool rnn_isnan(float x) { return x != x; }
"""

# Shared helpers, identical on every target.
COMMON_HEADER = """\
// tanh(x) rounds to +-1 in float32 once |x| > 9.02: answer that directly, so
// huge arguments never reach the library function. NaN falls through.
RNN_FN float rnn_tanh(float x) {
  return x > 16.0f ? 1.0f : (x < -16.0f ? -1.0f : rnn_tanh_lib(x));
}
// exp only ever of a non-positive argument: no overflow, no inf/inf.
RNN_FN float rnn_sigmoid(float x) {
  if (x >= 0.0f) {
    return 1.0f / (1.0f + rnn_exp(-x));
  }
  const float e = rnn_exp(x);
  return e / (1.0f + e);
}
// max(x, 0) that propagates NaN, as mx.maximum does.
RNN_FN float rnn_relu(float x) {
  return (x > 0.0f || rnn_isnan(x)) ? x : 0.0f;
}
"""

# The flat thread index. On Metal it must be in the body: MLX adds the
# `thread_position_in_grid` parameter only when that name appears in the body.
METAL_BODY_PRELUDE = "const int gid = static_cast<int>(thread_position_in_grid.x);\n"
CUDA_BODY_PRELUDE = "const int gid = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);\n"

_PRELUDES = {
    "metal": (METAL_HEADER, METAL_BODY_PRELUDE),
    "cuda": (CUDA_HEADER, CUDA_BODY_PRELUDE),
}


def source(ks, target):
    """``(header, body)`` of ``ks`` for ``target``, exactly as handed to MLX."""
    try:
        header, prelude = _PRELUDES[target]
    except KeyError:
        raise ValueError(f"unknown kernel target {target!r}; expected one of {TARGETS}") from None
    return header + COMMON_HEADER, prelude + ks.body


def metal_source(ks):
    return source(ks, "metal")


def cuda_source(ks):
    return source(ks, "cuda")


def kernel_name(ks, target):
    """The name handed to MLX: the kernel's name plus a hash of its source.

    MLX caches compiled kernels by name (CUDA: also on disk, across
    processes), so a name must never be reused for a different source.
    """
    header, body = source(ks, target)
    text = "\0".join((target, header, body, *ks.input_names, "|", *ks.output_names))
    return f"fastrnn_{ks.name}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"
