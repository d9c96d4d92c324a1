"""What the whole-sequence CUDA kernels are planned for: the cells that registered
kernels, the GPU's limits (queried once through the driver API) and the
environment switches the planners read.

Pure Python, no kernel code: :mod:`.tiled_plan` and :mod:`.resident` plan from
it, :mod:`.persistent` launches.
"""

import ctypes
import importlib
import os
import re
from dataclasses import dataclass

import mlx.core as mx


# --------------------------------------------------------------------------- cells


MAX_EPT = 4  # most cell elements per thread (a cell may declare fewer)


@dataclass(frozen=True)
class CellSpec:
    module: str  # the cell folder's persistent.py: constants and point functions
    num_gates: int
    num_states: int
    num_params: int
    max_ept: int  # most cell elements per thread (the cell's register budget), forward
    max_ept_backward: int = MAX_EPT  # the same, backward (register_cell: MAX_EPT_BACKWARD, else max_ept)


# Filled by the cells (``Cell(persistent=...)`` registers its module): a new
# cell brings its persistent kernels in its own folder, nothing here changes.
CELLS = {}


def register_cell(cell_name, module):
    """Make ``module`` (a cell folder's ``persistent.py``, by name) the
    whole-sequence kernels of ``cell_name``."""
    mod = importlib.import_module(module)
    max_ept = getattr(mod, "MAX_EPT", MAX_EPT)
    CELLS[cell_name] = CellSpec(module, mod.NUM_GATES, mod.NUM_STATES, mod.NUM_PARAMS, max_ept,
                                getattr(mod, "MAX_EPT_BACKWARD", max_ept))


def cell_module(cell_name):
    return importlib.import_module(CELLS[cell_name].module)


# --------------------------------------------------------------------------- device limits


@dataclass(frozen=True)
class Limits:
    """What the planner needs to know about the GPU."""

    num_sms: int
    smem_per_block: int  # opt-in maximum of dynamic shared memory per block
    smem_per_sm: int = 0  # 0: unknown (then smem_per_block + reserved is assumed)
    reserved_smem_per_block: int = 1024
    threads_per_sm: int = 2048
    regs_per_sm: int = 65536
    # compute capability major (0: unknown); tensor-core plans (mma.sync bf16 / f16 / tf32)
    # need 8 (Ampere) or later
    cc_major: int = 0

    @property
    def max_blocks(self):
        env = _env_int("MLX_FASTRNN_PERSISTENT_BLOCKS")
        return min(self.num_sms, env) if env else self.num_sms


def smem_budget(limits):
    """Largest dynamic shared memory one persistent block may take.

    Half an SM (less the per-block reservation), so that a second persistent
    grid launched concurrently (MLX's CUDA graphs run independent nodes in
    parallel, e.g. the two directions of a bidirectional layer) still fits
    beside this one and neither can wait on blocks that never start.
    ``MLX_FASTRNN_PERSISTENT_SMEM`` (bytes) overrides it, capped by the opt-in
    maximum.
    """
    env = _env_int("MLX_FASTRNN_PERSISTENT_SMEM")
    if env:
        return min(env, limits.smem_per_block)
    per_sm = limits.smem_per_sm or (limits.smem_per_block + limits.reserved_smem_per_block)
    return min(limits.smem_per_block, per_sm // 2 - limits.reserved_smem_per_block)


def _env_int(name):
    value = os.environ.get(name, "").strip()
    if not value:
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return 0


# CUdevice_attribute values (cuda.h)
_CU_ATTR = {
    "num_sms": 16,  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    "threads_per_sm": 39,  # CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR
    "smem_per_sm": 81,  # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
    "regs_per_sm": 82,  # CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR
    "smem_per_block": 97,  # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    "reserved_smem_per_block": 111,  # CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK
    "cc_major": 75,  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
}
_LIMITS_CACHE = {}


def query_cuda_limits(ordinal=0, libname="libcuda.so.1"):
    """Read the SM count and shared-memory sizes through the driver API
    (ctypes on libcuda). ``None`` if the driver or the device is not there."""
    try:
        lib = ctypes.CDLL(libname)
    except OSError:
        return None
    try:
        lib.cuInit.argtypes = [ctypes.c_uint]
        lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.cuDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
        if lib.cuInit(0) != 0:
            return None
        dev = ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(dev), int(ordinal)) != 0:
            return None
        values = {}
        for key, attr in _CU_ATTR.items():
            v = ctypes.c_int(0)
            if lib.cuDeviceGetAttribute(ctypes.byref(v), attr, dev) == 0 and v.value > 0:
                values[key] = v.value
    except (AttributeError, OSError):
        return None
    if "num_sms" not in values or "smem_per_block" not in values:
        return None
    return Limits(**values)


def _gpu_ordinal():
    match = re.search(r"gpu,\s*(\d+)", repr(mx.default_device()))
    return int(match.group(1)) if match else 0


def device_limits():
    """The current CUDA device's limits (cached), or ``None`` off CUDA.

    ``mx.device_info()`` is consulted first (a later MLX may report the SM
    count); the driver API gives the rest.
    """
    if not cuda_available():
        return None
    ordinal = _gpu_ordinal()
    if ordinal in _LIMITS_CACHE:
        return _LIMITS_CACHE[ordinal]
    limits = query_cuda_limits(ordinal)
    try:
        info = mx.device_info()
        sms = next((int(info[k]) for k in ("multiprocessor_count", "num_sms", "sm_count") if k in info), 0)
        if sms and limits is not None and sms != limits.num_sms:
            limits = None  # two sources disagree: take neither
    except Exception:  # noqa: BLE001 - device_info is best effort
        pass
    _LIMITS_CACHE[ordinal] = limits
    return limits


def cuda_available():
    try:
        return bool(mx.cuda.is_available()) and mx.default_device().type == mx.gpu
    except Exception:  # noqa: BLE001
        return False


def enabled():
    return os.environ.get("MLX_FASTRNN_PERSISTENT", "1").strip() not in ("0", "false", "off", "no")


def _env_switch(name):
    """An on/off environment switch: True (1/true/on/yes), False (0/false/off/no),
    None (unset or anything else: the default applies)."""
    value = os.environ.get(name, "").strip().lower()
    return True if value in ("1", "true", "on", "yes") else False if value in ("0", "false", "off", "no") else None


def _starting_env(name):
    """``name``'s value in the environment this process started with (Linux:
    /proc/self/environ; os.environ's changes are not there), or what os.environ says
    where that cannot be read."""
    try:
        with open("/proc/self/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return os.environ.get(name)
    key = name.encode() + b"="
    return next((e[len(key):].decode(errors="replace") for e in entries if e.startswith(key)), None)


def _graphs_on(value):
    """MLX_USE_CUDA_GRAPHS's value read as MLX reads it (C atoi, nonzero or unset: on), except
    that only an integer counts as 0 ("false" or "" are atoi's 0 too: counted as on)."""
    m = re.match(r"\s*[+-]?\d+", value) if value is not None else None
    return m is None or int(m.group()) != 0


# whether graphs were (possibly) on at this process's first question (mlx_cuda_graphs)
_GRAPHS_AT_FIRST_USE = []


def mlx_cuda_graphs():
    """Whether MLX's CUDA backend may be recording kernels into CUDA graphs
    (``MLX_USE_CUDA_GRAPHS``, MLX's own switch and default: on unless 0). MLX reads it
    once per process, at its first kernel, which may come before this is asked. So it
    counts as off only where it is an integer 0 in the environment the process started
    with, at this process's first question and now: a value set in-process (e.g.
    ``os.environ`` after MLX ran a kernel) does not turn it off. (Switched to 1 and
    back to 0 in-process around MLX's first kernel, it would: do not.)"""
    now = _graphs_on(os.environ.get("MLX_USE_CUDA_GRAPHS"))
    if not _GRAPHS_AT_FIRST_USE:
        _GRAPHS_AT_FIRST_USE.append(now or _graphs_on(_starting_env("MLX_USE_CUDA_GRAPHS")))
    return now or _GRAPHS_AT_FIRST_USE[0]


def tf32_enabled():
    """Whether MLX runs float32 matmuls in TF32 (``MLX_ENABLE_TF32``, MLX's own switch
    and default: an integer, nonzero = on, default 1; MLX reads it once per process,
    this on every call). A float32 layer's tensor-core plans use TF32 exactly then."""
    value = os.environ.get("MLX_ENABLE_TF32", "").strip()
    if not value:
        return True
    try:
        return int(value) != 0
    except ValueError:
        return True


# The tensor-core projection's operand types (``Plan.mma``): per layer dtype, the MMA
# its W_h slice and staged rows are rounded to (float32 accumulation either way).
MMA_NONE, MMA_BF16, MMA_F16, MMA_TF32 = 0, 1, 2, 3


def mma_kind(x_dtype):
    """The tensor-core operand type of a layer of ``x_dtype`` (``MMA_*``), or
    ``MMA_NONE``: bfloat16 / float16 layers use their own type; float32 layers TF32
    where :func:`tf32_enabled`, else none (full float32 stays on the FMA projection).
    ``MLX_FASTRNN_PERSISTENT_MMA=0`` turns the tensor-core plans off."""
    if _env_switch("MLX_FASTRNN_PERSISTENT_MMA") is False:
        return MMA_NONE
    if x_dtype == mx.bfloat16:
        return MMA_BF16
    if x_dtype == mx.float16:
        return MMA_F16
    return MMA_TF32 if tf32_enabled() else MMA_NONE
