"""Elman RNN persistent kernels (whole sequence in one launch): CUDA bodies.

``h' = act(x + hp)`` with act = tanh, or relu when the template flag ``RELU`` is
set (``naive.py``). Shared device code and constants:
``mlx_fastrnn.kernels.persistent_header``.
"""

from ...kernels.persistent_header import ELEMENT_SLOT, block_prologue

NUM_GATES = 1
NUM_STATES = 1
NUM_PARAMS = 0

# One element's step as device functions (the resident class calls them; see
# kernels/resident.py and the LSTM's for the contract); RELU picks the activation.
DHP_IS_DX = True
POINT_TEMPLATE = "<RELU>"
POINT = r"""
namespace frnn_cell {
template <bool RELU>
__device__ __forceinline__ void forward(const float* x, const float* a, const float* prm, float* s) {
  const float pre = x[0] + a[0];
  s[0] = RELU ? (pre < 0.0f ? 0.0f : pre) : tanhf(pre);  // relu keeps NaN, as mx.maximum
}
template <bool RELU>
__device__ __forceinline__ void backward(const float* x, const float* a, const float* prm, const float* sp,
                                         const float* g, float* dx, float* dhp, float* dprev) {
  const float pre = x[0] + a[0];
  float d;
  if (RELU) {
    d = pre > 0.0f ? g[0] : 0.0f;
  } else {
    const float h = tanhf(pre);
    d = g[0] * (1.0f - h * h);
  }
  dx[0] = d;
  dhp[0] = d;
  dprev[0] = 0.0f;
}
}  // namespace frnn_cell
"""

FORWARD_INPUTS = ("x", "w", "h0")
FORWARD_OUTPUTS = ("h_seq", "hp", "sync")

FORWARD_BODY = r"""
  constexpr int N = U;
""" + block_prologue("forward", "1") + r"""  float xv[EPT];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
""" + ELEMENT_SLOT + r"""    xv[e] = ok[e] ? frnn::to_f(x[(long long)(r0 + er[e]) * H + j0 + eu[e]]) : 0.0f;
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
        const long long idx = ((long long)t * B + r0 + er[e]) * H + j0 + eu[e];
        const float a = rec ? frnn::part_sum<KS, BBP, N>(part, er[e], eu[e]) : 0.0f;
        const float pre = xv[e] + a;
        hp[idx] = a;
        h_seq[idx] = RELU ? (pre < 0.0f ? 0.0f : pre) : tanhf(pre);  // relu keeps NaN, as mx.maximum
      }
    }
    if (t + 1 < L) {
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        const long long idx = ((long long)(t + 1) * B + r0 + er[e]) * H + j0 + eu[e];
        xv[e] = ok[e] ? frnn::to_f(x[idx]) : 0.0f;
      }
      frnn::grid_barrier(counter, (unsigned)(NU * (t + 1)));
    }
  }
"""

BACKWARD_INPUTS = ("dh", "x", "hp", "w")
BACKWARD_OUTPUTS = ("dx", "dh0", "sync")

BACKWARD_BODY = r"""
  constexpr int STOP = NEED_D0 ? -1 : 0;
""" + block_prologue("backward", "1") + r"""  float dov[EPT], pre[EPT];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
""" + ELEMENT_SLOT + r"""    const long long idx = ((long long)(L - 1) * B + r0 + er[e]) * H + j0 + eu[e];
    dov[e] = ok[e] ? dh[idx] : 0.0f;
    pre[e] = ok[e] ? frnn::to_f(x[idx]) + hp[idx] : 0.0f;
  }

  for (int s = L - 1; s >= STOP; --s) {
    const bool rec = s < L - 1;
    if (rec) {
      frnn::project<H, KCH, BBP, U, RB, KS, TPB>(
          dx + ((long long)(s + 1) * B + r0) * H, H, nrows, Ws, hs, part);
    }
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      if (ok[e]) {
        const float drec = rec ? frnn::part_sum<KS, BBP, U>(part, er[e], eu[e]) : 0.0f;
        if (s >= 0) {
          const long long idx = ((long long)s * B + r0 + er[e]) * H + j0 + eu[e];
          const float gsum = dov[e] + drec;
          float d;
          if (RELU) {
            d = pre[e] > 0.0f ? gsum : 0.0f;
          } else {
            const float a = tanhf(pre[e]);
            d = gsum * (1.0f - a * a);
          }
          dx[idx] = d;
        } else {
          dh0[(long long)(r0 + er[e]) * H + j0 + eu[e]] = drec;
        }
      }
    }
    if (s > STOP) {
      if (s > 0) {
#pragma unroll
        for (int e = 0; e < EPT; ++e) {
          const long long idx = ((long long)(s - 1) * B + r0 + er[e]) * H + j0 + eu[e];
          dov[e] = ok[e] ? dh[idx] : 0.0f;
          pre[e] = ok[e] ? frnn::to_f(x[idx]) + hp[idx] : 0.0f;
        }
      }
      frnn::grid_barrier(counter, (unsigned)(NU * (L - s)));
    }
  }
"""


def template_extras(cell_name):
    """``RELU`` selects the activation."""
    return [("RELU", cell_name == "rnn_relu")]


def backward_launch(d_outs, xp, hp, prevs, w, params):
    """The backward kernel's inputs (``BACKWARD_INPUTS`` order) and output shapes
    (``BACKWARD_OUTPUTS`` but the barrier counters)."""
    L, B, H = xp.shape  # one gate: G*H = H
    return (d_outs[0], xp, hp, w), [(L, B, H), (B, H)]


def backward_results(outs):
    """``(dx, dhp, d_states0)`` from the backward kernel's outputs (dhp is dx)."""
    dx, dh0 = outs
    return dx, dx, (dh0,)
