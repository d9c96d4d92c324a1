"""The resident class's device code (``kernels/resident.py``): carving its shared
memory, loading W_h transposed, the per-row projections forward and backward.
It goes after ``persistent_header.HEADER`` (whose ``frnn`` helpers and emulator
fallbacks it uses) in ``mx.fast.cuda_kernel(header=...)``.
"""

RESIDENT_HEADER = r"""
// ---------------------------------------------------------------- resident class
#ifndef FRNN_RESIDENT_HEADER
#define FRNN_RESIDENT_HEADER
namespace frnn {

// The step operand buffer first (NF floats: a multiple of 4), then W_h.
template <int NF, typename WT>
__device__ __forceinline__ void resident_carve(float*& buf, WT*& W) {
  unsigned char* base = dyn_smem();
  buf = reinterpret_cast<float*>(base);
  W = reinterpret_cast<WT*>(buf + NF);
}

// The prologue's W_h copy: each thread first issues UNR independent global
// loads, then stores them - the copy is bound by the latency of the loads in
// flight, and one block of few warps must keep many in flight (one load per
// iteration made this copy cost as much as ~40 steps).
constexpr int RESIDENT_COPY_UNROLL = 16;

// store(i, load(i)) for i < N, the loads of U consecutive strides issued before their stores.
template <int N, int TPB, typename WT, typename Load, typename Store>
__device__ __forceinline__ void copy_batched(Load load, Store store) {
  constexpr int U = RESIDENT_COPY_UNROLL;
  for (int i0 = threadIdx.x; i0 < N; i0 += TPB * U) {
    WT v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u * TPB;
      v[u] = i < N ? load(i) : zero<WT>();
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u * TPB;
      if (i < N) {
        store(i, v[u]);
      }
    }
  }
}

// Wt[k*GHP + n] = w[n*H + k] (k < H), 0 for H <= k < KS. Reads are coalesced;
// the stores walk k across a warp with an odd stride GHP: 32 banks, no conflict.
template <int GH, int GHP, int H, int KS, int TPB, typename WT>
__device__ __forceinline__ void load_w_transposed(WT* Wt, const WT* w) {
  copy_batched<GH * H, TPB, WT>([&](int i) { return w[i]; },
                                [&](int i, WT v) { Wt[(i % H) * GHP + i / H] = v; });
  for (int i = H * GHP + threadIdx.x; i < KS * GHP; i += TPB) {
    Wt[i] = zero<WT>();
  }
}

// Wn[m*H + j] = w[m*H + j] (m < GH), 0 for GH <= m < KS.
template <int GH, int H, int KS, int TPB, typename WT>
__device__ __forceinline__ void load_w_natural(WT* Wn, const WT* w) {
  copy_batched<KS * H, TPB, WT>([&](int i) { return i < GH * H ? w[i] : zero<WT>(); },
                                [&](int i, WT v) { Wn[i] = v; });
}

// One float4 chunk of a projection: a + v.x*w0 + v.y*w1 + v.z*w2 + v.w*w3 as one FMA
// chain (forward); the backward's alternates two chains (acc[0]: x, z; acc[1]: y, w).
// Both projections and their register variants use these: the same order, the same bits.
__device__ __forceinline__ float fma_chunk(float4 v, float w0, float w1, float w2, float w3, float a) {
  return fmaf(v.w, w3, fmaf(v.z, w2, fmaf(v.y, w1, fmaf(v.x, w0, a))));
}
__device__ __forceinline__ void fma_chunk2(float4 v, float w0, float w1, float w2, float w3, float (&acc)[2]) {
  acc[0] = fmaf(v.x, w0, acc[0]);
  acc[1] = fmaf(v.y, w1, acc[1]);
  acc[0] = fmaf(v.z, w2, acc[0]);
  acc[1] = fmaf(v.w, w3, acc[1]);
}

// a[rr][g] += sum_k h[r][k] * Wt[k][g*H + j] for the thread's rows r = rs + rr*RS
// (rows past BB read row BB-1; the caller drops them). GHP: Wt's row stride.
// With KSP > 1 the thread takes the float4 chunks k = 4*(ks + KSP*i) only (the
// caller sums the KSP partial sums): interleaved, so the KSP lanes of a unit read
// W rows 4 apart (different banks: GHP is odd).
template <int KS, int GHP, int H, int G, int RPT, int RS, int BB, int KSP, typename WT>
__device__ __forceinline__ void resident_project(const float* h, const WT* Wt, int j, int rs, int ks,
                                                 float (&a)[RPT][G]) {
  const float* hrow[RPT];
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) {
    hrow[rr] = h + imin(rs + rr * RS, BB - 1) * KS;
  }
#pragma unroll 2
  for (int k = 4 * ks; k < KS; k += 4 * KSP) {
    float4 hv[RPT];
#pragma unroll
    for (int rr = 0; rr < RPT; ++rr) {
      hv[rr] = *reinterpret_cast<const float4*>(hrow[rr] + k);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float w0 = to_f(Wt[(k + 0) * GHP + g * H + j]);
      const float w1 = to_f(Wt[(k + 1) * GHP + g * H + j]);
      const float w2 = to_f(Wt[(k + 2) * GHP + g * H + j]);
      const float w3 = to_f(Wt[(k + 3) * GHP + g * H + j]);
#pragma unroll
      for (int rr = 0; rr < RPT; ++rr) {
        a[rr][g] = fma_chunk(hv[rr], w0, w1, w2, w3, a[rr][g]);
      }
    }
  }
}

// d[rr] += sum_m dh[r][m] * Wn[m][j] (the backward's dhp_{s+1} W_h); with KSP > 1
// over the float4 chunks m = 4*(ks + KSP*i) only, as resident_project.
template <int KS, int H, int RPT, int RS, int BB, int KSP, typename WT>
__device__ __forceinline__ void resident_project_back(const float* dh, const WT* Wn, int j, int rs, int ks,
                                                      float (&d)[RPT]) {
  const float* drow[RPT];
  float acc[RPT][2];
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) {
    drow[rr] = dh + imin(rs + rr * RS, BB - 1) * KS;
    acc[rr][0] = 0.0f;
    acc[rr][1] = 0.0f;
  }
#pragma unroll 2
  for (int m = 4 * ks; m < KS; m += 4 * KSP) {
    const float w0 = to_f(Wn[(m + 0) * H + j]);
    const float w1 = to_f(Wn[(m + 1) * H + j]);
    const float w2 = to_f(Wn[(m + 2) * H + j]);
    const float w3 = to_f(Wn[(m + 3) * H + j]);
#pragma unroll
    for (int rr = 0; rr < RPT; ++rr) {
      fma_chunk2(*reinterpret_cast<const float4*>(drow[rr] + m), w0, w1, w2, w3, acc[rr]);
    }
  }
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) {
    d[rr] = acc[rr][0] + acc[rr][1];
  }
}

// WREG plans: the thread's share of W_h in registers, read once from the shared copy
// after the prologue. Per float4 chunk of K the shared versions above issue 4*G
// (forward) or 4 (backward) loads of W besides the RPT loads of the operand; these
// only the operand's, for the same FMAs (the step is issue-bound at small H).
// Forward: w[i][g][q] = Wt[k+q][g*H + j] for the chunks k = 4*(ks + KSP*i), zero
// past KS (a thread with fewer chunks) and for j >= H.
template <int NCH, int KS, int GHP, int H, int G, int KSP, typename WT>
__device__ __forceinline__ void resident_w_registers(const WT* Wt, int j, int ks, float (&w)[NCH][G][4]) {
#pragma unroll
  for (int i = 0; i < NCH; ++i) {
    const int k = 4 * (ks + KSP * i);
    const bool in = k < KS && j < H;
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        w[i][g][q] = in ? to_f(Wt[(k + q) * GHP + g * H + j]) : 0.0f;
      }
    }
  }
}

// resident_project with w from resident_w_registers.
template <int NCH, int KS, int G, int RPT, int RS, int BB, int KSP>
__device__ __forceinline__ void resident_project_registers(const float* h, const float (&w)[NCH][G][4], int rs,
                                                           int ks, float (&a)[RPT][G]) {
  const float* hrow[RPT];
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) {
    hrow[rr] = h + imin(rs + rr * RS, BB - 1) * KS;
  }
#pragma unroll
  for (int i = 0; i < NCH; ++i) {
    const int k = 4 * (ks + KSP * i);
    // every thread has NCH chunks where KSP divides KS/4 (no test then); else the
    // last one only some (k < KS: never a read past the row)
    if ((KS / 4) % KSP == 0 || k < KS) {
      float4 hv[RPT];
#pragma unroll
      for (int rr = 0; rr < RPT; ++rr) {
        hv[rr] = *reinterpret_cast<const float4*>(hrow[rr] + k);
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int rr = 0; rr < RPT; ++rr) {
          a[rr][g] = fma_chunk(hv[rr], w[i][g][0], w[i][g][1], w[i][g][2], w[i][g][3], a[rr][g]);
        }
      }
    }
  }
}

// Backward: w[i][q] = Wn[m+q][j] for the chunks m = 4*(ks + KSP*i) (Wn's rows past
// G*H are zero; chunks past KS and j >= H are zero here).
template <int NCH, int KS, int H, int KSP, typename WT>
__device__ __forceinline__ void resident_w_registers_back(const WT* Wn, int j, int ks, float (&w)[NCH][4]) {
#pragma unroll
  for (int i = 0; i < NCH; ++i) {
    const int m = 4 * (ks + KSP * i);
    const bool in = m < KS && j < H;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      w[i][q] = in ? to_f(Wn[(m + q) * H + j]) : 0.0f;
    }
  }
}

// resident_project_back with w from resident_w_registers_back.
template <int NCH, int KS, int RPT, int RS, int BB, int KSP>
__device__ __forceinline__ void resident_project_back_registers(const float* dh, const float (&w)[NCH][4], int rs,
                                                                int ks, float (&d)[RPT]) {
  const float* drow[RPT];
  float acc[RPT][2];
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) {
    drow[rr] = dh + imin(rs + rr * RS, BB - 1) * KS;
    acc[rr][0] = 0.0f;
    acc[rr][1] = 0.0f;
  }
#pragma unroll
  for (int i = 0; i < NCH; ++i) {
    const int m = 4 * (ks + KSP * i);
    if ((KS / 4) % KSP == 0 || m < KS) {
#pragma unroll
      for (int rr = 0; rr < RPT; ++rr) {
        fma_chunk2(*reinterpret_cast<const float4*>(drow[rr] + m), w[i][0], w[i][1], w[i][2], w[i][3], acc[rr]);
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) {
    d[rr] = acc[rr][0] + acc[rr][1];
  }
}

} // namespace frnn
#endif // FRNN_RESIDENT_HEADER
"""
