"""sLSTM persistent kernels (whole sequence in one launch): CUDA bodies.

The math is ``naive.py``'s (gate order i, f, z, o; states y, c, n, m; the
stabilizer m, the normalizer n clamped at 1, the fresh-state rule per element,
a fresh step's forget gate capped at e^EXP_CAP, torch's half-and-half max
ties in the adjoint). Only y recurs through W_h (the block's projection, as
the LSTM's h); c, n and m never leave the block that owns their units, so they
are carried in registers across steps (and written out per step for the
backward). Shared device code and constants: ``mlx_fastrnn.kernels.persistent_header``.
"""

from ...kernels.persistent_header import ELEMENT_SLOT, block_prologue
from .naive import EXP_CAP

NUM_GATES = 4
NUM_STATES = 4
NUM_PARAMS = 0
# Four carried states and their cotangents per element: at most two elements
# per thread keep the backward's registers below the no-spill budget.
MAX_EPT = 2

# The forward step of one element from its gate pre-activations (ir, fr, zr,
# orw) and previous (cp, np_, mp): the same operations as the step kernels
# (cells/slstm/kernels.py), with the CUDA math library's log1pf for the
# log-sigmoid. Every comparison lets NaN through, as naive.py's max/min do.
_STEP = r"""
          const float lf = (fr > 0.0f ? 0.0f : fr) - log1pf(expf(-fabsf(fr))) + mp;
          const bool fresh = np_ == 0.0f;
          const float mn = fresh ? ir : ((ir != ir || ir > lf) ? ir : lf);
          const float ig = expf(ir - mn);
          const float fd = lf - mn;
          const bool capped = fd > EXP_CAP;
          const float fg = expf(capped ? EXP_CAP : fd);
          const float tz = tanhf(zr);
          const float og = frnn::sigmoid(orw);
          const float cn = fg * cp + ig * tz;
          const float u = fg * np_ + ig;
          const float nn = u < 1.0f ? 1.0f : u;
          const float yn = og * cn / nn;
""".replace("EXP_CAP", repr(float(EXP_CAP)) + "f")

# One element's step as device functions (the resident class calls them; see
# kernels/resident.py and the LSTM's for the contract): s = (y, c, n, m).
DHP_IS_DX = True
# The step from a point function's arguments (SP: the name of its state array).
_POINT_STEP = r"""  const float ir = x[0] + a[0];
  const float fr = x[1] + a[1];
  const float zr = x[2] + a[2];
  const float orw = x[3] + a[3];
  const float cp = SP[1];
  const float np_ = SP[2];
  const float mp = SP[3];
""" + _STEP
POINT = r"""
namespace frnn_cell {
__device__ __forceinline__ void forward(const float* x, const float* a, const float* prm, float* s) {
""" + _POINT_STEP.replace("SP", "s") + r"""
  s[0] = yn;
  s[1] = cn;
  s[2] = nn;
  s[3] = mn;
}
__device__ __forceinline__ void backward(const float* x, const float* a, const float* prm, const float* sp,
                                         const float* g, float* dx, float* dhp, float* dprev) {
""" + _POINT_STEP.replace("SP", "sp") + r"""
  // The adjoint of naive._adjoint; wu / wi are the tie weights (1/2 at a tie).
  const float gy = g[0];
  const float gm = g[3];
  const float fdv = capped ? 0.0f : fg;
  const float wu = u < 1.0f ? 0.0f : (u == 1.0f ? 0.5f : 1.0f);
  const float wi = fresh ? 1.0f : (ir < lf ? 0.0f : (ir == lf ? 0.5f : 1.0f));
  const float g_c = g[1] + gy * (og / nn);
  const float g_u = (g[2] - gy * (yn / nn)) * wu;
  const float di = g_c * (tz * ig) + g_u * ig;
  const float df = g_c * (cp * fdv) + g_u * (np_ * fdv);
  const float d_lf = wi * df + (1.0f - wi) * (gm - di);
  dx[0] = wi * (gm - df) + (1.0f - wi) * di;
  dx[1] = d_lf * frnn::sigmoid(-fr);
  dx[2] = g_c * (ig * (1.0f - tz * tz));
  dx[3] = gy * ((cn / nn) * og * (1.0f - og));
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    dhp[k] = dx[k];
  }
  dprev[0] = 0.0f;
  dprev[1] = g_c * fg;
  dprev[2] = g_u * fg;
  dprev[3] = d_lf;
}
}  // namespace frnn_cell
"""

FORWARD_INPUTS = ("x", "w", "y0", "c0", "n0", "m0")
FORWARD_OUTPUTS = ("y_seq", "c_seq", "n_seq", "m_seq", "hp", "sync")

FORWARD_BODY = r"""
  constexpr int G = 4;
  constexpr int N = G * U;
  constexpr int GH = G * H;
""" + block_prologue("forward", "G") + r"""  float creg[EPT], nreg[EPT], mreg[EPT], xv[EPT][G];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
""" + ELEMENT_SLOT + r"""    const long long b = r0 + er[e];
    const int j = j0 + eu[e];
    creg[e] = ok[e] ? c0[b * H + j] : 0.0f;
    nreg[e] = ok[e] ? n0[b * H + j] : 0.0f;
    mreg[e] = ok[e] ? m0[b * H + j] : 0.0f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      xv[e][g] = ok[e] ? frnn::to_f(x[b * GH + g * H + j]) : 0.0f;
    }
  }

  for (int t = 0; t < L; ++t) {
    const bool rec = !(H0Z && t == 0);
    if (rec) {
      const float* yprev = t == 0 ? y0 : y_seq + (long long)(t - 1) * B * H;
      frnn::project<H, KCH, BBP, N, RB, KS, TPB>(
          yprev + (long long)r0 * H, H, nrows, Ws, hs, part);
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
        const float ir = xv[e][0] + a[0];
        const float fr = xv[e][1] + a[1];
        const float zr = xv[e][2] + a[2];
        const float orw = xv[e][3] + a[3];
        const float cp = creg[e];
        const float np_ = nreg[e];
        const float mp = mreg[e];
""" + _STEP + r"""
        creg[e] = cn;
        nreg[e] = nn;
        mreg[e] = mn;
        y_seq[row * H + j] = yn;
        c_seq[row * H + j] = cn;
        n_seq[row * H + j] = nn;
        m_seq[row * H + j] = mn;
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

BACKWARD_INPUTS = ("dy", "dc", "dn", "dm", "x", "hp", "cprev", "nprev", "mprev", "w")
BACKWARD_OUTPUTS = ("dx", "dy0", "dc0", "dn0", "dm0", "sync")

BACKWARD_BODY = r"""
  constexpr int G = 4;
  constexpr int GH = G * H;
  constexpr int STOP = NEED_D0 ? -1 : 0;
""" + block_prologue("backward", "G") + r"""  float dcrec[EPT], dnrec[EPT], dmrec[EPT];
  float dyv[EPT], dcv[EPT], dnv[EPT], dmv[EPT], cpv[EPT], npv[EPT], mpv[EPT], xv[EPT][G], hpv[EPT][G];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
""" + ELEMENT_SLOT + r"""    dcrec[e] = 0.0f;
    dnrec[e] = 0.0f;
    dmrec[e] = 0.0f;
  }
  auto fetch = [&](int s) {
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      const long long row = (long long)s * B + r0 + er[e];
      const int j = j0 + eu[e];
      dyv[e] = ok[e] ? dy[row * H + j] : 0.0f;
      dcv[e] = ok[e] ? dc[row * H + j] : 0.0f;
      dnv[e] = ok[e] ? dn[row * H + j] : 0.0f;
      dmv[e] = ok[e] ? dm[row * H + j] : 0.0f;
      cpv[e] = ok[e] ? cprev[row * H + j] : 0.0f;
      npv[e] = ok[e] ? nprev[row * H + j] : 0.0f;
      mpv[e] = ok[e] ? mprev[row * H + j] : 0.0f;
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
      // dy_rec = dgates_{s+1} @ W_h, for this block's rows and units.
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
          const float ir = xv[e][0] + hpv[e][0];
          const float fr = xv[e][1] + hpv[e][1];
          const float zr = xv[e][2] + hpv[e][2];
          const float orw = xv[e][3] + hpv[e][3];
          const float cp = cpv[e];
          const float np_ = npv[e];
          const float mp = mpv[e];
""" + _STEP + r"""
          // The adjoint of naive._adjoint; wu / wi are the tie weights (1/2 at a tie).
          const float gy = dyv[e] + drec;
          const float gm = dmv[e] + dmrec[e];
          const float fdv = capped ? 0.0f : fg;
          const float wu = u < 1.0f ? 0.0f : (u == 1.0f ? 0.5f : 1.0f);
          const float wi = fresh ? 1.0f : (ir < lf ? 0.0f : (ir == lf ? 0.5f : 1.0f));
          const float g_c = dcv[e] + dcrec[e] + gy * (og / nn);
          const float g_u = (dnv[e] + dnrec[e] - gy * (yn / nn)) * wu;
          const float di = g_c * (tz * ig) + g_u * ig;
          const float df = g_c * (cp * fdv) + g_u * (np_ * fdv);
          const float d_lf = wi * df + (1.0f - wi) * (gm - di);
          dx[row * GH + j] = wi * (gm - df) + (1.0f - wi) * di;
          dx[row * GH + H + j] = d_lf * frnn::sigmoid(-fr);
          dx[row * GH + 2 * H + j] = g_c * (ig * (1.0f - tz * tz));
          dx[row * GH + 3 * H + j] = gy * ((cn / nn) * og * (1.0f - og));
          dcrec[e] = g_c * fg;
          dnrec[e] = g_u * fg;
          dmrec[e] = d_lf;
        } else {
          const long long b = r0 + er[e];
          dy0[b * H + j] = drec;
          dc0[b * H + j] = dcrec[e];
          dn0[b * H + j] = dnrec[e];
          dm0[b * H + j] = dmrec[e];
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
    """Cell-specific template arguments (none for sLSTM)."""
    return []


def backward_launch(d_outs, xp, hp, prevs, w, params):
    """The backward kernel's inputs (``BACKWARD_INPUTS`` order) and output shapes
    (``BACKWARD_OUTPUTS`` but the barrier counters)."""
    L, B, GH = xp.shape
    H = GH // NUM_GATES
    _, cprev, nprev, mprev = prevs
    return (*d_outs, xp, hp, cprev, nprev, mprev, w), [(L, B, GH)] + [(B, H)] * 4


def backward_results(outs):
    """``(dx, dhp, d_states0)`` from the backward kernel's outputs (dhp is dx)."""
    dx, *d0 = outs
    return dx, dx, tuple(d0)
