"""The projection of the tiled class's kernels (device code, part of ``persistent_header.HEADER``).

Per step a block multiplies its staged rows of h_{t-1} (backward: dhp_{t+1}) by its slice
of W_h: ``matvec_chunk`` on CUDA cores (float32 FMA, a warp per task, lanes over K, a
halving-butterfly reduction) or ``mma_chunk`` on tensor cores (mma.sync tiles; ``MMA``
1-3), K-chunk by K-chunk (``project``), with a streamed W_h's chunks staged by
``stage_w`` (float32, FMA) or ``stage_w_mma`` (the slice's padded layout and the MMA's
type); ``part_sum`` adds a unit's K-split partial sums. Inside ``namespace frnn``,
after the primitives of ``persistent_header`` (loads, barriers, staging), which it uses.
"""

PROJECTION = r"""__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
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
// RAW_W (tf32): the W tiles hold float32 values as loaded (a pipelined streamed chunk,
// copied by cp.async), rounded to tf32 here at the fragment load instead.
// HR (16-bit MMA): hs holds the rows rounded already (stage_rows_half: HLD / 2 words a row),
// so a fragment is two words as they are.
template <int KCH, int BBP, int N, int KS, int TPB, int MMA, int WLD, int HLD, bool RAW_W = false, bool HR = false,
          typename WT>
__device__ __forceinline__ void mma_chunk(
    const float* hs, const WT* Ws, int k0, int klen, float* part, bool accumulate) {
  static_assert(!HR || MMA == 1 || MMA == 2, "16-bit staged rows: bfloat16 / float16 plans");
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
      if (MMA == 3 && RAW_W) {  // float32 as loaded: rounded as a slice is (slice_value)
        a[0] = tf32_bits(to_f(wa[k + t]));
        a[1] = tf32_bits(to_f(wa[8 * WLD + k + t]));
        a[2] = tf32_bits(to_f(wa[k + t + 4]));
        a[3] = tf32_bits(to_f(wa[8 * WLD + k + t + 4]));
      } else if (MMA == 3) {  // the slice holds tf32 values already (slice_value)
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
        if constexpr (HR) {  // words of the tile's row g: (k + 2t, +1) and (k + 2t + 8, +9)
          const unsigned* hw = reinterpret_cast<const unsigned*>(hs) + (ng * NTT * 8 + j * 8 + g) * (HLD / 2) + k / 2;
          b[0] = hw[t];
          b[1] = hw[t + 4];
        } else if (MMA == 3) {
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

// Wc[n * WLD + k] = W's row n (rows as stage_w's) at column k0 + k for n < N, k < klen,
// zero elsewhere (n < NR, k < KCHP): a streamed W_h's K-chunk for the tensor-core
// projection, in the slice's padded layout and the MMA's type (tf32: float32, rounded
// here as load_w_rows rounds a slice), so mma_chunk reads it as it reads a slice.
// 16-byte copies when the rows allow (cp.async for the 16-bit types: the global W_h is
// already the MMA's type), else element by element.
// RAW (tf32): the float32 values as they are, by cp.async too (mma_chunk's RAW_W rounds them).
template <int K, int KCH, int N, int NR, int WLD, int TPB, int RU, int GS, int MMA, bool WAIT = true,
          bool RAW = false, typename WT>
__device__ __forceinline__ void stage_w_mma(WT* Wc, const WT* W, int k0, int klen) {
  constexpr int KCHP = ((KCH + 15) / 16) * 16;
  constexpr int V = 16 / (int)sizeof(WT);  // elements of a 16-byte copy
  if ((KCHP % V) == 0 && (K % V) == 0 && (GS % V) == 0 && (WLD % V) == 0 && (k0 % V) == 0 &&
      (reinterpret_cast<unsigned long long>(W) % 16) == 0 &&
      (reinterpret_cast<unsigned long long>(Wc) % 16) == 0) {
    // K % V == 0 and k0 % V == 0: klen is a multiple of V, a copy is all in or all out
    constexpr int KV = KCHP / V;
    for (int i = threadIdx.x; i < NR * KV; i += TPB) {
      const int n = i / KV;
      const int k = V * (i - n * KV);
      const bool in = n < N && k < klen;
      // a copy of nothing still needs a valid source address (see stage_rows)
      const WT* src = W + ((in ? n : 0) / RU) * GS + ((in ? n : 0) % RU) * K + k0 + (in ? k : 0);
#if defined(FRNN_CP_ASYNC)
      if (MMA != 3 || RAW) {
        cp_async16(Wc + n * WLD + k, reinterpret_cast<const float*>(src), in ? 16 : 0);
        continue;
      }
#endif
      float4 v;
      v.x = v.y = v.z = v.w = 0.0f;
      if (in) {
        v = ldcg4(reinterpret_cast<const float*>(src));
      }
      if (MMA == 3 && !RAW) {  // float32 values: rounded to tf32
        v.x = tf32_round(v.x);
        v.y = tf32_round(v.y);
        v.z = tf32_round(v.z);
        v.w = tf32_round(v.w);
      }
      *reinterpret_cast<float4*>(Wc + n * WLD + k) = v;
    }
#if defined(FRNN_CP_ASYNC)
    if (WAIT) {  // else the caller commits the copies as a group and waits for it
      cp_async_wait_all();
    }
#endif
  } else {
    for (int i = threadIdx.x; i < NR * KCHP; i += TPB) {
      const int n = i / KCHP;
      const int k = i - n * KCHP;
      Wc[n * WLD + k] = (n < N && k < klen)
          ? slice_value<MMA == 3 && !RAW>(W[(n / RU) * GS + (n % RU) * K + k0 + k]) : zero<WT>();
    }
  }
}

// part <- the block's rows of src (rows r0.., row stride ld, K columns) times
// Ws^T, K-chunk by K-chunk. Ends with __syncthreads: part is ready to read.
// STREAM_W: Ws is W_h in global memory (rows as matvec_chunk's RU / GS say), each
// K-chunk staged into Wc (shared, [N][KCH]) with the rows' chunk.
// MMA (1-3): the tensor-core projection (mma_chunk) on the padded slice (WLD, HLD); with
// STREAM_W on each staged K-chunk (stage_w_mma: the slice's layout, WLD its row stride).
// PIPE (tensor-core plans of several K-chunks): two buffers of staged rows (and of a
// streamed W_h's chunk); chunk c + 1's copies are in flight while chunk c's MMAs run.
// One barrier a chunk: after it chunk c's data is visible to every thread and every
// thread is done with chunk c - 1's MMAs, so c + 1 may go into that chunk's buffers.
template <int K, int KCH, int BBP, int N, int RB, int KS, int TPB, int RU = N, int GS = 0,
          bool STREAM_W = false, int NCS = 1, int MMA = 0, int WLD = K, int HLD = KCH, bool PIPE = false,
          bool HR = false, typename WT>
__device__ __forceinline__ void project(
    const float* src, int ld, int nrows, const WT* Ws, float* hs, float* part, float* Wc = nullptr) {
  static_assert(MMA == 0 || STREAM_W || RU == N, "a tensor-core slice holds the block's rows consecutively");
  static_assert(!PIPE || (MMA != 0 && K > KCH), "a pipelined projection: tensor cores, several K-chunks");
  static_assert(!HR || ((MMA == 1 || MMA == 2) && !PIPE), "16-bit staged rows: 16-bit MMA plans, unpipelined");
  constexpr int NR = ((N + 15) / 16) * 16;  // a tensor-core chunk's rows: whole 16-row tiles
  if constexpr (PIPE) {
    WT* wc = reinterpret_cast<WT*>(Wc);
    // chunk c's buffers: hs + (c & 1) * BBP * HLD, wc + (c & 1) * NR * WLD
    stage_rows<BBP, KCH, TPB, HLD, false>(hs, src, ld, nrows, 0, KCH);
    if (STREAM_W) {  // tf32: raw float32 by cp.async, rounded at the fragment load (RAW_W)
      stage_w_mma<K, KCH, N, NR, WLD, TPB, RU, GS, MMA, false, true>(wc, Ws, 0, KCH);
    }
    cp_async_commit();
    int c = 0;
    for (int k0 = 0; k0 < K; k0 += KCH, ++c) {
      const int klen = imin(KCH, K - k0);
      const int b = c & 1;
      cp_async_wait_group<0>();  // this chunk's copies (the only group in flight)
      __syncthreads();
      if (k0 + KCH < K) {  // the next chunk into the other buffers, in flight during the MMAs
        const int nlen = imin(KCH, K - k0 - KCH);
        stage_rows<BBP, KCH, TPB, HLD, false>(hs + (1 - b) * BBP * HLD, src, ld, nrows, k0 + KCH, nlen);
        if (STREAM_W) {
          stage_w_mma<K, KCH, N, NR, WLD, TPB, RU, GS, MMA, false, true>(wc + (1 - b) * NR * WLD, Ws, k0 + KCH, nlen);
        }
        cp_async_commit();
      }
      mma_chunk<KCH, BBP, N, KS, TPB, MMA, WLD, HLD, STREAM_W, false, WT>(hs + b * BBP * HLD,
                                                                   STREAM_W ? wc + b * NR * WLD : Ws,
                                                                   STREAM_W ? 0 : k0, klen, part, k0 > 0);
    }
    __syncthreads();  // part is complete
    return;
  }
  for (int k0 = 0; k0 < K; k0 += KCH) {
    const int klen = imin(KCH, K - k0);
    if constexpr (HR) {
      stage_rows_half<BBP, KCH, TPB, HLD, MMA>(reinterpret_cast<unsigned*>(hs), src, ld, nrows, k0, klen);
    } else {
      stage_rows<BBP, KCH, TPB, HLD>(hs, src, ld, nrows, k0, klen);
    }
    if (STREAM_W && MMA != 0) {
      stage_w_mma<K, KCH, N, NR, WLD, TPB, RU, GS, MMA>(reinterpret_cast<WT*>(Wc), Ws, k0, klen);
    } else if (STREAM_W) {
      stage_w<K, KCH, N, TPB, RU, GS>(Wc, Ws, k0, klen);
    }
    __syncthreads();
    if (MMA != 0 && STREAM_W) {
      mma_chunk<KCH, BBP, N, KS, TPB, MMA, WLD, HLD, false, HR, WT>(hs, reinterpret_cast<const WT*>(Wc), 0, klen,
                                                                    part, k0 > 0);
    } else if (MMA != 0) {
      mma_chunk<KCH, BBP, N, KS, TPB, MMA, WLD, HLD, false, HR, WT>(hs, Ws, k0, klen, part, k0 > 0);
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
"""
