"""CPU tools for the persistent CUDA kernels: an emulator and an NVRTC compile check.

``emulate(spec, inputs, outputs)`` runs the EXACT kernel source MLX would
compile (``persistent.generate_source``) on the host: MLX's default header is
replaced by a small fake-CUDA prelude (``threadIdx``/``blockIdx`` thread-locals,
``__syncthreads`` = a per-block ``std::barrier``, ``__shfl_xor_sync`` through a
per-warp exchange buffer, ``atomicAdd``/``__threadfence`` = C++ atomics,
bfloat16/half as bit patterns), every CUDA thread of every block is an OS
thread (so the grid barrier really synchronises co-running blocks), and the
header's ``#else`` branch supplies dynamic shared memory, the acquire load and
the timer. It is compiled with g++ and run in a subprocess with a timeout (a
hang is a failure, not a stuck test run). Shared memory starts as NaN bytes, so
a read before a write shows up in the results.

``nvrtc_compile(source)`` compiles a generated source with NVRTC (the
``nvidia-cuda-nvrtc`` wheel's libnvrtc) the way MLX's ``JitModule`` does:
in-memory MLX device headers, ``--include-path`` of MLX's CCCL and of the CUDA
toolkit, ``--gpu-architecture=sm_90``; with ``--ptxas-options=--verbose`` the
log reports registers and spills. ``extract_mlx_jit_headers`` pulls the device
headers out of a ``libmlx.so`` (they are embedded there as strings).
"""

import array
import ctypes
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile

import mlx.core as mx

from mlx_fastrnn.kernels import cuda_source as S
from mlx_fastrnn.kernels import persistent as P

PRELUDE = r"""
// ---- fake CUDA for the host emulator ----
#include <array>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __location__(where)
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
// CUDA's integer min / max (device functions in the global namespace)
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

struct frnn_dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local frnn_dim3 threadIdx, blockIdx;
frnn_dim3 blockDim, gridDim;

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 v) {
  uint32_t u = uint32_t(v.bits) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u; std::memcpy(&u, &f, 4); u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}
inline float __half2float(__half v) { _Float16 h; std::memcpy(&h, &v.bits, 2); return (float)h; }
inline __half __float2half(float f) { _Float16 h = (_Float16)f; __half v; std::memcpy(&v.bits, &h, 2); return v; }

namespace frnn_emu {
struct Block {
  std::barrier<>* bar = nullptr;
  std::vector<std::barrier<>*> warp_bars;
  float* shfl = nullptr;
  unsigned* frag = nullptr;  // mma_tile's exchange: 6 words a lane
  unsigned char* smem = nullptr;
};
inline thread_local Block* cur = nullptr;
inline std::atomic<int> failed{0};
inline unsigned char* smem() { return cur->smem; }
inline unsigned long long now_ns() {
  return (unsigned long long)std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::steady_clock::now().time_since_epoch()).count() + 1ull;
}
inline void fail() { failed = 1; }
inline void spin_pause() { std::this_thread::yield(); }
// The kernel's global buffers (exact sizes), registered by main before launch.
inline std::vector<std::pair<const unsigned char*, size_t>> globals;
inline void add_global(const void* p, size_t bytes) { globals.emplace_back((const unsigned char*)p, bytes); }
// A cp.async source must be a valid address even when it copies no bytes (the
// H100 faulted on one past the end of a buffer with src-size 0): the whole
// 16-byte source range must lie in one buffer, or the run aborts.
inline void check_cp_async_source(const void* p) {
  const unsigned char* a = (const unsigned char*)p;
  for (const auto& g : globals) {
    if (a >= g.first && a + 16 <= g.first + g.second) return;
  }
  std::fprintf(stderr, "cp.async source out of bounds: %p (block %u thread %u)\n", p, blockIdx.x, threadIdx.x);
  std::abort();
}
} // namespace frnn_emu

// Tensor-core emulation: the fragments of mma.sync .row.col as PTX lays them out
// (lane = 4 g + t; A[16][K], B[K][8], C[16][8]), exchanged through the warp's buffer.
namespace frnn_emu {
inline unsigned pack_bf16x2(float lo, float hi) {
  return unsigned(__float2bfloat16(lo).bits) | (unsigned(__float2bfloat16(hi).bits) << 16);
}
inline unsigned pack_f16x2(float lo, float hi) {
  return unsigned(__float2half(lo).bits) | (unsigned(__float2half(hi).bits) << 16);
}
inline unsigned tf32_bits(float f) {  // cvt.rna.tf32.f32: to nearest, ties away, 10 mantissa bits
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  return u;
}
inline float half_of(unsigned word, int hi, int kind) {
  const uint16_t h = hi ? uint16_t(word >> 16) : uint16_t(word & 0xffffu);
  if (kind == 1) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }
  _Float16 x; std::memcpy(&x, &h, 2); return (float)x;
}
inline float tf32_of(unsigned word) {  // the tensor core reads 19 bits: the low 13 ignored
  const uint32_t u = word & 0xffffe000u; float f; std::memcpy(&f, &u, 4); return f;
}
inline void mma_tile(float* c, const unsigned* a, const unsigned* b, int kind) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  unsigned* buf = cur->frag + w * 32 * 6;
  for (int i = 0; i < 4; ++i) buf[l * 6 + i] = a[i];
  buf[l * 6 + 4] = b[0];
  buf[l * 6 + 5] = b[1];
  cur->warp_bars[w]->arrive_and_wait();
  float A[16][16] = {}, B[16][8] = {};
  const int K = kind == 3 ? 8 : 16;
  for (int L = 0; L < 32; ++L) {
    const int g = L >> 2, t = L & 3;
    const unsigned* f = buf + L * 6;
    if (kind == 3) {
      A[g][t] = tf32_of(f[0]); A[g + 8][t] = tf32_of(f[1]);
      A[g][t + 4] = tf32_of(f[2]); A[g + 8][t + 4] = tf32_of(f[3]);
      B[t][g] = tf32_of(f[4]); B[t + 4][g] = tf32_of(f[5]);
    } else {
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = half_of(f[0], h, kind); A[g + 8][2 * t + h] = half_of(f[1], h, kind);
        A[g][2 * t + 8 + h] = half_of(f[2], h, kind); A[g + 8][2 * t + 8 + h] = half_of(f[3], h, kind);
        B[2 * t + h][g] = half_of(f[4], h, kind); B[2 * t + 8 + h][g] = half_of(f[5], h, kind);
      }
    }
  }
  cur->warp_bars[w]->arrive_and_wait();
  const int g = l >> 2, t = l & 3;
  for (int q = 0; q < 4; ++q) {
    const int row = g + (q >> 1) * 8, col = 2 * t + (q & 1);
    float s = 0.0f;
    for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
    c[q] += s;
  }
}
} // namespace frnn_emu

inline void __syncthreads() { frnn_emu::cur->bar->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  float* buf = frnn_emu::cur->shfl + w * 32;
  buf[l] = v;
  frnn_emu::cur->warp_bars[w]->arrive_and_wait();
  const float r = buf[l ^ m];
  frnn_emu::cur->warp_bars[w]->arrive_and_wait();
  return r;
}
namespace cooperative_groups {}
namespace mlx::core::cu {
using Shape = std::array<int32_t, 10>;
using Strides = std::array<int64_t, 10>;
}
#define FRNN_TIMEOUT_NS 20000000000ULL
"""

_ITEMSIZE = {mx.float32: 4, mx.uint32: 4, mx.int32: 4}
_ARRAY_CODE = {mx.float32: "f", mx.uint32: "I", mx.int32: "i"}
_CTYPE = S._CUDA_TYPES


def _raw(a):
    """An mx array as raw bytes of its dtype (halves as uint16 bit patterns)."""
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    a = mx.contiguous(a)
    mx.eval(a)
    return bytes(memoryview(a))


def _read(path, shape, dtype):
    buf = array.array(_ARRAY_CODE[dtype])
    with open(path, "rb") as f:
        buf.frombytes(f.read())
    return mx.array(buf, dtype=dtype).reshape(shape)


def _main(fname, spec, inputs, out_specs):
    lines = ["int main(int argc, char** argv) {", "  const std::string dir = argv[1];",
             "  auto rd = [&](const std::string& n, size_t bytes) {",
             "    std::vector<unsigned char> v(bytes + 16);",
             "    std::ifstream f(dir + '/' + n, std::ios::binary); f.read((char*)v.data(), bytes);",
             "    return v; };"]
    args = []
    for i, (name, a) in enumerate(zip(spec.input_names, inputs)):
        nbytes = a.size * a.itemsize
        lines.append(f'  auto in{i} = rd("in{i}.bin", {nbytes});')
        lines.append(f"  frnn_emu::add_global(in{i}.data(), {nbytes});")
        args.append(f"(const {_CTYPE[a.dtype]}*)in{i}.data()")
        if a.ndim > 0 and name + "_shape" in spec.body:
            dims = ", ".join(str(d) for d in a.shape)
            lines.append(f"  mlx::core::cu::Shape {name}_shape{{}}; {{ int32_t d[] = {{{dims}}}; "
                         f"for (int k = 0; k < {a.ndim}; ++k) {name}_shape[k] = d[k]; }}")
            args.append(f"{name}_shape")
    for i, (shape, dt) in enumerate(out_specs):
        nbytes = math.prod(shape) * _ITEMSIZE[dt]
        fill = 0 if spec.zero_outputs else 0xFF  # NaN bytes: an element the kernel never writes shows
        lines.append(f"  std::vector<unsigned char> out{i}({nbytes} + 16, {fill});")
        lines.append(f"  frnn_emu::add_global(out{i}.data(), {nbytes});")
        args.append(f"({_CTYPE[dt]}*)out{i}.data()")
    nblocks = spec.grid[0] // spec.threadgroup[0]
    tpb = spec.threadgroup[0]
    lines += [
        f"  const int nblocks = {nblocks}, tpb = {tpb}, nwarps = {tpb // 32};",
        "  gridDim = {(unsigned)nblocks, 1, 1}; blockDim = {(unsigned)tpb, 1, 1};",
        "  std::vector<frnn_emu::Block> blocks(nblocks);",
        "  std::vector<std::vector<unsigned char>> smems(nblocks);",
        "  std::vector<std::vector<float>> shfls(nblocks);",
        "  std::vector<std::vector<unsigned>> frags(nblocks);",
        "  for (int b = 0; b < nblocks; ++b) {",
        f"    smems[b].assign({spec.shared_memory} + 64, 0xFF);  // NaN bytes",
        "    shfls[b].assign(nwarps * 32, 0.0f);",
        "    frags[b].assign(nwarps * 32 * 6, 0u);",
        "    blocks[b].bar = new std::barrier<>(tpb);",
        "    for (int w = 0; w < nwarps; ++w) blocks[b].warp_bars.push_back(new std::barrier<>(32));",
        "    blocks[b].shfl = shfls[b].data();",
        "    blocks[b].frag = frags[b].data();",
        "    blocks[b].smem = smems[b].data();",
        "  }",
        "  std::vector<std::thread> threads;",
        "  for (int b = 0; b < nblocks; ++b) for (int t = 0; t < tpb; ++t) {",
        "    threads.emplace_back([&, b, t]() {",
        "      threadIdx = {(unsigned)t, 0, 0}; blockIdx = {(unsigned)b, 0, 0};",
        "      frnn_emu::cur = &blocks[b];",
        f"      mlx::core::cu::{fname}({', '.join(args)});",
        "    });",
        "  }",
        "  for (auto& th : threads) th.join();",
    ]
    for i, (shape, dt) in enumerate(out_specs):
        nbytes = math.prod(shape) * _ITEMSIZE[dt]
        lines.append(f'  {{ std::ofstream f(dir + "/out{i}.bin", std::ios::binary); '
                     f"f.write((const char*)out{i}.data(), {nbytes}); }}")
    lines += ["  return frnn_emu::failed.load() ? 3 : 0;", "}"]
    return "\n".join(lines) + "\n"


_COMPILER = []


def host_compiler():
    """A C++20 compiler with <barrier> and -pthread, or None (cached probe)."""
    if not _COMPILER:
        found = None
        for cand in (shutil.which("g++"), shutil.which("c++"), shutil.which("clang++")):
            if not cand:
                continue
            with tempfile.TemporaryDirectory() as d:
                src = os.path.join(d, "probe.cpp")
                with open(src, "w") as f:
                    f.write("#include <barrier>\n#include <thread>\nint main() { std::barrier<> b(1); "
                            "b.arrive_and_wait(); _Float16 h = 1; return (int)(float)h - 1; }\n")
                try:
                    res = subprocess.run([cand, "-std=c++20", "-pthread", "-o", os.path.join(d, "p"), src],
                                         capture_output=True, timeout=120)
                except (OSError, subprocess.TimeoutExpired):
                    continue
                if res.returncode == 0:
                    found = cand
                    break
        _COMPILER.append(found)
    return _COMPILER[0]


# MLX_FASTRNN_EMU_SANITIZE=1: build the emulated kernels with AddressSanitizer
# and UBSan, so an out-of-bounds global or shared access fails the run.
SANITIZE = (["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
            if os.environ.get("MLX_FASTRNN_EMU_SANITIZE") == "1" else [])
_BUILD_DIR = os.path.join(tempfile.gettempdir(), "mlx_fastrnn_emulator" + ("_asan" if SANITIZE else ""))


def build(spec, inputs, out_specs):
    """Compile the emulator for ``spec`` (cached by source); returns the binary path."""
    in_dtypes = [a.dtype for a in inputs]
    fname, src = S.generate_source(spec, in_dtypes, [a.ndim for a in inputs],
                                   [dt for _, dt in out_specs], default_header=PRELUDE)
    src += _main(fname, spec, inputs, out_specs)
    digest = hashlib.sha1(src.encode()).hexdigest()[:16]
    os.makedirs(_BUILD_DIR, exist_ok=True)
    exe = os.path.join(_BUILD_DIR, f"emu_{digest}")
    if not os.path.exists(exe):
        # per-process names: test runs sharing the build directory (two checkouts, sharded
        # runs) may build the same kernel at once; os.replace publishes one whole binary
        tmp = f"{exe}.{os.getpid()}"
        cpp = tmp + ".cpp"
        with open(cpp, "w") as f:
            f.write(src)
        cmd = [host_compiler(), "-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unknown-pragmas",
               "-Wno-unused-variable", "-Wno-unused-but-set-variable", *SANITIZE, "-o", tmp + ".tmp", cpp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"emulator compile failed ({cpp}):\n{res.stderr[-6000:]}")
        if res.stderr.strip():
            # Warnings in the kernel source are worth seeing.
            warn = os.path.join(_BUILD_DIR, f"emu_{digest}.warnings")
            with open(warn, "w") as f:
                f.write(res.stderr)
        os.replace(tmp + ".tmp", exe)
    return exe


def emulate(spec, inputs, out_specs, timeout=300):
    """Run ``spec`` on the host; returns the outputs as mx arrays (float32/uint32)."""
    inputs = [mx.contiguous(a) for a in inputs]
    mx.eval(inputs)
    exe = build(spec, inputs, out_specs)
    with tempfile.TemporaryDirectory() as d:
        for i, a in enumerate(inputs):
            with open(os.path.join(d, f"in{i}.bin"), "wb") as f:
                f.write(_raw(a))
        env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0"} if SANITIZE else None
        res = subprocess.run([exe, d], capture_output=True, text=True, timeout=timeout, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"emulated kernel failed (rc={res.returncode}): {res.stderr[-2000:]}")
        outs = []
        for i, (shape, dt) in enumerate(out_specs):
            outs.append(_read(os.path.join(d, f"out{i}.bin"), shape, dt))
    return outs


# --------------------------------------------------------------------------- the entry points, emulated


def forward(cell, xp, w_h, states0, params, h0_is_zero, limits, tpb=64, weights="auto", plan=None,
            lens=None, rev=0, interleaved=False):
    """``persistent_sequence`` with the launch replaced by the emulator (``plan``:
    use this plan instead of the selected one)."""
    p = plan or P.select("forward", cell, xp, w_h, limits, tpb, weights)
    if p is None:
        return None, None
    spec, inputs, shapes, dtypes = P.forward_launch(p, xp, w_h, states0, params, h0_is_zero, lens, rev,
                                                    interleaved=interleaved)
    res = emulate(spec, list(inputs), list(zip(shapes, dtypes)))
    return tuple(res[:-1]), (p, res[-1])


def backward(cell, d_outs, xp, hp, prevs, params, w_h, need_d_state0, limits, tpb=64, weights="auto",
             plan=None, lens=None, rev=0, d_out=None, interleaved=False, zero_states=0):
    """``persistent_backward`` with the launch replaced by the emulator (``plan``:
    use this plan instead of the selected one)."""
    p = plan or P.select("backward", cell, xp, w_h, limits, tpb, weights)
    if p is None:
        return None, None
    spec, inputs, shapes, dtypes = P.backward_launch(p, d_outs, xp, hp, prevs, params, w_h, need_d_state0,
                                                     lens, rev, d_out, interleaved=interleaved,
                                                     zero_states=zero_states)
    res = emulate(spec, list(inputs), list(zip(shapes, dtypes)))
    varlen = P.is_varlen(lens, rev, interleaved)
    return P.backward_results(cell, res, need_d_state0, varlen), (p, res[-1])


# --------------------------------------------------------------------------- NVRTC


_HEADER_MARKERS = {
    # name: (a line it contains, a line it must not contain)
    "utils.cuh": ("// This file must not include any host-only code", None),
    "config.h": ("// This file is used by both CUDA kernel code and host-only", None),
    "complex.cuh": ("#include <cuda/std/complex>", "#include \"mlx/"),
}


def extract_mlx_jit_headers(libmlx, out_dir):
    """Write MLX's embedded device headers (those ``utils.cuh`` needs) under
    ``out_dir/mlx/backend/cuda/device/``; returns the dict name -> text."""
    data = open(libmlx, "rb").read()
    found = {}
    for name, (marker, exclude) in _HEADER_MARKERS.items():
        pos = 0
        while True:
            i = data.find(marker.encode(), pos)
            if i < 0:
                break
            s = data.rfind(b"\0", 0, i) + 1
            e = data.find(b"\0", i)
            text = data[s:e].decode("utf-8", "replace")
            pos = e
            if "Apple Inc" in text[:80] and (exclude is None or exclude not in text):
                found[name] = text
                break
    d = os.path.join(out_dir, "mlx", "backend", "cuda", "device")
    os.makedirs(d, exist_ok=True)
    for name, text in found.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return found


def nvrtc_paths():
    """(libnvrtc, headers dir, cccl dir, cuda home) from the environment, or None."""
    lib = os.environ.get("MLX_FASTRNN_NVRTC", "")
    hdr = os.environ.get("MLX_FASTRNN_JIT_HEADERS", "")
    cccl = os.environ.get("MLX_FASTRNN_CCCL", "")
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if not (lib and os.path.exists(lib) and hdr and os.path.isdir(hdr) and os.path.isdir(home)):
        return None
    return lib, hdr, cccl, home


def nvrtc_compile(source, arch="sm_90", verbose_ptxas=True, name="frnn.cu", want_ptx=False):
    """Compile ``source`` like MLX's JitModule; returns (ok, log), with ``want_ptx`` (ok,
    log, PTX text) (``arch`` then a virtual one, e.g. compute_90)."""
    paths = nvrtc_paths()
    if paths is None:
        raise RuntimeError("NVRTC not configured (MLX_FASTRNN_NVRTC, MLX_FASTRNN_JIT_HEADERS)")
    lib_path, hdr_dir, cccl, home = paths
    lib = ctypes.CDLL(lib_path)
    names, texts = [], []
    base = os.path.join(hdr_dir, "mlx", "backend", "cuda", "device")
    for fn in sorted(os.listdir(base)):
        names.append(f"mlx/backend/cuda/device/{fn}".encode())
        with open(os.path.join(base, fn), "rb") as f:
            texts.append(f.read())
    n = len(names)
    prog = ctypes.c_void_p()
    arr_t = ctypes.c_char_p * n
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), n,
                                arr_t(*texts), arr_t(*names))
    if rc != 0:
        return False, f"nvrtcCreateProgram failed: {rc}"
    opts = [f"--gpu-architecture={arch}"]
    if cccl:
        opts.append(f"--include-path={cccl}")
    opts.append(f"--include-path={home}/include")
    if verbose_ptxas:
        opts.append("--ptxas-options=--verbose")
    opt_arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), opt_arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value + 1)
    lib.nvrtcGetProgramLog(prog, buf)
    ptx = ""
    if want_ptx and rc == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        code = ctypes.create_string_buffer(size.value + 1)
        lib.nvrtcGetPTX(prog, code)
        ptx = code.value.decode("utf-8", "replace")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if want_ptx:
        return rc == 0, buf.value.decode("utf-8", "replace"), ptx
    return rc == 0, buf.value.decode("utf-8", "replace")


def ptxas_info(log):
    """(registers, spill stores, spill loads, stack bytes) from a verbose ptxas log."""
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return (int(regs[-1]) if regs else None,
            int(spills[-1][0]) if spills else None,
            int(spills[-1][1]) if spills else None,
            int(stack[-1]) if stack else None)


def compile_spec(spec, x_dtype, w_dtype, ptx=False):
    """NVRTC + ptxas of a kernel spec of either class, with its inputs' dtypes and
    ranks as the launch gives them (``w_dtype``: the plan's ``w_dtype``). Returns (ok, log,
    (registers, spill stores, spill loads, stack bytes)); with ``ptx``, the PTX for
    compute_90 instead (ok, log, PTX)."""
    def dtype(n):
        if n == "x":
            return x_dtype
        if n == "lens":
            return mx.int32
        return w_dtype if n == "w" else mx.float32

    def rank(n):
        if n == "lens" or n.startswith("prm"):
            return 1
        return 2 if n == "w" or n.startswith("init") else 3

    odts = [mx.uint32 if n == "sync" else mx.float32 for n in spec.output_names]
    _, src = S.generate_source(spec, [dtype(n) for n in spec.input_names], [rank(n) for n in spec.input_names],
                               odts)
    if ptx:
        return nvrtc_compile(src, arch="compute_90", verbose_ptxas=False, want_ptx=True)
    ok, log = nvrtc_compile(src)
    return ok, log, ptxas_info(log)


# --------------------------------------------------------------------------- the resident class, emulated


def resident_forward(cell, xp, w_h, states0, params, h0_is_zero, limits, plan=None, lens=None, rev=0,
                     interleaved=False):
    """``resident.run_forward`` with the launch replaced by the emulator."""
    from mlx_fastrnn.kernels import resident as R

    p = plan or R.select("forward", cell, xp, w_h, limits)
    if p is None:
        return None, None
    spec, inputs, shapes, dtypes = R.forward_launch(p, xp, w_h, states0, params, h0_is_zero, lens, rev,
                                                    interleaved)
    res = emulate(spec, list(inputs), list(zip(shapes, dtypes)))
    return tuple(res[:-1]), p


def resident_backward(cell, d_outs, xp, hp, prevs, params, w_h, need_d_state0, limits, plan=None,
                      lens=None, rev=0, d_out=None, interleaved=False, zero_states=0):
    """``resident.run_backward`` with the launch replaced by the emulator."""
    from mlx_fastrnn.kernels import resident as R

    p = plan or R.select("backward", cell, xp, w_h, limits)
    if p is None:
        return None, None
    spec, inputs, shapes, dtypes = R.backward_launch(p, d_outs, xp, hp, prevs, params, w_h, need_d_state0,
                                                     lens, rev, d_out, interleaved, zero_states)
    res = emulate(spec, list(inputs), list(zip(shapes, dtypes)))
    return P.backward_results(cell, res, need_d_state0, P.is_varlen(lens, rev, interleaved)), p
