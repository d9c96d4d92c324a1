"""Shared device code of the persistent (whole-sequence) recurrence kernels.

``HEADER`` goes into ``mx.fast.cuda_kernel(header=...)``: MLX places it after its
own default header (``mlx/backend/cuda/device/utils.cuh`` and
``cooperative_groups.h``, which bring ``cuda_bf16.h`` / ``cuda_fp16.h``) and
before the generated ``__global__`` function, at global scope. Everything here
is in ``namespace frnn`` and marked ``__device__`` (NVRTC compiles without
``-default-device``).

The only CUDA-specific primitives (dynamic shared memory, the L2-only load, the
acquire load, the global timer, trap) sit behind ``#if defined(__CUDACC__)``;
the ``#else`` branch is what the CPU emulator in the tests provides, so the rest
of this header and every cell body run unchanged on the host under test.

Layout of the dynamic shared memory of one block (``carve``), in this order:
  hs   float [BBP][HLD]       the block's rows of the projected operand (one K-chunk, KCH
                              of each row's HLD: HLD = KCH, padded for a tensor-core plan;
                              PIPE: two such buffers; HR: 16-bit values, pairs packed in
                              words, half the bytes: unsigned [BBP][HLD / 2])
  part float [KS][BBP][N]     per-K-split partial sums of the projection
  Ws   WT    [NR][WLD]        the block's slice of W_h (rows, or transposed columns; NR = N,
                              WLD = K, a tensor-core plan pads both with zeros);
                              a streamed W_h (WG): float [N][KCH], the rows' current K-chunk
                              (a tensor-core plan: WT [NR][WLD], the chunk padded as a slice;
                              PIPE: two such buffers)
Python's ``smem_bytes`` computes the same total. The projection runs on CUDA cores
(``matvec_chunk``, float32 FMA) or on tensor cores (``mma_chunk``, MMA > 0): that code is
:mod:`.projection_header`'s, spliced in after the primitives and staging here.

Switches, defined before this header (none by default), each undoing one
choice of the default kernel: ``FRNN_BARRIER_FENCE`` (the older fence +
atomicAdd barrier), ``FRNN_MATVEC_SCALAR`` (one k per lane and load instead of
four), ``FRNN_STAGE_LDCG`` (staging through registers with ``ld.global.cg``
instead of cp.async), ``FRNN_REDUCE_PER_VALUE`` (one 5-shuffle warp sum per
projection sum instead of the halving butterfly), all four reachable through
``MLX_FASTRNN_PERSISTENT_SWITCHES``; and, for ``benchmarks/persistent_tune.py``
only, ``FRNN_DIAG_NO_BARRIER``, ``FRNN_DIAG_NO_MATVEC``, ``FRNN_DIAG_NO_STAGE``,
which leave a part of each step out (wrong results, by design) to time it.
"""

from .projection_header import PROJECTION


HEADER = r"""
// ---------------------------------------------------------------- mlx_fastrnn
// persistent recurrence kernels: shared device code
#ifndef FRNN_PERSISTENT_HEADER
#define FRNN_PERSISTENT_HEADER

#ifndef FRNN_TIMEOUT_NS
// A grid barrier that waits longer than this traps (a loud CUDA error instead
// of a hang): the blocks of a grid were not all co-resident.
#define FRNN_TIMEOUT_NS 10000000000ULL
#endif
// Barrier counters of different batch groups sit 128 bytes apart.
#define FRNN_SYNC_STRIDE 32

namespace frnn {

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename WT> __device__ __forceinline__ WT zero();
template <> __device__ __forceinline__ float zero<float>() { return 0.0f; }
template <> __device__ __forceinline__ __nv_bfloat16 zero<__nv_bfloat16>() { return __float2bfloat16(0.0f); }
template <> __device__ __forceinline__ __half zero<__half>() { return __float2half(0.0f); }

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
__device__ __forceinline__ unsigned char* dyn_smem() {
  extern __shared__ float4 frnn_dynamic_smem[];
  return reinterpret_cast<unsigned char*>(frnn_dynamic_smem);
}
// Data written by other blocks during this kernel: read through L2 only.
__device__ __forceinline__ float ldcg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ float4 ldcg4(const float* p) { return __ldcg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// Release-add at GPU scope (cumulative: after __syncthreads it publishes the
// whole block's writes), as CUTLASS's GenericBarrier does.
__device__ __forceinline__ void red_release(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" : : "l"(p), "r"(v) : "memory");
}
#if !defined(FRNN_STAGE_LDCG) && __CUDA_ARCH__ >= 800
#define FRNN_CP_ASYNC 1
// 16-byte global -> shared copy through L2 only, without a register round
// trip: the first src_bytes (0..16) come from src, the rest is zero-filled.
// All of a thread's copies are in flight together until cp_async_wait_all.
__device__ __forceinline__ void cp_async16(void* dst, const float* src, int src_bytes) {
  unsigned s;
  asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" : : "r"(s), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" : : : "memory"); }
// Groups (a pipelined projection, PIPE): the copies issued since the last commit form a
// group; wait_group<N> returns once at most N groups are still in flight.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" : : : "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;" : : "n"(N) : "memory"); }
#else
__device__ __forceinline__ void cp_async_commit() {}  // the register staging paths copy at once
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {}
#endif
__device__ __forceinline__ void fail() { __trap(); }
__device__ __forceinline__ void spin_pause() {}
// Tensor-core primitives of the tiled class's MMA plans (template MMA: 1 bfloat16,
// 2 float16 m16n8k16, 3 tf32 m16n8k8, float32 accumulators). The fragment layouts
// are PTX's for mma.sync .row.col (checked on the H200 by a one-warp probe); the
// emulator's mma_tile implements the same layouts.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ unsigned pack_f16x2(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ unsigned tf32_bits(float x) {
  unsigned u;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
  return u;
}
__device__ __forceinline__ float tf32_round(float x) { return __uint_as_float(tf32_bits(x)); }
__device__ __forceinline__ unsigned float_bits(float x) { return __float_as_uint(x); }
template <int MMA>
__device__ __forceinline__ void mma_tile(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  if (MMA == 3) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if (MMA == 2) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
#else
// CPU emulation (tests/persistent_emulator.py provides frnn_emu).
__device__ __forceinline__ unsigned char* dyn_smem() { return frnn_emu::smem(); }
__device__ __forceinline__ float ldcg(const float* p) {
  float v;
  __atomic_load(p, &v, __ATOMIC_RELAXED);
  return v;
}
__device__ __forceinline__ float4 ldcg4(const float* p) {
  float4 v;
  v.x = ldcg(p);
  v.y = ldcg(p + 1);
  v.z = ldcg(p + 2);
  v.w = ldcg(p + 3);
  return v;
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
#if !defined(FRNN_STAGE_LDCG)
#define FRNN_CP_ASYNC 1
#endif
__device__ __forceinline__ void cp_async16(void* dst, const float* src, int src_bytes) {
  frnn_emu::check_cp_async_source(src);
  float* d = static_cast<float*>(dst);
  for (int i = 0; i < 4; ++i) {
    d[i] = 4 * i < src_bytes ? ldcg(src + i) : 0.0f;
  }
}
__device__ __forceinline__ void cp_async_wait_all() {}
__device__ __forceinline__ void cp_async_commit() {}  // the emulator copies at issue
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {}
__device__ __forceinline__ void red_release(unsigned* p, unsigned v) { __atomic_fetch_add(p, v, __ATOMIC_RELEASE); }
__device__ __forceinline__ unsigned long long now_ns() { return frnn_emu::now_ns(); }
__device__ __forceinline__ void fail() { frnn_emu::fail(); }
__device__ __forceinline__ void spin_pause() { frnn_emu::spin_pause(); }
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) { return frnn_emu::pack_bf16x2(lo, hi); }
__device__ __forceinline__ unsigned pack_f16x2(float lo, float hi) { return frnn_emu::pack_f16x2(lo, hi); }
__device__ __forceinline__ unsigned tf32_bits(float x) { return frnn_emu::tf32_bits(x); }
__device__ __forceinline__ unsigned float_bits(float x) {
  unsigned u;
  memcpy(&u, &x, 4);
  return u;
}
__device__ __forceinline__ float tf32_round(float x) {
  const unsigned u = tf32_bits(x);
  float f;
  memcpy(&f, &u, 4);
  return f;
}
template <int MMA>
__device__ __forceinline__ void mma_tile(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  frnn_emu::mma_tile(c, a, b, MMA);
}
#endif

// Grid-wide (batch-group-wide) barrier on a monotone counter: every block of
// the group adds 1 after each step, and step t's barrier waits for
// target = (blocks in the group) * (t + 1). No reset, no sense flip.
// Memory order (CUTLASS's GenericBarrier): __syncthreads orders the block's
// writes before thread 0's red.release.gpu (release is cumulative, so it
// publishes them all); thread 0 spins with ld.acquire.gpu, then __syncthreads
// hands the acquired view to the whole block. FRNN_BARRIER_FENCE selects the
// older __threadfence + atomicAdd + __threadfence form, kept for timing.
__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned target) {
#if defined(FRNN_DIAG_NO_BARRIER)
  __syncthreads();
  return;
#endif
  __syncthreads();
  if (threadIdx.x == 0) {
#if defined(FRNN_BARRIER_FENCE)
    __threadfence();
    atomicAdd(counter, 1u);
#else
    red_release(counter, 1u);
#endif
    unsigned spins = 0;
    unsigned long long t0 = 0;
    while (ld_acquire(counter) < target) {
      if ((++spins & 1023u) == 0u) {
        const unsigned long long t = now_ns();
        if (t0 == 0) {
          t0 = t;
        } else if (t - t0 > FRNN_TIMEOUT_NS) {
          fail();
          break;
        }
      }
      spin_pause();
    }
#if defined(FRNN_BARRIER_FENCE)
    __threadfence();
#endif
  }
  __syncthreads();
}

// The batch group's barrier: the grid barrier above, or, in a cluster plan (CLU: the
// group's NU blocks are one thread-block cluster), the hardware cluster barrier. Its
// arrive.release / wait.acquire order every thread's earlier writes (global memory too)
// before every cluster thread's later reads, at cluster scope: what the counter's
// release / acquire pair gives the grid. Only compute capability 9+ has clusters (the
// planner makes no cluster plan before); the emulator runs the grid barrier. The grid
// barrier's switches (FRNN_BARRIER_FENCE) do not apply to it.
template <bool CLU>
__device__ __forceinline__ void group_barrier(unsigned* counter, unsigned target) {
#if defined(__CUDACC__) && __CUDA_ARCH__ >= 900 && !defined(FRNN_DIAG_NO_BARRIER)
  if (CLU) {
    asm volatile("barrier.cluster.arrive.release.aligned;" : : : "memory");
    asm volatile("barrier.cluster.wait.acquire.aligned;" : : : "memory");
    return;
  }
#endif
  grid_barrier(counter, target);
}

// HLD: the row stride of hs (KCH; a tensor-core plan pads it against bank conflicts);
// PIPE: two hs buffers (a pipelined projection stages the next K-chunk into the other);
// HR: hs holds 16-bit values (HLD of them a row: stage_rows_half)
template <int BBP, int HLD, int KS, int N, bool PIPE = false, bool HR = false, typename WT>
__device__ __forceinline__ void carve(float*& hs, float*& part, WT*& Ws) {
  static_assert(!HR || HLD % 4 == 0, "16-bit staged rows: whole 8-byte pairs of words");
  unsigned char* base = dyn_smem();
  hs = reinterpret_cast<float*>(base);
  part = hs + (PIPE ? 2 : 1) * BBP * HLD / (HR ? 2 : 1);
  Ws = reinterpret_cast<WT*>(part + KS * BBP * N);
}

// A W_h slice element as stored: a TF32 plan's rounded to tf32 once here, not at every
// fragment load of every step.
template <bool TF32, typename WT>
__device__ __forceinline__ WT slice_value(WT v) { return v; }
template <>
__device__ __forceinline__ float slice_value<true, float>(float v) { return tf32_round(v); }

// Ws[(g*U + u)*WLD + k] = w[(g*H + j0 + u)*H + k]: the block's G*U rows of W_h
// (forward: hp = h W_h^T). Units past H are zero rows; a tensor-core plan pads the
// slice to NR rows of WLD (zero rows and columns), so its fragments need no bounds checks.
template <int G, int U, int H, int TPB, int WLD = H, int NR = G * U, bool TF32 = false, typename WT>
__device__ __forceinline__ void load_w_rows(WT* Ws, const WT* w, int j0) {
  for (int i = threadIdx.x; i < NR * WLD; i += TPB) {
    const int n = i / WLD;
    const int k = i - n * WLD;
    const int g = n / U;
    const int j = j0 + (n - g * U);
    Ws[i] = (n < G * U && k < H && j < H) ? slice_value<TF32>(w[(long long)(g * H + j) * H + k]) : zero<WT>();
  }
  __syncthreads();
}

// Ws[u*WLD + m] = w[m*H + j0 + u]: the block's U columns of W_h, transposed
// (backward: dh = dhp W_h). Units past H are zero rows; padding as load_w_rows.
template <int G, int U, int H, int TPB, int WLD = G * H, int NR = U, bool TF32 = false, typename WT>
__device__ __forceinline__ void load_w_cols(WT* Ws, const WT* w, int j0) {
  constexpr int GH = G * H;
  for (int i = threadIdx.x; i < NR * WLD; i += TPB) {
    const int m = i / NR;
    const int u = i - m * NR;
    const int j = j0 + u;
    Ws[u * WLD + m] = (u < U && m < GH && j < H) ? slice_value<TF32>(w[(long long)m * H + j]) : zero<WT>();
  }
  __syncthreads();
}

// Four staged values of row r from k (p: their address), zero past nrows / klen (the last
// of the four only with the whole four: K % 4 == 0 wherever the 16-byte paths run).
__device__ __forceinline__ float4 row_quad(const float* p, int r, int nrows, int k, int klen) {
  float4 v;
  if (r < nrows && k + 3 < klen) {
    v = ldcg4(p);
  } else {
    v.x = (r < nrows && k < klen) ? ldcg(p) : 0.0f;
    v.y = (r < nrows && k + 1 < klen) ? ldcg(p + 1) : 0.0f;
    v.z = (r < nrows && k + 2 < klen) ? ldcg(p + 2) : 0.0f;
    v.w = 0.0f;
  }
  return v;
}

// hs[r*HLD + k] = src[r*ld + k0 + k] for r < nrows, k < klen; 0 elsewhere (k < KCH).
// 16-byte loads when every row start is 16-byte aligned (KCH, HLD, ld, k0 and the
// pointer multiples of 4 floats), else scalar loads.
template <int BBP, int KCH, int TPB, int HLD = KCH, bool WAIT = true>
__device__ __forceinline__ void stage_rows(
    float* hs, const float* src, int ld, int nrows, int k0, int klen) {
#if defined(FRNN_DIAG_NO_STAGE)
  return;
#endif
  if ((KCH % 4) == 0 && (HLD % 4) == 0 && (ld % 4) == 0 && (k0 % 4) == 0 &&
      (reinterpret_cast<unsigned long long>(src) % 16) == 0) {
    constexpr int KQ = KCH / 4;
#if defined(FRNN_CP_ASYNC)
    // Every copy of the thread in flight at once, no register round trip (on
    // the H100 as fast as ldcg for most plans, 1.5x for the LSTM H=512 backward).
    for (int i = threadIdx.x; i < BBP * KQ; i += TPB) {
      const int r = i / KQ;
      const int k = 4 * (i - r * KQ);
      const int n = r < nrows ? imax(0, imin(4, klen - k)) : 0;
      // The source address must be valid even when nothing is copied: the
      // H100 faulted on a lane past the end of a partial last chunk whose
      // address ran past the end of the buffer (src-size 0). So lanes that copy
      // nothing point at the row's start.
      const int rc = r < nrows ? r : 0;
      const int kc = k < klen ? k : 0;
      cp_async16(hs + r * HLD + k, src + (long long)rc * ld + k0 + kc, 4 * n);
    }
    if (WAIT) {  // else the caller commits the copies as a group and waits for it
      cp_async_wait_all();
    }
#else
#pragma unroll 4
    for (int i = threadIdx.x; i < BBP * KQ; i += TPB) {
      const int r = i / KQ;
      const int k = 4 * (i - r * KQ);
      *reinterpret_cast<float4*>(hs + r * HLD + k) =
          row_quad(src + (long long)r * ld + k0 + k, r, nrows, k, klen);
    }
#endif
  } else {
#pragma unroll 4
    for (int i = threadIdx.x; i < BBP * KCH; i += TPB) {
      const int r = i / KCH;
      const int k = i - r * KCH;
      hs[r * HLD + k] = (r < nrows && k < klen) ? ldcg(src + (long long)r * ld + k0 + k) : 0.0f;
    }
  }
}

// Two values as the 16-bit type of tensor-core plan MMA (1 bfloat16, 2 float16), one
// 32-bit word (lo in the low half): what the fragment loads give the mma.
template <int MMA>
__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
  return MMA == 2 ? pack_f16x2(lo, hi) : pack_bf16x2(lo, hi);
}

// stage_rows for 16-bit staged rows (Plan.hrows, template HR): hs holds HLD / 2 words a
// row, word r*HLD/2 + k/2 the pair (k, k + 1) of row r, rounded by pack_half2 as
// mma_chunk would round them at every fragment load: the same numbers, rounded once.
// Through registers (the conversion), 16-byte loads where the rows allow.
template <int BBP, int KCH, int TPB, int HLD, int MMA>
__device__ __forceinline__ void stage_rows_half(
    unsigned* hs, const float* src, int ld, int nrows, int k0, int klen) {
#if defined(FRNN_DIAG_NO_STAGE)
  return;
#endif
  static_assert(KCH % 2 == 0 && HLD % 4 == 0, "whole pairs");
  constexpr int HW = HLD / 2;
  if ((KCH % 4) == 0 && (ld % 4) == 0 && (k0 % 4) == 0 &&
      (reinterpret_cast<unsigned long long>(src) % 16) == 0) {
    constexpr int KQ = KCH / 4;
#pragma unroll 4
    for (int i = threadIdx.x; i < BBP * KQ; i += TPB) {
      const int r = i / KQ;
      const int k = 4 * (i - r * KQ);
      const float4 v = row_quad(src + (long long)(r < nrows ? r : 0) * ld + k0 + k, r, nrows, k, klen);
      uint2 w;
      w.x = pack_half2<MMA>(v.x, v.y);
      w.y = pack_half2<MMA>(v.z, v.w);
      *reinterpret_cast<uint2*>(hs + r * HW + k / 2) = w;
    }
  } else {
    constexpr int KP = KCH / 2;
#pragma unroll 4
    for (int i = threadIdx.x; i < BBP * KP; i += TPB) {
      const int r = i / KP;
      const int k = 2 * (i - r * KP);
      const float* p = src + (long long)(r < nrows ? r : 0) * ld + k0 + k;
      const float lo = (r < nrows && k < klen) ? ldcg(p) : 0.0f;
      const float hi = (r < nrows && k + 1 < klen) ? ldcg(p + 1) : 0.0f;
      hs[r * HW + k / 2] = pack_half2<MMA>(lo, hi);
    }
  }
}

""" + PROJECTION + r"""
} // namespace frnn

#endif // FRNN_PERSISTENT_HEADER
"""

# The constants every body reads (template arguments), documented once:
#   T     dtype of x (float / __half / __nv_bfloat16)      WT   dtype of the W_h slice (float / __half / __nv_bfloat16)
#   H     hidden size                                     U    hidden units per block
#   NU    blocks per batch group (= ceil(H / U))          BB   batch rows per block (group)
#   BBP   BB rounded up to a multiple of RB               RB   rows per warp task
#   KS    K-splits of one chunk                           KCH  K-chunk staged at once
#   TPB   threads per block                               EPT  cell elements per thread (ceil(BB*U / TPB))
#   NBB   batch groups per problem                        NP   independent problems (own W_h, own rows)
#   WG    W_h streamed from global memory every step (no shared-memory slice; U divides H)
#   NCS   column splits of the projection's warp tasks (N / NCS columns, RB rows each)
#   MMA   the projection on tensor cores (0: float32 FMA; 1 bfloat16, 2 float16, 3 tf32 mma.sync)
#   WLD   row stride of the W_h slice in shared memory (K; MMA: padded against bank conflicts)
#   HLD   row stride of the staged rows hs (KCH; MMA: padded)
#   CLU   the batch group is a thread-block cluster: its barrier is the cluster barrier
#   ZS    bit q: initial state q is zero, never read (forward: bit 0 also skips step 0's
#         projection, H0Z in the bodies; backward: prev<q> is state q's own sequence): contract.py
#   NEED_D0  backward: also produce the initial states' cotangents
#   RELU  RNN: relu instead of tanh
# Block b of the grid owns units [j0, j0+U) with j0 = (b % NU) * U and batch rows
# [r0, r0+BB) with r0 = (b / NU) * BB; the barrier is per batch group (b / NU).


def block_prologue(direction, gates):
    """The opening every persistent body shares, as body text.

    It must stay in the body, not the header: MLX adds the ``x_shape`` kernel
    parameter only when the body names it. Declares L, B (all rows),
    prob / pofs (the problem: NP independent recurrences with their own W_h and
    per-unit parameters, rows problem-major), j0, r0, nrows, counter, the shared-memory carve (hs, part, Ws) with this block's W_h
    slice loaded (rows for the forward, transposed columns for the backward),
    ``Wsrc`` the rows the projection reads (``Ws``, or under ``WG`` W_h's own rows in
    global memory: forward W_h, backward the W_h^T the launch passes; ``Ws`` is then
    the shared [N][KCH] buffer their K-chunks are staged in), and the
    per-thread element slots ok/er/eu (filled by ``ELEMENT_SLOT``).
    ``gates`` is the C++ expression for the number of gates (``"G"`` or ``"1"``).
    """
    width, load = ("N", "rows") if direction == "forward" else ("U", "cols")
    row_len = "H" if direction == "forward" else f"({gates}) * H"
    return f"""  const int L = x_shape[0];
  const int B = x_shape[1];  // all rows: NP problems of B / NP rows each
  const int grp = blockIdx.x / NU;  // batch group (its own barrier counter)
  const int prob = grp / NBB;  // problem (its own W_h and per-unit parameters)
  const int gin = grp - prob * NBB;  // batch group within the problem
  const int BP = B / NP;
  const int j0 = (blockIdx.x % NU) * U;
  const int r0 = prob * BP + gin * BB;
  const int nrows = frnn::imin(BB, BP - gin * BB);
  const int pofs = prob * H;  // this problem's offset into per-unit parameters
  unsigned* counter = sync + grp * FRNN_SYNC_STRIDE;
  float* hs;
  float* part;
  WT* Ws;
  frnn::carve<BBP, HLD, KS, {width}, PIPE, HR>(hs, part, Ws);
  constexpr int NR = MMA ? (({width} + 15) / 16) * 16 : {width};  // W_h slice rows (MMA: whole 16-row tiles)
  // WG: W_h streamed from global memory (L2) every step instead of a shared-memory slice
  static_assert(!WG || H % U == 0, "a streamed W_h needs U | H: no block has rows past H");
  const WT* Wsrc = Ws;
  if (WG) {{
    Wsrc = w + (long long)prob * ({gates}) * H * H + (long long)j0 * {row_len};
  }} else {{
    frnn::load_w_{load}<{gates}, U, H, TPB, WLD, NR, MMA == 3>(Ws, w + (long long)prob * ({gates}) * H * H, j0);
  }}

  bool ok[EPT];
  int er[EPT], eu[EPT];
"""


# Inside `for (int e = 0; e < EPT; ++e)`: which (row er, unit eu) of the
# block's BB x U tile thread element e handles, and whether it exists.
ELEMENT_SLOT = """    const int i = threadIdx.x + e * TPB;
    er[e] = i / U;
    eu[e] = i - er[e] * U;
    ok[e] = i < BB * U && er[e] < nrows && j0 + eu[e] < H;
"""
