"""MLX's ``mx.fast.cuda_kernel`` as both whole-sequence kernel classes use it: a
kernel's description (:class:`KernelSpec`), an exact replica of the translation
unit MLX builds around a body (:func:`generate_source`: the CPU emulator and the
NVRTC compile check in the tests compile it), and the kernel cache and launch.
"""

import functools
import hashlib
from dataclasses import dataclass

import mlx.core as mx

MLX_DEFAULT_HEADER = (
    '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
    "#define inf cuda::std::numeric_limits<float>::infinity()\n\n"
)
_CUDA_TYPES = {
    mx.float32: "float",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.int32: "int32_t",
    mx.uint32: "uint32_t",
}
_TYPE_STRINGS = {
    mx.float32: "float32",
    mx.float16: "float16",
    mx.bfloat16: "bfloat16",
    mx.int32: "int32",
    mx.uint32: "uint32",
}


@dataclass(frozen=True)
class KernelSpec:
    """Everything ``mx.fast.cuda_kernel`` gets for one whole-sequence kernel."""

    name: str
    input_names: tuple
    output_names: tuple
    header: str
    body: str
    template: tuple  # ((name, int | bool | mx.Dtype), ...)
    shared_memory: int
    grid: tuple
    threadgroup: tuple
    # Whether the kernel needs its outputs zeroed before it starts (MLX's init_value:
    # one fill per output, each a graph node of its own); False where it writes every
    # element itself (the CPU emulator then fills them with NaN bytes instead).
    zero_outputs: bool = True


@functools.lru_cache(maxsize=64)
def source_digest(header, body):
    # Hashing the ~17 KB source took most of kernel_spec's ~15 us per call.
    return hashlib.sha1((header + body).encode()).hexdigest()[:12]


def template_hash(template):
    """MLX's suffix of the kernel name (``template_arguments_hash``)."""
    out = ""
    for _, v in template:
        if isinstance(v, bool):
            out += "_t" if v else "_f"
        elif isinstance(v, int):
            out += f"_{v}"
        else:
            out += "_" + _TYPE_STRINGS[v]
    return out


def template_constants(template, type_name):
    """The lines MLX opens a kernel body with for its template arguments
    (``type_name``: a dtype's C++ name), as ``build_kernel`` writes them."""
    if not template:
        return ""
    src = ""
    for name, v in template:
        if isinstance(v, bool):
            src += f"  constexpr bool {name} = {'true' if v else 'false'};\n"
        elif isinstance(v, int):
            src += f"  constexpr int {name} = {v};\n"
        else:
            src += f"  using {name} = {type_name(v)};\n"
    return src + "\n"


def generate_source(spec, input_dtypes, input_ndims, output_dtypes, default_header=MLX_DEFAULT_HEADER):
    """The full translation unit MLX (``build_kernel`` in
    ``mlx/backend/cuda/custom_kernel.cpp``, 0.32) compiles for ``spec``.

    Returns ``(function name, source)``. An input ``n`` gets a
    ``const __grid_constant__ Shape n_shape`` parameter (likewise ``_strides``,
    ``_ndim``) when the body mentions that name.
    """
    fname = "custom_kernel_" + spec.name + template_hash(spec.template)
    src = default_header + spec.header
    src += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    src += "__global__ void " + fname + "(\n"
    for name, dt, nd in zip(spec.input_names, input_dtypes, input_ndims):
        src += f"    const {_CUDA_TYPES[dt]}* {name},\n"
        if nd > 0:
            if name + "_shape" in spec.body:
                src += f"    const __grid_constant__ Shape {name}_shape,\n"
            if name + "_strides" in spec.body:
                src += f"    const __grid_constant__ Strides {name}_strides,\n"
            if name + "_ndim" in spec.body:
                src += f"    const __grid_constant__ int {name}_ndim,\n"
    for i, (name, dt) in enumerate(zip(spec.output_names, output_dtypes)):
        src += f"    {_CUDA_TYPES[dt]}* {name}"
        src += ",\n" if i < len(spec.output_names) - 1 else ") {\n"
    src += template_constants(spec.template, _CUDA_TYPES.__getitem__)
    src += spec.body
    src += "\n}\n\n} // namespace mlx::core::cu\n"
    return fname, src


_KERNELS = {}


def compiled_kernel(spec):
    """The ``mx.fast.cuda_kernel`` object for ``spec`` (one per name and shared memory size)."""
    key = (spec.name, spec.shared_memory)
    kern = _KERNELS.get(key)
    if kern is None:
        kern = _KERNELS[key] = mx.fast.cuda_kernel(
            name=spec.name,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            source=spec.body,
            header=spec.header,
            ensure_row_contiguous=True,
            shared_memory=spec.shared_memory,
        )
    return kern


def launch(spec, inputs, output_shapes, output_dtypes):
    """Run ``spec`` on ``inputs``; every output starts zeroed when ``spec.zero_outputs``
    (that also zeroes the tiled class's barrier counters)."""
    kern = compiled_kernel(spec)
    return kern(
        inputs=list(inputs),
        template=list(spec.template),
        grid=spec.grid,
        threadgroup=spec.threadgroup,
        output_shapes=list(output_shapes),
        output_dtypes=list(output_dtypes),
        **({"init_value": 0} if spec.zero_outputs else {}),
    )
