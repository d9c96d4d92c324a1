"""Bodies of the tiled class's whole-sequence kernels, generic over the cells.

The tiled class (planning and launching: :mod:`.persistent`) splits W_h over a
co-resident grid: block ``b`` owns units ``[j0, j0+U)`` of batch rows
``[r0, r0+BB)`` and meets the other blocks of its batch group at a barrier
after every step. Per step it projects the group's rows of ``h_{t-1}``
(backward: ``dhp_{t+1}``) on its W_h slice (``frnn::project``), then runs the
cell's own point functions (``frnn_cell::forward`` / ``backward`` from
``POINT`` in the cell's ``persistent.py``) on each (row, unit) element it
owns: this module only moves data, the math is the cell's, once. The I/O and
the varlen contract (``varlen`` bodies: per-row lengths, per-problem
directions) are :mod:`.contract`'s.
"""

import functools

from . import contract as C
from .persistent_header import ELEMENT_SLOT, block_prologue

writes_dhp = C.writes_dhp
forward_io = C.forward_io
backward_io = C.backward_io


# Per element e: its row's length (the varlen bodies; without lengths every
# row is L long and reads position t).
_VARLEN_SLOT = "    len[e] = ok[e] ? " + C.row_length("r0 + er[e]") + " : 0;\n"
_VARLEN_PROLOGUE = C.row_direction() + "  int len[EPT];\n"


# C++ expressions of step t for the element's row (its length is len[e])
_pos = functools.partial(C.position, length="len[e]")
_active = functools.partial(C.active, length="len[e]")


@functools.lru_cache(maxsize=None)
def forward_body(cell, varlen=False):
    mod, S, NPRM = C.cell_counts(cell)
    call = "frnn_cell::forward" + getattr(mod, "POINT_TEMPLATE", "")
    xrow = C.io_row(varlen, "pos", "r0 + er[e]")
    # x raw (its own type) into xr, converted only where the cell takes it: a conversion
    # right after the load would wait for the load there (before the barrier / projection)
    load_x = r"""    xl[e] = ld;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      xr[e][g] = x[ld ? """ + xrow + r""" * GH + g * H + j0 + eu[e] : 0];
    }
"""
    return (
        C.declarations(cell, "const float* inits", "init", "float* seqs", "seq")
        + "  constexpr int N = G * U;\n  constexpr int GH = G * H;\n"
        + "  constexpr bool H0Z = (ZS & 1) != 0;  // h_0 zero: no recurrent product at step 0\n"
        + block_prologue("forward", "G")
        + (_VARLEN_PROLOGUE if varlen else "")
        + r"""  float st[EPT][S], xv[EPT][G], prm[EPT][NPRM > 0 ? NPRM : 1];
  T xr[EPT][G];  // the step's x as loaded (prefetched a step ahead)
  bool xl[EPT];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
""" + ELEMENT_SLOT + (_VARLEN_SLOT if varlen else "") + r"""    const long long b = r0 + er[e];
    const int j = j0 + eu[e];
#pragma unroll
    for (int q = 0; q < S; ++q) {
      st[e][q] = ok[e] && !(""" + C.zero_bit("ZS", "q") + r""") ? inits[q][b * H + j] : 0.0f;
    }
#pragma unroll
    for (int q = 0; q < NPRM; ++q) {
      prm[e][q] = ok[e] ? prms[q][pofs + j] : 0.0f;
    }
    const bool ld = ok[e] && """ + _active(varlen, "0") + r""";
    const int pos = ld ? """ + _pos(varlen, "0") + r""" : 0;
""" + load_x + r"""  }

  for (int t = 0; t < L; ++t) {
    const bool rec = !(H0Z && t == 0);
    if (rec) {
      // Frozen rows (past their length) repeat their state in seqs[0]: any row's
      // previous state is at step t - 1 of it.
      const float* hprev = t == 0 ? inits[0] : seqs[0] + (long long)(t - 1) * B * H;
      frnn::project<H, KCH, BBP, N, RB, KS, TPB, WG ? U : N, WG ? H * H : 0, WG, NCS, MMA, WLD, HLD, PIPE, HR>(
          hprev + (long long)r0 * H, H, nrows, Wsrc, hs, part, reinterpret_cast<float*>(Ws));
    }
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      if (ok[e]) {
        const int j = j0 + eu[e];
        const long long row = (long long)t * B + r0 + er[e];
        if (""" + _active(varlen, "t") + r""") {
          float a[G];
#pragma unroll
          for (int g = 0; g < G; ++g) {
            xv[e][g] = xl[e] ? frnn::to_f(xr[e][g]) : 0.0f;
            a[g] = rec ? frnn::part_sum<KS, BBP, N>(part, er[e], g * U + eu[e]) : 0.0f;
            hp[row * GH + g * H + j] = a[g];
          }
          """ + call + r"""(xv[e], a, prm[e], st[e]);
""" + (r"""          out[""" + C.io_row(varlen, _pos(varlen, "t"), "r0 + er[e]") + r""" * H + j] = st[e][0];
""" if varlen else "") + r"""        }
#pragma unroll
        for (int q = 0; q < S; ++q) {
          seqs[q][row * H + j] = st[e][q];
        }
      }
    }
    if (t + 1 < L) {
      // Prefetch the next step's inputs; the loads overlap the barrier.
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        const bool ld = ok[e] && """ + _active(varlen, "t + 1") + r""";
        const int pos = ld ? """ + _pos(varlen, "t + 1") + r""" : 0;
""" + load_x + r"""      }
      frnn::group_barrier<CLU>(counter, (unsigned)(NU * (t + 1)));
    }
  }
"""
    )


@functools.lru_cache(maxsize=None)
def backward_body(cell, varlen=False):
    mod, S, NPRM = C.cell_counts(cell)
    call = "frnn_cell::backward" + getattr(mod, "POINT_TEMPLATE", "")
    dhp_name = "dhp" if writes_dhp(cell, varlen) else "dx"
    used = C.prev_used(cell)
    prev_loads = "".join(
        f"      ps[e][{q}] = {C.previous_state(q, 'ld', 'row') if used[q] else '0.0f'};\n" for q in range(S))
    return (
        C.declarations(cell, "const float* gseqs", "gseq", "const float* prevs", "prev")
        + f"  float* dinits[S] = {{{', '.join(f'dinit{k}' for k in range(S))}}};\n"
        + "  constexpr int GH = G * H;\n  constexpr int STOP = NEED_D0 ? -1 : 0;\n"
        + block_prologue("backward", "G")
        + (_VARLEN_PROLOGUE if varlen else "")
        + r"""  float dcar[EPT][S], prm[EPT][NPRM > 0 ? NPRM : 1];  // dcar: the states' cotangents from step s+1's direct paths
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
""" + ELEMENT_SLOT + (_VARLEN_SLOT if varlen else "") + r"""#pragma unroll
    for (int q = 0; q < S; ++q) {
      dcar[e][q] = 0.0f;
    }
#pragma unroll
    for (int q = 0; q < NPRM; ++q) {
      prm[e][q] = ok[e] ? prms[q][pofs + j0 + eu[e]] : 0.0f;
    }
  }
  // Step inputs of step s into registers (issued early, used after the barrier).
  // x raw (its own type), converted where the cell takes it (not right after the load)
  float gs[EPT][S], ps[EPT][S], hs_[EPT][G], go[EPT];
  T xr[EPT][G];
  bool xl[EPT];
  auto fetch = [&](int s) {
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      const long long row = (long long)s * B + r0 + er[e];
      const int j = j0 + eu[e];
      const bool ld = ok[e] && """ + _active(varlen, "s") + r""";
      const long long prow = """ + C.io_row(varlen, "ld ? " + _pos(varlen, "s") + " : 0", "r0 + er[e]") + r""";
#pragma unroll
      for (int q = 0; q < S; ++q) {
        gs[e][q] = ok[e] ? gseqs[q][row * H + j] : 0.0f;  // frozen steps pass it through
      }
""" + prev_loads + ("      go[e] = ld ? gout[prow * H + j] : 0.0f;\n" if varlen else "") + r"""      xl[e] = ld;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        xr[e][g] = x[ld ? prow * GH + g * H + j : 0];
        hs_[e][g] = ld ? hp[row * GH + g * H + j] : 0.0f;
      }
    }
  };
  fetch(L - 1);

  for (int s = L - 1; s >= STOP; --s) {
    const bool rec = s < L - 1;
    if (rec) {
      // dh_rec = dhp_{s+1} @ W_h, for this block's rows and units (zero for
      // rows frozen at step s+1: their dhp was never written).
      frnn::project<GH, KCH, BBP, U, RB, KS, TPB, U, 0, WG, NCS, MMA, WLD, HLD, PIPE, HR>(
          """ + dhp_name + r""" + ((long long)(s + 1) * B + r0) * GH, GH, nrows, Wsrc, hs, part,
          reinterpret_cast<float*>(Ws));
    }
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      if (ok[e]) {
        const int j = j0 + eu[e];
        const float drec = rec ? frnn::part_sum<KS, BBP, U>(part, er[e], eu[e]) : 0.0f;
        if (s >= 0) {
          float gt[S];
#pragma unroll
          for (int q = 0; q < S; ++q) {
            gt[q] = gs[e][q] + dcar[e][q] + (q == 0 ? drec : 0.0f);
          }
          if (""" + _active(varlen, "s") + r""") {
""" + ("            gt[0] += go[e];\n" if varlen else "") + r"""            const long long row = (long long)s * B + r0 + er[e];
            const long long prow = """ + C.io_row(varlen, _pos(varlen, "s"), "r0 + er[e]") + r""";
            float dxg[G], dhg[G], dpv[S], xv[G];
#pragma unroll
            for (int g = 0; g < G; ++g) {
              xv[g] = xl[e] ? frnn::to_f(xr[e][g]) : 0.0f;
            }
            """ + call + r"""(xv, hs_[e], prm[e], ps[e], gt, dxg, dhg, dpv);
#pragma unroll
            for (int g = 0; g < G; ++g) {
              dx[prow * GH + g * H + j] = dxg[g];
""" + ("              dhp[row * GH + g * H + j] = dhg[g];\n" if writes_dhp(cell, varlen) else "") + r"""            }
#pragma unroll
            for (int q = 0; q < S; ++q) {
              dcar[e][q] = dpv[q];
            }
          } else {
            // A frozen step is the identity on every state.
#pragma unroll
            for (int q = 0; q < S; ++q) {
              dcar[e][q] = gt[q];
            }
          }
        } else {
          const long long b = r0 + er[e];
#pragma unroll
          for (int q = 0; q < S; ++q) {
            dinits[q][b * H + j] = dcar[e][q] + (q == 0 ? drec : 0.0f);
          }
        }
      }
    }
    if (s > STOP) {
      if (s > 0) {
        fetch(s - 1);
      }
      frnn::group_barrier<CLU>(counter, (unsigned)(NU * (L - s)));
    }
  }
"""
    )
