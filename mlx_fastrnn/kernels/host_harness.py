"""Run the exact Metal and CUDA kernel sources on the CPU, with the host C++ compiler.

CI has neither a GPU nor a Mac, yet the kernels' logic must be executed. This
module takes a :class:`~.dialect.KernelSource`, builds the very ``(header,
body)`` strings that :mod:`.launch` hands to ``mx.fast.metal_kernel`` /
``mx.fast.cuda_kernel``, wraps them the way MLX does (the signature generated
from the input/output names, dtypes and template arguments: MLX's
``write_signature`` for Metal, ``build_kernel`` for CUDA), and compiles the
result with g++ under a small host prelude that stands in for the target
(address-space qualifiers and kernel attributes defined away, ``uint3``,
``metal::precise``, ``blockIdx``/``blockDim``/``threadIdx``, half and
bfloat16 types). A launcher loop emulates the grid the way MLX dispatches it:

- Metal: ``dispatchThreads`` runs exactly ``grid`` threads (non-uniform
  threadgroups of ``min(threadgroup, grid)``);
- CUDA: blocks of ``min(threadgroup, grid)`` threads, ``ceil(grid /
  threadgroup)`` blocks, so the grid is rounded up to whole blocks and a body
  without a bounds check writes out of bounds.

Outputs are allocated with guard regions on both sides: a write outside an
output raises :class:`OutOfBoundsWrite`, an output element never written
raises :class:`UnwrittenOutput`. Threads run one after another (no barriers,
no threadgroup memory: fine for elementwise kernels).

Shared libraries are cached by source hash under a temp directory
(``MLX_FASTRNN_HOST_CACHE`` overrides it). Runtime dependency: mlx only.
"""

import ctypes
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading

import mlx.core as mx

from . import dialect
from .cuda_source import template_constants

__all__ = [
    "HostCompileError", "OutOfBoundsWrite", "UnwrittenOutput", "available", "compiler",
    "generate", "translation_unit", "run",
]

GUARD_BYTES = 256
_SENTINEL = 0xA5  # fill byte of guards and fresh outputs
_UINTS = {2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


class HostCompileError(RuntimeError):
    pass


class OutOfBoundsWrite(AssertionError):
    pass


class UnwrittenOutput(AssertionError):
    pass


# dtype -> (Metal type = MLX get_type_string, CUDA type = MLX dtype_to_cuda_type)
_TYPES = {
    mx.float32: ("float", "float"),
    mx.float16: ("float16_t", "__half"),
    mx.bfloat16: ("bfloat16_t", "__nv_bfloat16"),
    mx.int32: ("int32_t", "int32_t"),
    mx.uint32: ("uint32_t", "uint32_t"),
    mx.int64: ("int64_t", "int64_t"),
    mx.uint8: ("uint8_t", "uint8_t"),
    mx.bool_: ("bool", "bool"),
}


def _type(dtype, target):
    try:
        metal, cuda = _TYPES[dtype]
    except KeyError:
        raise NotImplementedError(f"host harness: dtype {dtype} not supported") from None
    return metal if target == "metal" else cuda


# ------------------------------------------------------------------ host preludes

_HOST_TYPES = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// 16-bit floats as storage types: only an explicit conversion to float, so a
// body that does arithmetic on T without static_cast<float> fails here too.
struct rnn_host_half {
  _Float16 v;
  rnn_host_half() = default;
  explicit rnn_host_half(float f) : v(static_cast<_Float16>(f)) {}
  explicit operator float() const { return static_cast<float>(v); }
};
struct rnn_host_bfloat16 {
  uint16_t bits;
  rnn_host_bfloat16() = default;
  explicit rnn_host_bfloat16(float f) {  // round to nearest even, NaN kept quiet
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    } else {
      bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  explicit operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
static_assert(sizeof(rnn_host_half) == 2 && sizeof(rnn_host_bfloat16) == 2, "16-bit types");
"""

# Stands in for Metal (and MLX's metal::utils() preamble).
HOST_METAL_PRELUDE = _HOST_TYPES + r"""
typedef rnn_host_half half;
typedef rnn_host_half float16_t;
typedef rnn_host_bfloat16 bfloat16_t;
typedef unsigned int uint;
struct uint3 { uint x, y, z; };
namespace metal {
inline bool isnan(float x) { return std::isnan(x); }
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float tanh(float x) { return std::tanh(x); }
}  // namespace precise
}  // namespace metal
// Address spaces vanish; [[kernel]], [[buffer(i)]], ... are ignored attributes.
#define device
#define constant
#define threadgroup
"""

# Stands in for MLX's CUDA default header (mlx/backend/cuda/device/utils.cuh and
# <cooperative_groups.h>; some MLX versions also `#define inf`, kept here so a
# body using `inf` as a name fails on the host too).
HOST_CUDA_PRELUDE = _HOST_TYPES + r"""
typedef rnn_host_half __half;
typedef rnn_host_bfloat16 __nv_bfloat16;
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __grid_constant__
struct rnn_host_dim3 { unsigned int x, y, z; };
static thread_local rnn_host_dim3 threadIdx, blockIdx, blockDim, gridDim;
namespace cooperative_groups {}
#define inf std::numeric_limits<float>::infinity()
"""

# Metal attributes MLX adds as kernel parameters when their name is in the body,
# with their value for thread i of a 1-D dispatch (g = grid, t = threadgroup).
_METAL_ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": ("uint", "(t + 3) / 4"),
    "dispatch_simdgroups_per_threadgroup": ("uint", "(t + 31) / 32"),
    "dispatch_threads_per_threadgroup": ("uint3", "uint3{t, 1, 1}"),
    "grid_origin": ("uint3", "uint3{0, 0, 0}"),
    "grid_size": ("uint3", "uint3{g, 1, 1}"),
    "quadgroup_index_in_threadgroup": ("uint", "(i % t) / 4"),
    "quadgroups_per_threadgroup": ("uint", "(t + 3) / 4"),
    "simdgroup_index_in_threadgroup": ("uint", "(i % t) / 32"),
    "simdgroups_per_threadgroup": ("uint", "(t + 31) / 32"),
    "thread_execution_width": ("uint", "32u"),
    "thread_index_in_quadgroup": ("uint", "(i % t) % 4"),
    "thread_index_in_simdgroup": ("uint", "(i % t) % 32"),
    "thread_index_in_threadgroup": ("uint", "i % t"),
    "thread_position_in_grid": ("uint3", "uint3{i, 0, 0}"),
    "thread_position_in_threadgroup": ("uint3", "uint3{i % t, 0, 0}"),
    "threadgroup_position_in_grid": ("uint3", "uint3{i / t, 0, 0}"),
    "threadgroups_per_grid": ("uint3", "uint3{(g + t - 1) / t, 1, 1}"),
    "threads_per_grid": ("uint3", "uint3{g, 1, 1}"),
    "threads_per_simdgroup": ("uint", "32u"),
    "threads_per_threadgroup": ("uint3", "uint3{t, 1, 1}"),
}

_METAL_MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes smaller inputs in `constant` memory


# ------------------------------------------------------------------ MLX's generators

def _template_value(value, target):
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, mx.Dtype):
        return value
    raise TypeError(f"template argument must be bool, int or mlx.core.Dtype, got {value!r}")


def _check_shape_infos(ks, metas):
    for name, (_, ndim, _) in zip(ks.input_names, metas):
        for suffix in ("_shape", "_strides", "_ndim"):
            if ndim > 0 and name + suffix in ks.body:
                raise NotImplementedError(
                    f"{ks.name}: the body names {name + suffix}; MLX would add that "
                    "kernel parameter and the host harness does not emulate it")


def _metal_kernel(ks, metas, output_dtypes, template):
    """Metal: MLX's ``write_signature`` + the explicit instantiation. Returns
    ``(source, callee, params)`` where ``params`` lists how the launcher passes
    each parameter."""
    header, body = dialect.metal_source(ks)
    name = "custom_kernel_" + dialect.kernel_name(ks, "metal")
    tdef = ""
    if template:
        parts = []
        for _, v in template:
            parts.append(("1" if v else "0") if isinstance(v, bool)
                         else str(v) if isinstance(v, int) else _type(v, "metal"))
        tdef = "<" + ", ".join(parts) + ">"
        name += "_" + re.sub(r"<|>|(, )", "_", tdef)[:-1]
    for dtype, ndim, size in metas:
        name += "_" + _type(dtype, "metal")
        name += "s" if ndim == 0 else "c" if size < _METAL_MAX_CONSTANT_ARRAY_SIZE else ""
    for dtype in output_dtypes:
        name += "_" + _type(dtype, "metal")

    src = header
    if template:
        kinds = []
        for n, v in template:
            kinds.append(("bool " if isinstance(v, bool) else "int " if isinstance(v, int)
                          else "typename ") + n)
        src += "template <" + ", ".join(kinds) + ">\n"
    src += "[[kernel]] void " + name + "(\n"
    params, index = [], 0
    attributes = [a for a in _METAL_ATTRIBUTES if a in body]
    for n, (dtype, ndim, size) in zip(ks.input_names, metas):
        loc = "constant" if size < _METAL_MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if ndim == 0 else "*"
        src += f"  const {loc} {_type(dtype, 'metal')}{ref} {n} [[buffer({index})]],\n"
        params.append(("in", _type(dtype, "metal"), ndim == 0))
        index += 1
    for i, (n, dtype) in enumerate(zip(ks.output_names, output_dtypes)):
        src += f"  device {_type(dtype, 'metal')}* {n} [[buffer({index})]]"
        last = i == len(output_dtypes) - 1 and not attributes
        src += ") {\n" if last else ",\n"
        params.append(("out", _type(dtype, "metal"), False))
        index += 1
    for i, a in enumerate(attributes):
        src += f"  {_METAL_ATTRIBUTES[a][0]} {a} [[{a}]]"
        src += ") {\n" if i == len(attributes) - 1 else ",\n"
        params.append(("attr", a, False))
    src += body + "\n}\n"
    callee = name
    if template:
        callee = name + tdef
        src += (f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({callee}) '
                f"{callee};\n")
    return src, callee, params


def _cuda_kernel(ks, metas, output_dtypes, template):
    """CUDA: MLX's ``build_kernel`` (minus its default header, which the host
    prelude replaces)."""
    header, body = dialect.cuda_source(ks)
    name = "custom_kernel_" + dialect.kernel_name(ks, "cuda")
    for _, v in template:
        name += ("_t" if v else "_f") if isinstance(v, bool) else \
            f"_{v}" if isinstance(v, int) else "_" + _type(v, "metal")
    src = header
    src += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    src += "__global__ void " + name + "(\n"
    params = []
    for n, (dtype, _, _) in zip(ks.input_names, metas):
        src += f"    const {_type(dtype, 'cuda')}* {n},\n"
        params.append(("in", _type(dtype, "cuda"), False))
    for i, (n, dtype) in enumerate(zip(ks.output_names, output_dtypes)):
        src += f"    {_type(dtype, 'cuda')}* {n}"
        src += ",\n" if i < len(output_dtypes) - 1 else ") {\n"
        params.append(("out", _type(dtype, "cuda"), False))
    src += template_constants(template, lambda v: _type(v, "cuda"))
    src += body + "\n}\n\n} // namespace mlx::core::cu\n"
    return src, "mlx::core::cu::" + name, params


def generate(ks, target, inputs, output_dtypes, template):
    """The kernel source MLX would build for these inputs (mx arrays),
    output dtypes and template ``[(name, value), ...]``.

    Returns ``(source, callee, params)``: the source text (header included;
    for CUDA without MLX's default header), the function to call, and per
    parameter ``(kind, type, by_value)``.
    """
    if target not in dialect.TARGETS:
        raise ValueError(f"unknown target {target!r}")
    if len(inputs) != len(ks.input_names):
        raise ValueError(f"{ks.name}: {len(inputs)} inputs for {len(ks.input_names)} names")
    if len(output_dtypes) != len(ks.output_names):
        raise ValueError(f"{ks.name}: {len(output_dtypes)} outputs for {len(ks.output_names)} names")
    names = [n for n, _ in template]
    if tuple(names) != tuple(ks.template_names):
        raise ValueError(f"{ks.name}: template {names} != declared {list(ks.template_names)}")
    template = [(n, _template_value(v, target)) for n, v in template]
    metas = [(a.dtype, a.ndim, a.size) for a in inputs]
    _check_shape_infos(ks, metas)
    make = _metal_kernel if target == "metal" else _cuda_kernel
    return make(ks, metas, list(output_dtypes), template)


def _launcher(target, callee, params):
    args, k = [], 0
    for kind, typ, by_value in params:
        if kind == "attr":
            args.append(_METAL_ATTRIBUTES[typ][1])
            continue
        const = "const " if kind == "in" else ""
        ptr = f"static_cast<{const}{typ}*>(args[{k}])"
        args.append("*" + ptr if by_value else ptr)
        k += 1
    call = f"{callee}({', '.join(args)});"
    if target == "metal":
        # dispatchThreads: exactly g threads, threadgroups of min(t, g).
        loop = (f"  const uint g = static_cast<uint>(gx);\n"
                f"  const uint t = static_cast<uint>(tx < gx ? tx : gx);\n"
                f"  for (uint i = 0; i < g; ++i) {{\n    {call}\n  }}\n")
    else:
        # MLX: block = min(t, g), grid = ceil(g / t) blocks.
        loop = (f"  const unsigned int block = static_cast<unsigned int>(tx < gx ? tx : gx);\n"
                f"  const unsigned int blocks = static_cast<unsigned int>((gx + tx - 1) / tx);\n"
                f"  gridDim = rnn_host_dim3{{blocks, 1, 1}};\n"
                f"  blockDim = rnn_host_dim3{{block, 1, 1}};\n"
                f"  for (unsigned int b = 0; b < blocks; ++b) {{\n"
                f"    for (unsigned int i = 0; i < block; ++i) {{\n"
                f"      blockIdx = rnn_host_dim3{{b, 0, 0}};\n"
                f"      threadIdx = rnn_host_dim3{{i, 0, 0}};\n"
                f"      {call}\n    }}\n  }}\n")
    return ('\nextern "C" int rnn_host_launch(void** args, int gx, int tx) {\n'
            + loop + "  return 0;\n}\n")


def translation_unit(ks, target, inputs, output_dtypes, template):
    """The full C++ file compiled for the host: prelude + MLX's kernel source + launcher."""
    src, callee, params = generate(ks, target, inputs, output_dtypes, template)
    prelude = HOST_METAL_PRELUDE if target == "metal" else HOST_CUDA_PRELUDE
    return (f"// host build of {ks.name} for {target}\n" + prelude
            + "// ---- kernel source as MLX builds it ----\n" + src
            + "// ---- host launcher ----" + _launcher(target, callee, params))


# ------------------------------------------------------------------ compiling

_FLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Wno-attributes",
          "-Wno-unused-variable", "-ffp-contract=off", "-fno-fast-math")
_LOCK = threading.Lock()
_LIBS = {}


def compiler():
    """The host C++ compiler (``$CXX``, else g++, c++, clang++), or None."""
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand:
            path = shutil.which(cand)
            if path:
                return path
    return None


_AVAILABLE = None


def available():
    """``(ok, reason)``: whether a host compiler builds and runs the preludes
    (it needs ``_Float16``: g++ >= 12 or clang >= 15 on x86-64/arm64)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        if compiler() is None:
            _AVAILABLE = (False, "no C++ compiler found (set CXX, or install g++)")
        else:
            try:
                for prelude in (HOST_METAL_PRELUDE, HOST_CUDA_PRELUDE):
                    _library(prelude + '\nextern "C" int rnn_host_launch(void**, int, int) '
                                       "{ return 0; }\n")
                _AVAILABLE = (True, "")
            except (HostCompileError, OSError) as e:
                _AVAILABLE = (False, f"host compiler cannot build the preludes: {e}")
    return _AVAILABLE


def _cache_dir():
    d = os.environ.get("MLX_FASTRNN_HOST_CACHE") or os.path.join(
        tempfile.gettempdir(), f"mlx_fastrnn_host_{os.getuid() if hasattr(os, 'getuid') else 0}")
    inc = os.path.join(d, "include")
    os.makedirs(inc, exist_ok=True)
    stub = os.path.join(inc, "metal_stdlib")
    if not os.path.exists(stub):  # the Metal header's #include <metal_stdlib>
        with open(stub, "w") as f:
            f.write("// host stand-in: the harness prelude defines what the kernels use\n")
    return d, inc


def _library(tu):
    """Compile ``tu`` (cached by hash) and return its launcher function."""
    cxx = compiler()
    if cxx is None:
        raise HostCompileError("no C++ compiler found (set CXX, or install g++)")
    key = hashlib.sha256("\0".join((cxx, *_FLAGS, tu)).encode()).hexdigest()[:32]
    with _LOCK:
        fn = _LIBS.get(key)
    if fn is not None:
        return fn
    d, inc = _cache_dir()
    so = os.path.join(d, key + ".so")
    if not os.path.exists(so):
        cpp = os.path.join(d, key + ".cpp")
        with open(cpp, "w") as f:
            f.write(tu)
        tmp = f"{so}.{os.getpid()}.{threading.get_ident()}.tmp"
        proc = subprocess.run([cxx, *_FLAGS, "-I", inc, cpp, "-o", tmp],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise HostCompileError(f"{cxx} failed on {cpp}:\n{proc.stderr}")
        os.replace(tmp, so)
    lib = ctypes.CDLL(so)
    fn = lib.rnn_host_launch
    fn.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    with _LOCK:
        _LIBS[key] = fn
    return fn


# ------------------------------------------------------------------ running

def _buffer(data_len, post, fill):
    """A buffer of GUARD_BYTES + data_len + post bytes filled with ``fill``."""
    buf = bytearray(bytes([fill]) * (GUARD_BYTES + data_len + post))
    return buf, (ctypes.c_char * len(buf)).from_buffer(buf)


def run(ks, target, inputs, output_shapes, template, *, grid=None, threadgroup=None,
        output_dtypes=None, check_written=True):
    """Run ``ks`` on the host as ``target`` would; returns the outputs (mx arrays).

    ``grid`` / ``threadgroup`` default to :func:`.launch.launch_config`'s
    (1-D only). Raises :class:`OutOfBoundsWrite` if the kernel wrote outside
    an output, :class:`UnwrittenOutput` (when ``check_written``) if it left an
    output element unwritten, :class:`HostCompileError` if it does not build.
    """
    from .launch import launch_config

    output_shapes = [tuple(s) for s in output_shapes]
    if output_dtypes is None:
        output_dtypes = [mx.float32] * len(output_shapes)
    if grid is None or threadgroup is None:
        _, g, t = launch_config(output_shapes)
        grid, threadgroup = grid or g, threadgroup or t
    if tuple(grid[1:]) != (1, 1) or tuple(threadgroup[1:]) != (1, 1):
        raise NotImplementedError("host harness: 1-D grids and threadgroups only")
    inputs = [a if isinstance(a, mx.array) else mx.array(a) for a in inputs]
    fn = _library(translation_unit(ks, target, inputs, output_dtypes, template))

    # Guards after each buffer span 8 elements per launched thread, so that a
    # body missing its bounds check (CUDA over-launch) hits a guard, not the heap.
    gx, tx = int(grid[0]), int(threadgroup[0])
    launched = gx if target == "metal" else -(-gx // tx) * min(tx, gx)
    keep, ptrs = [], []
    for a in inputs:  # row-contiguous copies, as ensure_row_contiguous=True; NaN-ish guards
        data = memoryview(a).tobytes() if a.size else b""
        buf, cbuf = _buffer(len(data), max(GUARD_BYTES, 8 * launched * a.dtype.size), 0xFF)
        buf[GUARD_BYTES:GUARD_BYTES + len(data)] = data
        keep.append((buf, cbuf))
        ptrs.append(ctypes.addressof(cbuf) + GUARD_BYTES)
    outs = []
    for shape, dtype in zip(output_shapes, output_dtypes):
        nbytes = math.prod(shape) * dtype.size
        buf, cbuf = _buffer(nbytes, max(GUARD_BYTES, 8 * launched * dtype.size), _SENTINEL)
        keep.append((buf, cbuf))
        outs.append((buf, nbytes))
        ptrs.append(ctypes.addressof(cbuf) + GUARD_BYTES)
    args = (ctypes.c_void_p * len(ptrs))(*ptrs)
    fn(args, gx, tx)

    results = []
    for (buf, nbytes), name, shape, dtype in zip(outs, ks.output_names, output_shapes, output_dtypes):
        if buf[:GUARD_BYTES].count(_SENTINEL) != GUARD_BYTES or \
                buf[GUARD_BYTES + nbytes:].count(_SENTINEL) != len(buf) - GUARD_BYTES - nbytes:
            raise OutOfBoundsWrite(
                f"{ks.name} ({target}, grid={grid[0]}, threadgroup={threadgroup[0]}): "
                f"wrote outside output {name!r} of shape {shape}")
        data = bytes(buf[GUARD_BYTES:GUARD_BYTES + nbytes])
        arr = mx.array(memoryview(data)).view(dtype) if nbytes else mx.zeros((0,), dtype)
        if check_written and nbytes and dtype.size in _UINTS:
            words = arr.view(_UINTS[dtype.size])
            missing = int((words == int.from_bytes(bytes([_SENTINEL]) * dtype.size, "little")).sum())
            if missing:
                raise UnwrittenOutput(
                    f"{ks.name} ({target}): {missing} element(s) of output {name!r} never written")
        results.append(arr.reshape(shape))
    return results
