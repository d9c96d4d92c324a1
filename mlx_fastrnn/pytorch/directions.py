"""How the directions of one ``mlx_fastrnn.pytorch`` layer run.

On the whole-sequence CUDA kernels a bidirectional layer is ONE launch of two
problems where that pays (:func:`run_layer_directions`): the second problem
reversed inside the kernels, the input projection of both directions read and
the output written problem-interleaved, i.e. as the layer has them, so nothing
is split or joined around the launch. Elsewhere each direction runs on its own
(``ops/direction.py``: lengths and reversal inside the kernels where they take
them, gathers otherwise), on the CPU each on a stream of its own
(:func:`direction_streams`: two cores).
"""

import contextlib
import functools

import mlx.core as mx

from ..kernels.classes import Operand
from ..ops.direction import run_both_directions, run_both_in_kernels, run_direction, run_in_kernels
from ..ops.sequence import recurrence


class KernelRecurrence:
    """``recur(xp)`` of one (layer, direction) on the drop-in layers' driver;
    ``varlen(xp, lengths, rev)`` the same with lengths / reversal inside the
    whole-sequence kernels, where ``accepts_varlen(xp)``."""

    def __init__(self, cell, steps, w_hh, states0, params, given):
        self.cell, self.steps, self.w_hh = cell, steps, w_hh
        self.states0, self.params, self.given = states0, params, given

    def __call__(self, xp):
        # The driver and kernels take row-contiguous input (a reversed or split xp is a view).
        return recurrence(self.cell, self.steps, mx.contiguous(xp), self.w_hh, self.states0,
                          self.params, self.given)

    def varlen(self, xp, lengths, rev, interleaved=False):
        return recurrence(self.cell, self.steps, mx.contiguous(xp), self.w_hh, self.states0,
                          self.params, self.given, lens=lengths, rev=rev, interleaved=interleaved)

    def accepts_varlen(self, xp):
        accepts = self.steps.accepts
        # shapes and dtypes are all the planner reads: a stand-in, no array
        return accepts is not None and accepts(Operand((1, *xp.shape[1:]), xp.dtype, 3), self.w_hh, varlen=True)


def _stacked(recurs, xp, varlen):
    """Both directions as one two-problem recurrence over ``xp`` [L, B, 2 * G*H], when
    the whole-sequence kernels take it (CUDA; forward and backward plans both fit; with
    ``varlen`` the second problem reversed inside the kernels); else None."""
    fwd, rev = recurs
    accepts = fwd.steps.accepts
    if accepts is None:
        return None
    length, batch, (gates_h, hidden) = xp.shape[0], xp.shape[1], fwd.w_hh.shape
    # shapes and dtypes are all the planner reads: stand-ins, no arrays
    if not accepts(Operand((length, 2 * batch, gates_h), xp.dtype, 3), Operand((2, gates_h, hidden), mx.float32, 3),
                   varlen=varlen):
        return None
    w = mx.stack([fwd.w_hh, rev.w_hh])
    # the states not given are zero and no array (ops.sequence.recurrence: no fill)
    given = [ga or gb for ga, gb in zip(fwd.given, rev.given)]
    states0 = tuple(mx.concatenate([mx.zeros_like(b) if a is None else a, mx.zeros_like(a) if b is None else b])
                    if g else None for a, b, g in zip(fwd.states0, rev.states0, given))
    params = tuple(mx.stack([a, b]) for a, b in zip(fwd.params, rev.params))
    return KernelRecurrence(fwd.cell, fwd.steps, w, states0, params, tuple(given))


def direction_streams(directions, stackable=False):
    """The stream each direction's ops run on (None: the default). On the CPU the
    second direction gets a stream of its own: the two directions are independent
    until their outputs are joined, and MLX runs each CPU stream on its own thread,
    so they take two cores (on a 2-core CPU a bidirectional layer then costs about
    one direction). GPUs keep one stream, and so does a layer whose steps may take
    both directions in one launch (``stackable``: the CUDA kernels, where that pays)."""
    if directions == 1 or stackable or mx.default_device().type != mx.cpu:
        return (None,) * directions
    return (None, _side_stream())


@functools.lru_cache(maxsize=None)
def _side_stream():
    return mx.new_stream(mx.cpu)


def on_stream(stream):
    return contextlib.nullcontext() if stream is None else mx.stream(stream)


def _split(xp, directions):
    """[L, B, D * G*H] -> each direction's [L, B, G*H] (views)."""
    if directions == 1:
        return [xp]
    gh = xp.shape[-1] // 2
    return [xp[..., :gh], xp[..., gh:]]


def _join(results):
    """``[(output, finals)]`` per direction -> ``(output, directions concatenated on
    the last axis; finals, one [D, B, *] array per state)``."""
    if len(results) == 1:
        out, fins = results[0]
        return out, tuple(f[None] for f in fins)
    return (mx.concatenate([out for out, _ in results], axis=-1),
            tuple(mx.stack(fs) for fs in zip(*(fins for _, fins in results))))


def run_layer_directions(recurs, xp, lens, use_kernels, streams):
    """One layer: ``(output [L, B, D * H_out], finals)``, one ``[D, B, *]``
    array per state; ``xp``: the directions' input pre-activations, one
    array [L, B, D * G*H] or a list (``_RNNBase._project``). On the
    whole-sequence kernels, both directions as one two-problem launch where
    they take it, with the lengths and the reversal inside the kernels and
    ``xp`` and the output as they are (problem-interleaved: no split, no
    join); else gathers around each direction's recurrence (``ops/direction.py``),
    each direction on its stream (``streams``: :func:`direction_streams`)."""
    if use_kernels and len(recurs) == 2 and isinstance(xp, mx.array):
        both = _stacked(recurs, xp, varlen=True)
        if both is not None:
            return run_both_in_kernels(both.varlen, xp, lens)
        xps = _split(xp, 2)
        both = _stacked(recurs, xp, varlen=False)
        if both is not None:
            return _join(run_both_directions(both, xps, lens))
    xps = _split(xp, len(recurs)) if isinstance(xp, mx.array) else xp
    results = []
    for d, (recur, xp_d, stream) in enumerate(zip(recurs, xps, streams)):
        with on_stream(stream):
            inside = use_kernels and (lens is not None or d == 1) and recur.accepts_varlen(xp_d)
            results.append(run_in_kernels(recur.varlen, xp_d, lens, d == 1) if inside
                           else run_direction(recur, xp_d, lens, reverse=d == 1))
    return _join(results)
