"""LSTM persistent kernels (whole sequence in one launch): CUDA bodies.

The math is ``naive.py``'s (gate order i, f, g, o; ``c' = f c + i g``,
``h' = o tanh(c')``). The cell state never leaves the block that owns its
units, so it is carried in registers across steps (and written out per step).
Shared device code and constants: ``mlx_fastrnn.kernels.persistent_header``.
"""

from ...kernels.persistent_header import ELEMENT_SLOT, block_prologue

NUM_GATES = 4
NUM_STATES = 2
NUM_PARAMS = 0

# One element's step as device functions (the resident class calls them; see
# kernels/resident.py): x / a the input / recurrent pre-activations (i, f, g, o),
# s = (h, c) updated in place. The adjoint gets the states entering the step
# (sp), the cotangents of the states it made (g) and returns the
# pre-activations' cotangents (dx; dhp is the same) and the entering states'
# cotangents through the cell's direct paths (dprev; h's recurrence is the caller's).
DHP_IS_DX = True
POINT = r"""
namespace frnn_cell {
__device__ __forceinline__ void forward(const float* x, const float* a, const float* prm, float* s) {
  const float ig = frnn::sigmoid(x[0] + a[0]);
  const float fg = frnn::sigmoid(x[1] + a[1]);
  const float gg = tanhf(x[2] + a[2]);
  const float og = frnn::sigmoid(x[3] + a[3]);
  const float c = fg * s[1] + ig * gg;
  s[1] = c;
  s[0] = og * tanhf(c);
}
__device__ __forceinline__ void backward(const float* x, const float* a, const float* prm, const float* sp,
                                         const float* g, float* dx, float* dhp, float* dprev) {
  const float ig = frnn::sigmoid(x[0] + a[0]);
  const float fg = frnn::sigmoid(x[1] + a[1]);
  const float gg = tanhf(x[2] + a[2]);
  const float og = frnn::sigmoid(x[3] + a[3]);
  const float cp = sp[1];
  const float tc = tanhf(fg * cp + ig * gg);
  const float gc = g[1] + g[0] * og * (1.0f - tc * tc);
  dx[0] = gc * gg * ig * (1.0f - ig);
  dx[1] = gc * cp * fg * (1.0f - fg);
  dx[2] = gc * ig * (1.0f - gg * gg);
  dx[3] = g[0] * tc * og * (1.0f - og);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    dhp[k] = dx[k];
  }
  dprev[0] = 0.0f;
  dprev[1] = gc * fg;
}
}  // namespace frnn_cell
"""

FORWARD_INPUTS = ("x", "w", "h0", "c0")
FORWARD_OUTPUTS = ("h_seq", "c_seq", "hp", "sync")

FORWARD_BODY = r"""
  constexpr int G = 4;
  constexpr int N = G * U;
  constexpr int GH = G * H;
""" + block_prologue("forward", "G") + r"""  float creg[EPT], xv[EPT][G];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
""" + ELEMENT_SLOT + r"""    const long long b = r0 + er[e];
    const int j = j0 + eu[e];
    creg[e] = ok[e] ? c0[b * H + j] : 0.0f;
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
        float a[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          a[g] = rec ? frnn::part_sum<KS, BBP, N>(part, er[e], g * U + eu[e]) : 0.0f;
          hp[row * GH + g * H + j] = a[g];
        }
        const float ig = frnn::sigmoid(xv[e][0] + a[0]);
        const float fg = frnn::sigmoid(xv[e][1] + a[1]);
        const float gg = tanhf(xv[e][2] + a[2]);
        const float og = frnn::sigmoid(xv[e][3] + a[3]);
        const float cnew = fg * creg[e] + ig * gg;
        creg[e] = cnew;
        c_seq[row * H + j] = cnew;
        h_seq[row * H + j] = og * tanhf(cnew);
      }
    }
    if (t + 1 < L) {
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

BACKWARD_INPUTS = ("dh", "dc", "x", "hp", "cprev", "w")
BACKWARD_OUTPUTS = ("dx", "dh0", "dc0", "sync")

BACKWARD_BODY = r"""
  constexpr int G = 4;
  constexpr int GH = G * H;
  constexpr int STOP = NEED_D0 ? -1 : 0;
""" + block_prologue("backward", "G") + r"""  float dcrec[EPT], dov[EPT], dcv[EPT], cpv[EPT], xv[EPT][G], hpv[EPT][G];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
""" + ELEMENT_SLOT + r"""    dcrec[e] = 0.0f;
  }
  auto fetch = [&](int s) {
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      const long long row = (long long)s * B + r0 + er[e];
      const int j = j0 + eu[e];
      dov[e] = ok[e] ? dh[row * H + j] : 0.0f;
      dcv[e] = ok[e] ? dc[row * H + j] : 0.0f;
      cpv[e] = ok[e] ? cprev[row * H + j] : 0.0f;
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
      frnn::project<GH, KCH, BBP, U, RB, KS, TPB>(
          dx + ((long long)(s + 1) * B + r0) * GH, GH, nrows, Ws, hs, part);
    }
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      if (ok[e]) {
        const int j = j0 + eu[e];
        const float drec = rec ? frnn::part_sum<KS, BBP, U>(part, er[e], eu[e]) : 0.0f;
        if (s >= 0) {
          const long long row = (long long)s * B + r0 + er[e];
          const float gh = dov[e] + drec;
          const float ig = frnn::sigmoid(xv[e][0] + hpv[e][0]);
          const float fg = frnn::sigmoid(xv[e][1] + hpv[e][1]);
          const float gg = tanhf(xv[e][2] + hpv[e][2]);
          const float og = frnn::sigmoid(xv[e][3] + hpv[e][3]);
          const float cp = cpv[e];
          const float tc = tanhf(fg * cp + ig * gg);
          const float gc = dcv[e] + dcrec[e] + gh * og * (1.0f - tc * tc);
          dx[row * GH + j] = gc * gg * ig * (1.0f - ig);
          dx[row * GH + H + j] = gc * cp * fg * (1.0f - fg);
          dx[row * GH + 2 * H + j] = gc * ig * (1.0f - gg * gg);
          dx[row * GH + 3 * H + j] = gh * tc * og * (1.0f - og);
          dcrec[e] = gc * fg;
        } else {
          const long long b = r0 + er[e];
          dh0[b * H + j] = drec;
          dc0[b * H + j] = dcrec[e];
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
    """Cell-specific template arguments (none for LSTM)."""
    return []


def backward_launch(d_outs, xp, hp, prevs, w, params):
    """The backward kernel's inputs (``BACKWARD_INPUTS`` order) and output shapes
    (``BACKWARD_OUTPUTS`` but the barrier counters)."""
    L, B, GH = xp.shape
    H = GH // NUM_GATES
    return (d_outs[0], d_outs[1], xp, hp, prevs[1], w), [(L, B, GH), (B, H), (B, H)]


def backward_results(outs):
    """``(dx, dhp, d_states0)`` from the backward kernel's outputs (dhp is dx)."""
    dx, dh0, dc0 = outs
    return dx, dx, (dh0, dc0)
