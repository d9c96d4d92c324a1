"""Resident whole-sequence kernels: the latency class (no grid-wide barrier).

When one problem's whole W_h fits in one block's shared memory (float32, or
the input's 16-bit type for half-precision inputs), a block owns ALL hidden units of a few
batch rows and runs the whole sequence alone: W_h resident in shared memory,
h_{t-1} in shared memory (never through L2), one ``__syncthreads`` per step.
Blocks never wait on each other, so the grid may be any size (no
co-residency rule to keep) and independent work (batch groups, the NP
problems of a launch: heads, directions) just adds blocks.

Block ``b``: problem ``b / NBB``, its batch rows ``[gin*BB, gin*BB + BB)``.
Thread ``(rs, j, ks)`` (``ks`` fastest, then ``j``; ``HP`` = H rounded up to a
warp) owns unit ``j`` of rows ``rs, rs + RS, ...``: all G gates of it, so the
cell's elementwise step needs no exchange between threads. Its projection
reads ``Wt[k][g*H + j]`` (consecutive units, consecutive words) and
``h[r][k]`` (a broadcast). The projection may split each unit's K over ``KSP``
threads (``ks``: every KSP-th float4 chunk of k; the partial sums meet by
warp shuffles, and thread ``ks == 0`` runs the cell and writes): KSP times the
warps, each with 1/KSP of the serial FMA chain; the backward likewise over its
K = G*H. KSP comes from the measured table (``kernel_classes_tune.py
--k-splits``); 1 otherwise.

The planner (splits, cost model, W_h in registers) is :mod:`.resident_plan`;
the device helpers :mod:`.resident_header`. The cell math is the cell's own
device code (``POINT`` in its ``persistent.py``: ``frnn_cell::forward`` /
``backward``); this module only moves data. Same driver contract and outputs
as :mod:`.persistent`.
"""

import functools

from . import contract as C
from .cuda_source import KernelSpec, launch, source_digest
from . import persistent as P
from .persistent_header import HEADER
from .resident_header import RESIDENT_HEADER
from .resident_plan import (  # noqa: F401 - the planner's names stay importable from here
    K_SPLITS,
    MAX_TPB,
    ROWS_PER_BLOCK,
    ROWS_PER_THREAD,
    WREG_MAX_FLOATS,
    WREG_MAX_TPB,
    WREG_OTHER_REGS,
    ResidentPlan,
    base_register_estimate,
    plan,
    register_estimate,
    register_floats,
    registers_fit,
    smem_bytes,
    transposed_stride,
    with_registers,
)

# --------------------------------------------------------------------------- bodies


forward_io = C.forward_io
backward_io = C.backward_io


_PROLOGUE = r"""
  const int L = x_shape[0];
  const int B = x_shape[1];  // all rows: NP problems of B / NP rows each
  const int BP = B / NP;
  const int NBB = (BP + BB - 1) / BB;  // blocks per problem (not a template constant: one kernel for every B)
  const int prob = blockIdx.x / NBB;
  const int gin = blockIdx.x - prob * NBB;
  const int r0 = prob * BP + gin * BB;
  const int nrows = frnn::imin(BB, BP - gin * BB);
  const int ks = threadIdx.x % KSP;  // the thread's share of the forward projection's K
  const int j = (threadIdx.x / KSP) % HP;
  const int rs = threadIdx.x / (KSP * HP);
  float prm[NPRM > 0 ? NPRM : 1];
#pragma unroll
  for (int q = 0; q < NPRM; ++q) {
    prm[q] = j < H ? prms[q][prob * H + j] : 0.0f;
  }
  bool ok[RPT];
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) {
    ok[rr] = ks == 0 && j < H && rs + rr * RS < nrows;  // the K-split's other threads only project
  }
"""

# The varlen bodies: this problem's direction and each of the thread's rows' length.
_VARLEN_PROLOGUE = C.row_direction() + r"""  int len[RPT];
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) {
    len[rr] = ok[rr] ? """ + C.row_length("r0 + rs + rr * RS") + r""" : 0;
  }
"""


# C++ expressions of step t for the element's row (its length is len[rr])
_pos = functools.partial(C.position, length="len[rr]")
_active = functools.partial(C.active, length="len[rr]")


@functools.lru_cache(maxsize=None)
def forward_body(cell, varlen=False):
    mod, S, NPRM = C.cell_counts(cell)
    call = "frnn_cell::forward" + getattr(mod, "POINT_TEMPLATE", "")
    return (
        C.declarations(cell, "const float* inits", "init", "float* seqs", "seq")
        + r"""  constexpr int GH = G * H;
  constexpr int GHP = GH + 1 - GH % 2;  // transposed_stride()
  constexpr int HP = TPB / (RS * KSP);
  constexpr int KS = (H + 3) / 4 * 4;
  constexpr bool H0Z = (ZS & 1) != 0;  // h_0 zero: no recurrent product at step 0
""" + _PROLOGUE + (_VARLEN_PROLOGUE if varlen else "") + r"""  constexpr int WNCH = WREG ? (KS / 4 + KSP - 1) / KSP : 1;  // the thread's chunks of K (WREG)
  float* hb;  // [2][BB][KS]: h_{t-1} and h_t
  WT* Wt;     // [KS][GHP]: W_h transposed, rows k >= H zero
  frnn::resident_carve<2 * BB * KS>(hb, Wt);
  frnn::load_w_transposed<GH, GHP, H, KS, TPB>(Wt, w + (long long)prob * GH * H);
  for (int i = threadIdx.x; i < 2 * BB * KS; i += TPB) {
    const int r = i / KS;
    const int k = i - r * KS;
    hb[i] = (!H0Z && r < nrows && k < H) ? inits[0][(long long)(r0 + r) * H + k] : 0.0f;
  }
  float st[RPT][S];
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) {
#pragma unroll
    for (int q = 0; q < S; ++q) {
      st[rr][q] = ok[rr] && !(""" + C.zero_bit("ZS", "q") + r""") ? inits[q][(long long)(r0 + rs + rr * RS) * H + j] : 0.0f;
    }
  }
  // x of step t is loaded during step t-1 (its latency hidden behind a whole step)
  float xv[RPT][G];
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) {
    const bool ld = ok[rr] && """ + _active(varlen, "0") + r""";
    const long long row = """ + C.io_row(varlen, "ld ? " + _pos(varlen, "0") + " : 0", "r0 + rs + rr * RS") + r""";
#pragma unroll
    for (int g = 0; g < G; ++g) {
      xv[rr][g] = ld ? frnn::to_f(x[row * GH + g * H + j]) : 0.0f;
    }
  }
  __syncthreads();
  float wr[WNCH][G][4];  // WREG: the thread's share of W_h (else unused)
  if (WREG) {
    frnn::resident_w_registers<WNCH, KS, GHP, H, G, KSP, WT>(Wt, j, ks, wr);
  }

  for (int t = 0; t < L; ++t) {
    const float* hcur = hb + (t & 1) * BB * KS;
    float* hnext = hb + ((t + 1) & 1) * BB * KS;
    // the next step's x raw (its own type), converted at the step's end: a conversion
    // right after the load would wait for the load before the projection
    T xn[RPT][G];
    bool xl[RPT];
    float a[RPT][G];
    const bool more = t + 1 < L;
#pragma unroll
    for (int rr = 0; rr < RPT; ++rr) {
      const bool ld = ok[rr] && more && """ + _active(varlen, "t + 1") + r""";
      const long long row = """ + C.io_row(varlen, "ld ? " + _pos(varlen, "t + 1") + " : 0", "r0 + rs + rr * RS") + r""";
      xl[rr] = ld;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        xn[rr][g] = x[ld ? row * GH + g * H + j : 0];
        a[rr][g] = 0.0f;
      }
    }
    if (!(H0Z && t == 0) && j < H) {
      if (WREG) {
        frnn::resident_project_registers<WNCH, KS, G, RPT, RS, BB, KSP>(hcur, wr, rs, ks, a);
      } else {
        frnn::resident_project<KS, GHP, H, G, RPT, RS, BB, KSP, WT>(hcur, Wt, j, rs, ks, a);
      }
    }
    if (KSP > 1 && !(H0Z && t == 0)) {  // every lane: a unit's KSP partial sums are adjacent lanes
#pragma unroll
      for (int rr = 0; rr < RPT; ++rr) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
          for (int o = KSP / 2; o > 0; o >>= 1) {
            a[rr][g] += __shfl_xor_sync(0xffffffffu, a[rr][g], o);
          }
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < RPT; ++rr) {
      if (ok[rr]) {
        const int r = rs + rr * RS;
        const long long row = (long long)t * B + r0 + r;
        if (""" + _active(varlen, "t") + r""") {  // else frozen: the state stays
#pragma unroll
          for (int g = 0; g < G; ++g) {
            hp[row * GH + g * H + j] = a[rr][g];
          }
          """ + call + r"""(xv[rr], a[rr], prm, st[rr]);
""" + (r"""          out[""" + C.io_row(varlen, _pos(varlen, "t"), "r0 + r") + r""" * H + j] = st[rr][0];
""" if varlen else "") + r"""        }
#pragma unroll
        for (int q = 0; q < S; ++q) {
          seqs[q][row * H + j] = st[rr][q];
        }
        hnext[r * KS + j] = st[rr][0];
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        xv[rr][g] = xl[rr] ? frnn::to_f(xn[rr][g]) : 0.0f;
      }
    }
    __syncthreads();
  }
"""
    )


@functools.lru_cache(maxsize=None)
def backward_body(cell, varlen=False):
    mod, S, NPRM = C.cell_counts(cell)
    call = "frnn_cell::backward" + getattr(mod, "POINT_TEMPLATE", "")
    used = C.prev_used(cell)
    prev_loads = "".join(
        f"        ps[rr][{q}] = {C.previous_state(q, 'la', 'row') if used[q] else '0.0f'};\n" for q in range(S))
    lines = (C.declarations(cell, "const float* gseqs", "gseq", "const float* prevs", "prev")
             + f"  float* dinits[S] = {{{', '.join(f'dinit{k}' for k in range(S))}}};\n")
    return lines + r"""  constexpr int GH = G * H;
  constexpr int HP = TPB / (RS * KSP);
  constexpr int KS = (GH + 3) / 4 * 4;
  constexpr int STOP = NEED_D0 ? -1 : 0;
""" + _PROLOGUE + (_VARLEN_PROLOGUE if varlen else "") + r"""  constexpr int WNCH = WREG ? (KS / 4 + KSP - 1) / KSP : 1;  // the thread's chunks of K (WREG)
  float* db;  // [2][BB][KS]: dhp_{s+1} and dhp_s
  WT* Wn;     // [KS][H]: W_h as it is, rows m >= GH zero
  frnn::resident_carve<2 * BB * KS>(db, Wn);
  frnn::load_w_natural<GH, H, KS, TPB>(Wn, w + (long long)prob * GH * H);
  for (int i = threadIdx.x; i < 2 * BB * KS; i += TPB) {
    db[i] = 0.0f;
  }
  // step s's inputs (la: the step is inside the row's length; a frozen step
  // only passes its state cotangents gs through)
  // (x raw, its own type: converted where the cell takes it, not right after the load)
  auto load_step = [&](int s, float (&gs)[RPT][S], float (&ps)[RPT][S], T (&xs)[RPT][G], bool (&xl)[RPT],
                       float (&hs)[RPT][G], float (&go)[RPT]) {
#pragma unroll
    for (int rr = 0; rr < RPT; ++rr) {
      const long long row = (long long)(s < 0 ? 0 : s) * B + r0 + rs + rr * RS;
      const bool ld = ok[rr] && s >= 0;
      const bool la = ld && """ + _active(varlen, "s") + r""";
      const long long prow = """ + C.io_row(varlen, "la ? " + _pos(varlen, "s") + " : 0", "r0 + rs + rr * RS") + r""";
#pragma unroll
      for (int q = 0; q < S; ++q) {
        gs[rr][q] = ld ? gseqs[q][row * H + j] : 0.0f;
      }
""" + prev_loads + ("      go[rr] = la ? gout[prow * H + j] : 0.0f;\n" if varlen else "      go[rr] = 0.0f;\n") + r"""      xl[rr] = la;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        xs[rr][g] = x[la ? prow * GH + g * H + j : 0];
        hs[rr][g] = la ? hp[row * GH + g * H + j] : 0.0f;
      }
    }
  };
  float dcar[RPT][S];  // cotangents of the states entering step s+1 through the cell's direct paths
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) {
#pragma unroll
    for (int q = 0; q < S; ++q) {
      dcar[rr][q] = 0.0f;
    }
  }
  __syncthreads();
  float wr[WNCH][4];  // WREG: the thread's share of W_h (else unused)
  if (WREG) {
    frnn::resident_w_registers_back<WNCH, KS, H, KSP, WT>(Wn, j, ks, wr);
  }

  // the step's inputs are loaded one step ahead (their latency hidden behind a whole step)
  float gv[RPT][S], pv[RPT][S], hv[RPT][G], ov[RPT];
  T xv[RPT][G];
  bool xlv[RPT];
  load_step(L - 1, gv, pv, xv, xlv, hv, ov);
  for (int s = L - 1; s >= STOP; --s) {
    const float* dcur = db + ((L - 1 - s) & 1) * BB * KS;
    float* dnext = db + ((L - s) & 1) * BB * KS;
    float gn[RPT][S], pn[RPT][S], hn[RPT][G], on[RPT], drec[RPT];
    T xn[RPT][G];
    bool xln[RPT];
    load_step(s - 1, gn, pn, xn, xln, hn, on);
#pragma unroll
    for (int rr = 0; rr < RPT; ++rr) {
      drec[rr] = 0.0f;
    }
    if (s < L - 1 && j < H) {
      if (WREG) {
        frnn::resident_project_back_registers<WNCH, KS, RPT, RS, BB, KSP>(dcur, wr, rs, ks, drec);
      } else {
        frnn::resident_project_back<KS, H, RPT, RS, BB, KSP, WT>(dcur, Wn, j, rs, ks, drec);
      }
    }
    if (KSP > 1 && s < L - 1) {  // every lane: a unit's KSP partial sums are adjacent lanes
#pragma unroll
      for (int rr = 0; rr < RPT; ++rr) {
#pragma unroll
        for (int o = KSP / 2; o > 0; o >>= 1) {
          drec[rr] += __shfl_xor_sync(0xffffffffu, drec[rr], o);
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < RPT; ++rr) {
      if (ok[rr]) {
        const int r = rs + rr * RS;
        if (s >= 0) {
          const long long row = (long long)s * B + r0 + r;
          float gt[S], dxg[G], dhg[G], dpv[S];
#pragma unroll
          for (int q = 0; q < S; ++q) {
            gt[q] = gv[rr][q] + dcar[rr][q] + (q == 0 ? drec[rr] : 0.0f);
          }
          if (""" + _active(varlen, "s") + r""") {
""" + ("            gt[0] += ov[rr];\n" if varlen else "") + r"""            const long long prow = """ + C.io_row(varlen, _pos(varlen, "s"), "r0 + r") + r""";
            float xf[G];
#pragma unroll
            for (int g = 0; g < G; ++g) {
              xf[g] = xlv[rr] ? frnn::to_f(xv[rr][g]) : 0.0f;
            }
            """ + call + r"""(xf, hv[rr], prm, pv[rr], gt, dxg, dhg, dpv);
#pragma unroll
            for (int g = 0; g < G; ++g) {
              dx[prow * GH + g * H + j] = dxg[g];
""" + ("              dhp[row * GH + g * H + j] = dhg[g];\n" if C.writes_dhp(cell, varlen) else "") + r"""              dnext[r * KS + g * H + j] = dhg[g];
            }
#pragma unroll
            for (int q = 0; q < S; ++q) {
              dcar[rr][q] = dpv[q];
            }
          } else {
            // A frozen step is the identity on every state. (It sends nothing back
            // through W_h: frozen steps are a row's last ones, so its dnext still
            // holds the zeros of the prologue.)
#pragma unroll
            for (int q = 0; q < S; ++q) {
              dcar[rr][q] = gt[q];
            }
          }
        } else {
          const long long b = r0 + r;
#pragma unroll
          for (int q = 0; q < S; ++q) {
            dinits[q][b * H + j] = dcar[rr][q] + (q == 0 ? drec[rr] : 0.0f);
          }
        }
      }
      ov[rr] = on[rr];
#pragma unroll
      for (int q = 0; q < S; ++q) {
        gv[rr][q] = gn[rr][q];
        pv[rr][q] = pn[rr][q];
      }
      xlv[rr] = xln[rr];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        xv[rr][g] = xn[rr][g];
        hv[rr][g] = hn[rr][g];
      }
    }
    __syncthreads();
  }
"""


@functools.lru_cache(maxsize=None)
def header_for(cell, tpb):
    """The kernel header: the shared device code, this class's, the cell's point
    functions, and ``__launch_bounds__(tpb, 1)`` for the kernel that follows (the
    tiled class's trick, ``persistent.LAUNCH_BOUNDS``, with the plan's block size):
    ptxas then keeps a thread within the registers a block of ``tpb`` threads may
    take. Without it, four rows a thread at 512-1024 threads compiled to 128-206
    registers, a block the GPU refuses to launch (NVRTC 13.0, sm_90)."""
    bounds = f"\n#undef __global__\n#define __global__ __location__(global) __launch_bounds__({tpb}, 1)\n"
    return HEADER + RESIDENT_HEADER + P.cell_module(cell).POINT + bounds


@functools.lru_cache(maxsize=512)
def kernel_spec(p, x_dtype, flag, lens=False, rev=0, interleaved=False, zero_states=0):
    """``flag``: the forward's ``ZS`` mask (an int; True: h_0 zero), the backward's
    NEED_D0; ``zero_states``: the backward's ``ZS`` mask (:mod:`.contract`).
    ``lens`` / ``rev`` / ``interleaved``: the varlen body. Cached (a launch pays a lookup)."""
    fwd = p.direction == "forward"
    varlen = bool(lens or rev or interleaved)
    header = header_for(p.cell, p.TPB)
    body = forward_body(p.cell, varlen) if fwd else backward_body(p.cell, varlen)
    inputs, outputs = forward_io(p.cell, varlen) if fwd else backward_io(p.cell, varlen)
    template = (
        ("T", x_dtype),
        ("WT", p.w_dtype),
        ("H", p.H), ("BB", p.BB), ("RS", p.RS), ("RPT", p.RPT), ("TPB", p.TPB),
        ("NP", p.NP), ("KSP", p.KSP), ("WREG", bool(p.WREG)),
        *P.flag_template(fwd, flag, zero_states),
        *((("LENS", bool(lens)), ("REV", int(rev)), ("XIL", bool(interleaved))) if varlen else ()),
        *P.cell_module(p.cell).template_extras(p.cell),
    )
    digest = source_digest(header, body)
    name = f"frnn_res_{p.cell}_{'fwd' if fwd else 'bwd'}_{digest}_s{p.smem}"
    # The plain kernels write every element of their outputs (the forward each row's
    # states and hp at every step, the backward dx / dhp at every step and the initial
    # states' cotangents when NEED_D0; without it those are never read; the barrier-counter
    # output is unused): no zero fills before them. The varlen forward leaves out past
    # each length and hp at frozen steps to the zeroing, the varlen backward its frozen
    # steps' dhp.
    return KernelSpec(name=name, input_names=inputs, output_names=outputs, header=header, body=body,
                      template=template, shared_memory=p.smem, grid=(p.nblocks * p.TPB, 1, 1),
                      threadgroup=(p.TPB, 1, 1), zero_outputs=varlen)


SYNC_WORDS = 4  # the unused barrier-counter output (kept so every class has one output list)


def select(direction, cell_name, xp, w_h, limits=None):
    dims = P._check_common(cell_name, xp, w_h)
    if dims is None:
        return None
    G, L, B, H, NP = dims
    if limits is None:
        limits = P.device_limits()
    return plan(direction, cell_name, H, B, limits, xp.dtype, NP)


def forward_launch(p, xp, w_h, states0, params, h0_is_zero, lens=None, rev=0, interleaved=False):
    """(spec, inputs, output shapes, output dtypes) of the forward, or None
    (outputs as the tiled class's: :func:`.persistent.forward_arrays`; a state
    given as None is zero)."""
    arrays = P.forward_arrays(p, xp, w_h, states0, params, lens, rev, SYNC_WORDS, interleaved)
    if arrays is None:
        return None
    flag = P.zero_states_mask(states0, h0_is_zero)
    return (kernel_spec(p, xp.dtype, flag, lens is not None, rev, interleaved), *arrays)


def backward_launch(p, d_outs, xp, hp, prevs, params, w_h, need_d_state0, lens=None, rev=0, d_out=None,
                    interleaved=False, zero_states=0):
    """As :func:`forward_launch`, for the backward (``zero_states``:
    :func:`.persistent.backward_launch`)."""
    arrays = P.backward_arrays(p, d_outs, xp, hp, prevs, params, w_h, lens, rev, d_out, SYNC_WORDS, interleaved)
    if arrays is None:
        return None
    return (kernel_spec(p, xp.dtype, need_d_state0, lens is not None, rev, interleaved, zero_states), *arrays)


def run_forward(p, xp, w_h, states0, params, h0_is_zero, lens=None, rev=0, interleaved=False):
    launch_args = forward_launch(p, xp, w_h, states0, params, h0_is_zero, lens, rev, interleaved)
    if launch_args is None:
        return None
    return tuple(launch(*launch_args)[:-1])


def run_backward(p, d_outs, xp, hp, prevs, params, w_h, need_d_state0, lens=None, rev=0, d_out=None,
                 interleaved=False, zero_states=0):
    launch_args = backward_launch(p, d_outs, xp, hp, prevs, params, w_h, need_d_state0, lens, rev, d_out,
                                  interleaved, zero_states)
    if launch_args is None:
        return None
    return P.backward_results(p.cell, launch(*launch_args), need_d_state0, P.is_varlen(lens, rev, interleaved))
