"""GRU persistent kernels (whole sequence in one launch): CUDA bodies.

The math is ``naive.py``'s (gate order r, z, n; ``n = tanh(x_n + r*(hp_n + bhn))``).
Shared device code (barrier, W_h slice, projection) is in
``mlx_fastrnn.kernels.persistent_header``; constants are documented there.
"""

from ...kernels.persistent_header import ELEMENT_SLOT, block_prologue

NUM_GATES = 3
NUM_STATES = 1
NUM_PARAMS = 1  # bhn

# One element's step as device functions (the resident class calls them; see
# kernels/resident.py and the LSTM's for the contract): gates r, z, n; prm[0]
# is b_hn; s = (h,). dhp differs from dx in the n gate (r scales hp_n).
DHP_IS_DX = False
POINT = r"""
namespace frnn_cell {
__device__ __forceinline__ void forward(const float* x, const float* a, const float* prm, float* s) {
  const float rg = frnn::sigmoid(x[0] + a[0]);
  const float zg = frnn::sigmoid(x[1] + a[1]);
  const float ng = tanhf(x[2] + rg * (a[2] + prm[0]));
  s[0] = (1.0f - zg) * ng + zg * s[0];
}
__device__ __forceinline__ void backward(const float* x, const float* a, const float* prm, const float* sp,
                                         const float* g, float* dx, float* dhp, float* dprev) {
  const float rg = frnn::sigmoid(x[0] + a[0]);
  const float zg = frnn::sigmoid(x[1] + a[1]);
  const float hn = a[2] + prm[0];
  const float ng = tanhf(x[2] + rg * hn);
  const float dn = g[0] * (1.0f - zg) * (1.0f - ng * ng);
  const float dz = g[0] * (sp[0] - ng) * zg * (1.0f - zg);
  const float dr = dn * hn * rg * (1.0f - rg);
  dx[0] = dr;
  dx[1] = dz;
  dx[2] = dn;
  dhp[0] = dr;
  dhp[1] = dz;
  dhp[2] = dn * rg;
  dprev[0] = g[0] * zg;
}
}  // namespace frnn_cell
"""

FORWARD_INPUTS = ("x", "w", "h0", "bhn")
FORWARD_OUTPUTS = ("h_seq", "hp", "sync")

FORWARD_BODY = r"""
  constexpr int G = 3;
  constexpr int N = G * U;
  constexpr int GH = G * H;
""" + block_prologue("forward", "G") + r"""  float hreg[EPT], bn[EPT], xv[EPT][G];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
""" + ELEMENT_SLOT + r"""    const long long b = r0 + er[e];
    const int j = j0 + eu[e];
    hreg[e] = ok[e] ? h0[b * H + j] : 0.0f;
    bn[e] = ok[e] ? bhn[pofs + j] : 0.0f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      xv[e][g] = ok[e] ? frnn::to_f(x[b * GH + g * H + j]) : 0.0f;
    }
  }

  for (int t = 0; t < L; ++t) {
    const bool rec = !(H0Z && t == 0);
    if (rec) {
      const float* hprev = t == 0 ? h0 : h_seq + (long long)(t - 1) * B * H;
      frnn::project<H, KCH, BBP, N, RB, KS, TPB>(
          hprev + (long long)r0 * H, H, nrows, Ws, hs, part);
    }
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      if (ok[e]) {
        const int j = j0 + eu[e];
        const long long row = (long long)t * B + r0 + er[e];
        const float ar = rec ? frnn::part_sum<KS, BBP, N>(part, er[e], eu[e]) : 0.0f;
        const float az = rec ? frnn::part_sum<KS, BBP, N>(part, er[e], U + eu[e]) : 0.0f;
        const float an = rec ? frnn::part_sum<KS, BBP, N>(part, er[e], 2 * U + eu[e]) : 0.0f;
        const float rg = frnn::sigmoid(xv[e][0] + ar);
        const float zg = frnn::sigmoid(xv[e][1] + az);
        const float ng = tanhf(xv[e][2] + rg * (an + bn[e]));
        const float hnew = (1.0f - zg) * ng + zg * hreg[e];
        hreg[e] = hnew;
        h_seq[row * H + j] = hnew;
        hp[row * GH + j] = ar;
        hp[row * GH + H + j] = az;
        hp[row * GH + 2 * H + j] = an;
      }
    }
    if (t + 1 < L) {
      // Prefetch the next step's inputs; the loads overlap the barrier.
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        const long long row = (long long)(t + 1) * B + r0 + er[e];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          xv[e][g] = ok[e] ? frnn::to_f(x[row * GH + g * H + j0 + eu[e]]) : 0.0f;
        }
      }
      frnn::grid_barrier(counter, (unsigned)(NU * (t + 1)));
    }
  }
"""

BACKWARD_INPUTS = ("dh", "x", "hp", "hprev", "w", "bhn")
BACKWARD_OUTPUTS = ("dx", "dhp", "dh0", "sync")

BACKWARD_BODY = r"""
  constexpr int G = 3;
  constexpr int GH = G * H;
  constexpr int STOP = NEED_D0 ? -1 : 0;
""" + block_prologue("backward", "G") + r"""  float direct[EPT], bn[EPT], dov[EPT], hpr[EPT], xv[EPT][G], hpv[EPT][G];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
""" + ELEMENT_SLOT + r"""    direct[e] = 0.0f;
    bn[e] = ok[e] ? bhn[pofs + j0 + eu[e]] : 0.0f;
  }
  // Step inputs of step s into registers (issued early, used after the barrier).
  auto fetch = [&](int s) {
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      const long long row = (long long)s * B + r0 + er[e];
      const int j = j0 + eu[e];
      dov[e] = ok[e] ? dh[row * H + j] : 0.0f;
      hpr[e] = ok[e] ? hprev[row * H + j] : 0.0f;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        xv[e][g] = ok[e] ? frnn::to_f(x[row * GH + g * H + j]) : 0.0f;
        hpv[e][g] = ok[e] ? hp[row * GH + g * H + j] : 0.0f;
      }
    }
  };
  fetch(L - 1);

  for (int s = L - 1; s >= STOP; --s) {
    const bool rec = s < L - 1;
    if (rec) {
      // dh_rec = dhp_{s+1} @ W_h, for this block's rows and units.
      frnn::project<GH, KCH, BBP, U, RB, KS, TPB>(
          dhp + ((long long)(s + 1) * B + r0) * GH, GH, nrows, Ws, hs, part);
    }
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      if (ok[e]) {
        const int j = j0 + eu[e];
        const float drec = rec ? frnn::part_sum<KS, BBP, U>(part, er[e], eu[e]) + direct[e] : 0.0f;
        if (s >= 0) {
          const long long row = (long long)s * B + r0 + er[e];
          const float gsum = dov[e] + drec;
          const float rg = frnn::sigmoid(xv[e][0] + hpv[e][0]);
          const float zg = frnn::sigmoid(xv[e][1] + hpv[e][1]);
          const float hn = hpv[e][2] + bn[e];
          const float ng = tanhf(xv[e][2] + rg * hn);
          const float dn = gsum * (1.0f - zg) * (1.0f - ng * ng);
          const float dz = gsum * (hpr[e] - ng) * zg * (1.0f - zg);
          const float dr = dn * hn * rg * (1.0f - rg);
          dx[row * GH + j] = dr;
          dx[row * GH + H + j] = dz;
          dx[row * GH + 2 * H + j] = dn;
          dhp[row * GH + j] = dr;
          dhp[row * GH + H + j] = dz;
          dhp[row * GH + 2 * H + j] = dn * rg;
          direct[e] = gsum * zg;
        } else {
          dh0[(long long)(r0 + er[e]) * H + j] = drec;
        }
      }
    }
    if (s > STOP) {
      if (s > 0) {
        fetch(s - 1);
      }
      frnn::grid_barrier(counter, (unsigned)(NU * (L - s)));
    }
  }
"""


def template_extras(cell_name):
    """Cell-specific template arguments (none for GRU)."""
    return []


def backward_launch(d_outs, xp, hp, prevs, w, params):
    """The backward kernel's inputs (``BACKWARD_INPUTS`` order) and output shapes
    (``BACKWARD_OUTPUTS`` but the barrier counters)."""
    L, B, GH = xp.shape
    H = GH // NUM_GATES
    return (d_outs[0], xp, hp, prevs[0], w, params[0]), [(L, B, GH), (L, B, GH), (B, H)]


def backward_results(outs):
    """``(dx, dhp, d_states0)`` from the backward kernel's outputs."""
    dx, dhp, dh0 = outs
    return dx, dhp, (dh0,)
