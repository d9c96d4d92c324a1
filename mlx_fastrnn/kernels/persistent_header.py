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
                              of each row's HLD: HLD = KCH, padded for a tensor-core plan)
  part float [KS][BBP][N]     per-K-split partial sums of the projection
  Ws   WT    [NR][WLD]        the block's slice of W_h (rows, or transposed columns; NR = N,
                              WLD = K, a tensor-core plan pads both with zeros);
                              a streamed W_h (WG): float [N][KCH], the rows' current K-chunk
Python's ``smem_bytes`` computes the same total. The projection runs on CUDA cores
(``matvec_chunk``, float32 FMA) or on tensor cores (``mma_chunk``, MMA > 0).

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
// planner makes no cluster plan before); the emulator runs the grid barrier.
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

// HLD: the row stride of hs (KCH; a tensor-core plan pads it against bank conflicts)
template <int BBP, int HLD, int KS, int N, typename WT>
__device__ __forceinline__ void carve(float*& hs, float*& part, WT*& Ws) {
  unsigned char* base = dyn_smem();
  hs = reinterpret_cast<float*>(base);
  part = hs + BBP * HLD;
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

// hs[r*HLD + k] = src[r*ld + k0 + k] for r < nrows, k < klen; 0 elsewhere (k < KCH).
// 16-byte loads when every row start is 16-byte aligned (KCH, HLD, ld, k0 and the
// pointer multiples of 4 floats), else scalar loads.
template <int BBP, int KCH, int TPB, int HLD = KCH>
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
    cp_async_wait_all();
#else
#pragma unroll 4
    for (int i = threadIdx.x; i < BBP * KQ; i += TPB) {
      const int r = i / KQ;
      const int k = 4 * (i - r * KQ);
      const float* p = src + (long long)r * ld + k0 + k;
      float4 v;
      if (r < nrows && k + 3 < klen) {
        v = ldcg4(p);
      } else {
        v.x = (r < nrows && k < klen) ? ldcg(p) : 0.0f;
        v.y = (r < nrows && k + 1 < klen) ? ldcg(p + 1) : 0.0f;
        v.z = (r < nrows && k + 2 < klen) ? ldcg(p + 2) : 0.0f;
        v.w = 0.0f;
      }
      *reinterpret_cast<float4*>(hs + r * HLD + k) = v;
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

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
template <typename HT>  // __nv_bfloat16 / __half
__device__ __forceinline__ float4 ld4(const HT* p) {
  float4 v;
  v.x = to_f(p[0]);
  v.y = to_f(p[1]);
  v.z = to_f(p[2]);
  v.w = to_f(p[3]);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 16);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v;
}

// Warp sums of P values at once (P a power of two <= 32): a halving butterfly.
// At each of the first log2(P) steps a lane keeps one half of its values (the
// upper half if its lane bit is set) and adds the partner's copy of that half,
// so P sums take P - 1 + (5 - log2 P) shuffles instead of 5 P. Lane l ends with
// the sum of value l >> (5 - log2 P); v is clobbered. (Templates, not loops
// over the step: every index must be a constant, or v goes to the stack.)
template <int P, int S>
__device__ __forceinline__ void warp_sum_step(float* v, int lane) {
  constexpr int C = P >> S;  // values still held
  constexpr int O = 16 >> S;  // partner lane offset
  if (C > 1) {
    const bool up = (lane & O) != 0;
#pragma unroll
    for (int i = 0; i < C / 2; ++i) {
      const float keep = up ? v[i + C / 2] : v[i];
      const float send = up ? v[i] : v[i + C / 2];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
  } else {
    v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
  }
}

template <int P>
__device__ __forceinline__ float warp_sum_many(float (&v)[P], int lane) {
  warp_sum_step<P, 0>(v, lane);
  warp_sum_step<P, 1>(v, lane);
  warp_sum_step<P, 2>(v, lane);
  warp_sum_step<P, 3>(v, lane);
  warp_sum_step<P, 4>(v, lane);
  return v[0];
}

template <int V>
struct pow2_at_least {  // smallest power of two >= V, at most 32 (= 32 >> shift)
  static constexpr int shift = V > 16 ? 0 : V > 8 ? 1 : V > 4 ? 2 : V > 2 ? 3 : V > 1 ? 4 : 5;
  static constexpr int value = 32 >> shift;
};

// part[(ks*BBP + r)*N + n] (+)= sum_{k in split ks of the chunk} hs[r][k] * W[n][k0 + k],
// row n of W at Ws + (n / RU) * GS + (n % RU) * K: the shared-memory slice's rows are
// consecutive (RU = N), a streamed W_h's rows (WG) gate groups of U rows GS apart.
// A warp takes a task (row group of RB rows, K-split ks, column split cs: NC = N / NCS
// columns from cs * NC); its lanes stride over k, so hs and Ws reads are consecutive
// words (no bank conflicts), then a butterfly reduction. Column splits let a task take
// more rows (RB * NC accumulators a lane): each W load then feeds RB rows' FMAs. The
// same lane owns the same part element in every chunk, so accumulation across chunks
// needs no synchronisation.
template <int K, int KCH, int BBP, int N, int RB, int KS, int TPB, typename WT, int RU = N, int GS = 0,
          int NCS = 1>
__device__ __forceinline__ void matvec_chunk(
    const float* hs, const WT* Ws, int k0, int klen, float* part, bool accumulate) {
#if defined(FRNN_DIAG_NO_MATVEC)
  return;
#endif
  static_assert(N % NCS == 0, "column splits of equal width");
  constexpr int NC = N / NCS;
  constexpr int RG = BBP / RB;
  constexpr int NW = TPB / 32;
  constexpr int KC = (((KCH + 31) / 32 + KS - 1) / KS) * 32;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int task = warp; task < RG * KS * NCS; task += NW) {
    const int cs = task % NCS;
    const int rk = task / NCS;
    const int rg = rk / KS;
    const int ks = rk - rg * KS;
    const int n0 = cs * NC;
    float acc[RB][NC];
#pragma unroll
    for (int rr = 0; rr < RB; ++rr) {
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        acc[rr][n] = 0.0f;
      }
    }
    const int kb = ks * KC;
    const int ke = imin(klen, kb + KC);
    const float* hrow = hs + rg * RB * KCH;
    const WT* wk = Ws + k0;
    int kt = kb;  // first k of the scalar loop
#if !defined(FRNN_MATVEC_SCALAR)
    // Four consecutive k per lane (16-byte shared loads: a quarter of the load
    // instructions), when every row start is 16-byte aligned; the < 4 left
    // over go through the scalar loop.
    if ((KCH % 4) == 0 && (K % 4) == 0 && (reinterpret_cast<unsigned long long>(Ws) % 16) == 0) {
      kt = ke > kb ? kb + ((ke - kb) & ~3) : kb;
      for (int k = kb + 4 * lane; k < kt; k += 128) {
        float4 hv[RB];
#pragma unroll
        for (int rr = 0; rr < RB; ++rr) {
          hv[rr] = *reinterpret_cast<const float4*>(hrow + rr * KCH + k);
        }
#pragma unroll
        for (int n = 0; n < NC; ++n) {
          const int nn = n0 + n;
          const float4 wv = ld4(wk + (nn / RU) * GS + (nn % RU) * K + k);
#pragma unroll
          for (int rr = 0; rr < RB; ++rr) {
            float a = acc[rr][n];
            a = fmaf(hv[rr].x, wv.x, a);
            a = fmaf(hv[rr].y, wv.y, a);
            a = fmaf(hv[rr].z, wv.z, a);
            acc[rr][n] = fmaf(hv[rr].w, wv.w, a);
          }
        }
      }
    }
#endif
    for (int k = kt + lane; k < ke; k += 32) {
      float hv[RB];
#pragma unroll
      for (int rr = 0; rr < RB; ++rr) {
        hv[rr] = hrow[rr * KCH + k];
      }
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        const int nn = n0 + n;
        const float wv = to_f(wk[(nn / RU) * GS + (nn % RU) * K + k]);
#pragma unroll
        for (int rr = 0; rr < RB; ++rr) {
          acc[rr][n] = fmaf(hv[rr], wv, acc[rr][n]);
        }
      }
    }
#if defined(FRNN_REDUCE_PER_VALUE)
#pragma unroll
    for (int rr = 0; rr < RB; ++rr) {
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        const float v = warp_sum(acc[rr][n]);
        if (lane == ((rr * NC + n) & 31)) {
          float* p = part + (ks * BBP + rg * RB + rr) * N + n0 + n;
          *p = accumulate ? *p + v : v;
        }
      }
    }
#else
    // The task's RB*NC sums in groups of up to 32; value i is row i / NC, column
    // n0 + i % NC of part (row-major from this task's first row).
    constexpr int V = RB * NC;
    constexpr int P = pow2_at_least<V>::value;
    constexpr int SH = pow2_at_least<V>::shift;
    float* prow = part + (ks * BBP + rg * RB) * N + n0;
#pragma unroll
    for (int g0 = 0; g0 < V; g0 += P) {
      float v[P];
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const int q = g0 + i < V ? g0 + i : 0;
        v[i] = g0 + i < V ? acc[q / NC][q % NC] : 0.0f;
      }
      const float sum = warp_sum_many<P>(v, lane);
      const int idx = g0 + (lane >> SH);
      if ((lane & ((1 << SH) - 1)) == 0 && idx < V) {
        float* p = prow + (idx / NC) * N + idx % NC;
        *p = accumulate ? *p + sum : sum;
      }
    }
#endif
  }
}

// n-tiles of 8 rows a tensor-core task takes: the largest divisor of NT up to 8
// (4 accumulators each).
__host__ __device__ constexpr int mma_tiles_per_task(int nt) {
  return nt % 8 == 0 ? 8 : nt % 7 == 0 ? 7 : nt % 6 == 0 ? 6 : nt % 5 == 0 ? 5
       : nt % 4 == 0 ? 4 : nt % 3 == 0 ? 3 : nt % 2 == 0 ? 2 : 1;
}

// Tensor-core form of matvec_chunk: part[(ks*BBP + r)*N + n] (+)= sum_k hs[r][k] W[n][k]
// as D = W hs^T on mma.sync tiles: M = 16 rows of the W slice (Ws: rows at stride WLD,
// padded with zero rows to a multiple of 16 and zero columns past K), N = 8 staged
// rows (hs: stride HLD, BBP a multiple of 8, zero past the chunk's klen), K = KSTEP.
// A warp task is (16-row tile mt, group of NTT row tiles, K-split ks): the W fragment
// of a k-step is loaded once for its NTT tiles. The h operand is rounded to the MMA's
// type at the fragment load (the state itself stays float32); a tf32 plan's W slice was
// rounded once, when loaded.
// Each lane owns the same part elements in every chunk, as in matvec_chunk.
template <int KCH, int BBP, int N, int KS, int TPB, int MMA, int WLD, int HLD, typename WT>
__device__ __forceinline__ void mma_chunk(
    const float* hs, const WT* Ws, int k0, int klen, float* part, bool accumulate) {
#if defined(FRNN_DIAG_NO_MATVEC)
  return;
#endif
  static_assert(MMA == 0 || BBP % 8 == 0, "tensor-core plans stage whole 8-row tiles");
  constexpr int KSTEP = MMA == 3 ? 8 : 16;
  constexpr int MT = (N + 15) / 16;
  constexpr int NT = BBP / 8;
  constexpr int NTT = mma_tiles_per_task(NT);
  constexpr int NG = NT / NTT;
  constexpr int NW = TPB / 32;
  constexpr int KC = (((KCH + KSTEP - 1) / KSTEP + KS - 1) / KS) * KSTEP;  // k of one split
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int kend = ((klen + KSTEP - 1) / KSTEP) * KSTEP;  // zero-padded in hs and Ws
  for (int task = warp; task < MT * NG * KS; task += NW) {
    const int mt = task % MT;
    const int rest = task / MT;
    const int ng = rest % NG;
    const int ks = rest / NG;
    float acc[NTT][4];
#pragma unroll
    for (int j = 0; j < NTT; ++j) {
      acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    }
    const int kb = ks * KC;
    const int ke = imin(kend, kb + KC);
    const WT* wa = Ws + (mt * 16 + g) * WLD + k0;  // fragment rows g and g + 8
    const float* hb = hs + (ng * NTT * 8 + g) * HLD;  // tile j's row g at + j * 8 * HLD
    for (int k = kb; k < ke; k += KSTEP) {
      unsigned a[4];
      if (MMA == 3) {  // the slice holds tf32 values already (slice_value)
        a[0] = float_bits(to_f(wa[k + t]));
        a[1] = float_bits(to_f(wa[8 * WLD + k + t]));
        a[2] = float_bits(to_f(wa[k + t + 4]));
        a[3] = float_bits(to_f(wa[8 * WLD + k + t + 4]));
      } else {
        a[0] = *reinterpret_cast<const unsigned*>(wa + k + 2 * t);
        a[1] = *reinterpret_cast<const unsigned*>(wa + 8 * WLD + k + 2 * t);
        a[2] = *reinterpret_cast<const unsigned*>(wa + k + 2 * t + 8);
        a[3] = *reinterpret_cast<const unsigned*>(wa + 8 * WLD + k + 2 * t + 8);
      }
#pragma unroll
      for (int j = 0; j < NTT; ++j) {
        const float* hr = hb + j * 8 * HLD + k;
        unsigned b[2];
        if (MMA == 3) {
          b[0] = tf32_bits(hr[t]);
          b[1] = tf32_bits(hr[t + 4]);
        } else if (MMA == 2) {
          b[0] = pack_f16x2(hr[2 * t], hr[2 * t + 1]);
          b[1] = pack_f16x2(hr[2 * t + 8], hr[2 * t + 9]);
        } else {
          b[0] = pack_bf16x2(hr[2 * t], hr[2 * t + 1]);
          b[1] = pack_bf16x2(hr[2 * t + 8], hr[2 * t + 9]);
        }
        mma_tile<MMA>(acc[j], a, b);
      }
    }
    // D's element (row n of W, column r of hs^T) is part's [r][n]: c0 (g, 2t),
    // c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1).
#pragma unroll
    for (int j = 0; j < NTT; ++j) {
      const int r = (ng * NTT + j) * 8 + 2 * t;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int n = mt * 16 + g + (q >> 1) * 8;
        if (n < N) {
          float* p = part + (ks * BBP + r + (q & 1)) * N + n;
          *p = accumulate ? *p + acc[j][q] : acc[j][q];
        }
      }
    }
  }
}

// Wc[n * KCH + k] = W's row n (at W + (n / RU) * GS + (n % RU) * K) at column k0 + k,
// k < klen: a streamed W_h's current K-chunk of the block's rows, read from global
// memory (L2) once per block and step; every warp task then reads it from shared
// memory (reading global memory per task re-read the rows once per row group:
// BBP / RB times the bytes).
template <int K, int KCH, int N, int TPB, int RU, int GS, typename WT>
__device__ __forceinline__ void stage_w(float* Wc, const WT* W, int k0, int klen) {
  if ((KCH % 4) == 0 && (K % 4) == 0 && (GS % 4) == 0 && (k0 % 4) == 0 &&
      (reinterpret_cast<unsigned long long>(W) % 16) == 0 &&
      (reinterpret_cast<unsigned long long>(Wc) % 16) == 0) {
    // K % 4 == 0 and KCH % 4 == 0: klen is a multiple of 4, k < klen covers k + 3
    constexpr int KQ = KCH / 4;
    float4* wc4 = reinterpret_cast<float4*>(Wc);
#pragma unroll 4
    for (int i = threadIdx.x; i < N * KQ; i += TPB) {
      const int n = i / KQ;
      const int k = 4 * (i - n * KQ);
      if (k < klen) {
        wc4[i] = ld4(W + (n / RU) * GS + (n % RU) * K + k0 + k);
      }
    }
  } else {
#pragma unroll 4
    for (int i = threadIdx.x; i < N * KCH; i += TPB) {
      const int n = i / KCH;
      const int k = i - n * KCH;
      if (k < klen) {
        Wc[i] = to_f(W[(n / RU) * GS + (n % RU) * K + k0 + k]);
      }
    }
  }
}

// part <- the block's rows of src (rows r0.., row stride ld, K columns) times
// Ws^T, K-chunk by K-chunk. Ends with __syncthreads: part is ready to read.
// STREAM_W: Ws is W_h in global memory (rows as matvec_chunk's RU / GS say), each
// K-chunk staged into Wc (shared, [N][KCH]) with the rows' chunk.
// MMA (1-3): the tensor-core projection (mma_chunk) on the padded slice (WLD, HLD).
template <int K, int KCH, int BBP, int N, int RB, int KS, int TPB, int RU = N, int GS = 0,
          bool STREAM_W = false, int NCS = 1, int MMA = 0, int WLD = K, int HLD = KCH, typename WT>
__device__ __forceinline__ void project(
    const float* src, int ld, int nrows, const WT* Ws, float* hs, float* part, float* Wc = nullptr) {
  static_assert(MMA == 0 || (!STREAM_W && RU == N), "tensor-core plans keep the W_h slice in shared memory");
  for (int k0 = 0; k0 < K; k0 += KCH) {
    const int klen = imin(KCH, K - k0);
    stage_rows<BBP, KCH, TPB, HLD>(hs, src, ld, nrows, k0, klen);
    if (STREAM_W) {
      stage_w<K, KCH, N, TPB, RU, GS>(Wc, Ws, k0, klen);
    }
    __syncthreads();
    if (MMA != 0) {
      mma_chunk<KCH, BBP, N, KS, TPB, MMA, WLD, HLD, WT>(hs, Ws, k0, klen, part, k0 > 0);
    } else if (STREAM_W) {
      matvec_chunk<KCH, KCH, BBP, N, RB, KS, TPB, float, N, 0, NCS>(hs, Wc, 0, klen, part, k0 > 0);
    } else {
      matvec_chunk<K, KCH, BBP, N, RB, KS, TPB, WT, RU, GS, NCS>(hs, Ws, k0, klen, part, k0 > 0);
    }
    __syncthreads();
  }
}

template <int KS, int BBP, int N>
__device__ __forceinline__ float part_sum(const float* part, int r, int n) {
  float s = 0.0f;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    s += part[(ks * BBP + r) * N + n];
  }
  return s;
}

} // namespace frnn

#endif // FRNN_PERSISTENT_HEADER
"""

# The constants every body reads (template arguments), documented once:
#   T     dtype of x (float / __half / __nv_bfloat16)      WT   dtype of the W_h slice (float / __nv_bfloat16)
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
#   H0Z   forward: the initial state is zero (step 0 skips the projection)
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
  frnn::carve<BBP, HLD, KS, {width}>(hs, part, Ws);
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
