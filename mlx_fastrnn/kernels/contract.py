"""What every whole-sequence kernel class shares: the kernels' I/O names, the
per-cell pointer declarations, and the varlen contract (lengths and directions
inside the kernels).

I/O (both classes; ``S`` states, ``NPRM`` per-unit parameters of the cell):

* forward: ``x`` [L, B, G*H], ``w`` W_h ([NP,] G*H, H), ``init0..`` [B, H],
  (varlen: ``lens``), ``prm0..`` [NP, H] -> ``seq0..`` [L, B, H] in step
  order, ``hp`` [L, B, G*H], (varlen: ``out`` [L, B, H]), ``sync``.
* backward: ``gseq0..`` (varlen: ``gout``), ``x``, ``hp``, ``prev0..``, ``w``,
  (varlen: ``lens``), ``prm0..`` -> ``dx`` [L, B, G*H], (``dhp`` where it
  differs from ``dx``), ``dinit0..`` [B, H], ``sync``.

Zero operands are not arrays (each array a layer call makes is a graph node,
a fill on the GPU): template ``ZS`` (both directions), bit q set = initial
state q is zero. The forward then never reads ``init<q>`` (bit 0 also skips
the first step's recurrent product); the backward's ``prev<q>`` is then the
state sequence itself, the state entering step s its row s - 1 (zero at
step 0), instead of ``concat(init, seq[:-1])``. An ``init<q>`` not read is
a one-element placeholder. (A zero cotangent cannot be left out so: MLX's
autodiff hands a custom VJP a zeros array for an output nobody used.)

Varlen (the PyTorch-compatible layers): a per-row length ``lens[b]``
(template ``LENS``; every row has length L otherwise, and lengths are clamped
to 0..L so none can send an access out of bounds) and per-problem directions
(``REV``: bit p set = problem p runs from each row's end to its start). Step
``t`` of row ``b`` is active while ``t < len``; it reads position ``pos = t``
(forward) or ``len - 1 - t`` (reverse) of ``x``. Past its length a row's
states are frozen (the state sequences, in step order, repeat the last state,
so their last step is every row's final state); ``out`` is the first state in
position order with zeros past each length (what ``pad_packed_sequence``
gives). The backward reads the cotangent of ``out`` (``gout``) at the same
positions, passes a frozen step's cotangents through unchanged (a frozen step
is the identity), writes ``dx`` in position order and ``dhp`` in step order
(the order of the state sequences, for ``dW_h = sum dhp^T h_prev``), zero at
frozen steps. With ``XIL`` (template; the varlen bodies only) the position-ordered
arrays ``x``, ``out``, ``dx`` and ``gout`` are problem-interleaved: row ``b`` of
problem ``p`` at position ``pos`` is row ``(pos * BP + b) * NP + p`` (``BP = B /
NP`` rows per problem), i.e. ``[L, BP, NP * K]`` viewed as ``[L, B, K]``: a
bidirectional layer's input projection of both directions and its output with
the directions concatenated, as they are, with no split or join around the
launch. The state sequences, ``hp`` and ``dhp`` stay problem-major.
The varlen kernels' outputs start zeroed (the launch's
``init_value=0``: ``KernelSpec.zero_outputs``); they rely on it for ``out``
past each length and for the frozen steps' ``hp`` / ``dhp``.
"""

from . import persistent as P


def cell_counts(cell):
    """(the cell's persistent module, number of states, number of parameters)."""
    cs = P.CELLS[cell]
    return P.cell_module(cell), cs.num_states, cs.num_params


def writes_dhp(cell, varlen):
    """Whether the backward has a ``dhp`` output (else ``dhp`` is ``dx``)."""
    return varlen or not P.cell_module(cell).DHP_IS_DX


def forward_io(cell, varlen=False):
    _, S, NPRM = cell_counts(cell)
    inputs = ("x", "w", *(f"init{k}" for k in range(S)), *(("lens",) if varlen else ()),
              *(f"prm{k}" for k in range(NPRM)))
    outputs = (*(f"seq{k}" for k in range(S)), "hp", *(("out",) if varlen else ()), "sync")
    return inputs, outputs


def backward_io(cell, varlen=False):
    _, S, NPRM = cell_counts(cell)
    inputs = (*(f"gseq{k}" for k in range(S)), *(("gout",) if varlen else ()), "x", "hp",
              *(f"prev{k}" for k in range(S)), "w", *(("lens",) if varlen else ()),
              *(f"prm{k}" for k in range(NPRM)))
    outputs = ("dx", *(("dhp",) if writes_dhp(cell, varlen) else ()), *(f"dinit{k}" for k in range(S)), "sync")
    return inputs, outputs


def declarations(cell, decl_a, name_a, decl_b, name_b):
    """Constants G, S, NPRM and arrays of the per-state / per-parameter pointers
    (indexed with unrolled constants, so they stay kernel parameters)."""
    _, S, NPRM = cell_counts(cell)

    def arr(decl, name, n):
        return f"  {decl}[{n}] = {{{', '.join(f'{name}{k}' for k in range(n))}}};\n"
    prms = arr("const float* prms", "prm", NPRM) if NPRM else "  const float* prms[1] = {nullptr};\n"
    return (f"  constexpr int G = {P.CELLS[cell].num_gates};\n  constexpr int S = {S};\n"
            f"  constexpr int NPRM = {NPRM};\n" + arr(decl_a, name_a, S) + arr(decl_b, name_b, S) + prms)


def prev_used(cell):
    """Per state: whether the cell's backward reads the state entering a step
    (``PREV_USED`` in its ``persistent.py``; all of them when it does not say)."""
    mod, S, _ = cell_counts(cell)
    return tuple(getattr(mod, "PREV_USED", (True,) * S))


def zero_bit(mask, q):
    """C++ expression: whether bit ``q`` of template ``mask`` (``ZS``) is set."""
    return f"((({mask}) >> ({q})) & 1) != 0"


def previous_state(q, cond, row):
    """C++ expression: the state ``q`` entering step ``s`` (``row``: the step's row of the
    [L, B, H] sequences) where ``cond`` holds, else 0: ``prevs[q]`` at ``row``, or under
    ``ZS`` bit q (zero initial state, ``prevs[q]`` the state sequence) at ``row - B``,
    zero at step 0 (never an access before the array)."""
    shifted = f"({cond} && s > 0 ? prevs[{q}][({row} - B) * H + j] : 0.0f)"
    return f"({zero_bit('ZS', q)} ? {shifted} : ({cond} ? prevs[{q}][{row} * H + j] : 0.0f))"


def row_direction():
    """Body text: ``rev``, whether this block's problem ``prob`` runs reversed."""
    return "  const bool rev = prob < 31 && ((REV >> prob) & 1) != 0;\n"


def row_length(row):
    """C++ expression: the clamped length of global row ``row`` (``ok`` rows only)."""
    return f"(LENS ? min(max(lens[{row}], 0), L) : L)"


def position(varlen, t, length="len"):
    """C++ expression: the position of ``x`` step ``t`` reads (varlen: given the
    row's ``length`` and ``rev``)."""
    return f"(rev ? {length} - 1 - ({t}) : ({t}))" if varlen else f"({t})"


def io_row(varlen, pos, row):
    """C++ expression (long long): the row of ``x`` / ``out`` / ``dx`` / ``gout``
    that position ``pos`` of global (problem-major) row ``row`` is at; problem-
    interleaved under ``XIL`` (varlen bodies; they name ``prob`` and ``BP``)."""
    plain = f"(long long)({pos}) * B + {row}"
    if not varlen:
        return f"({plain})"
    # row = prob * BP + b -> b * NP + prob = row * NP - prob * (B - 1), as B = BP * NP
    return f"(XIL ? (long long)({pos}) * B + (long long)({row}) * NP - (long long)prob * (B - 1) : {plain})"


def active(varlen, t, length="len"):
    """C++ expression: whether step ``t`` is inside the row's length."""
    return f"({t}) < {length}" if varlen else "true"
