"""One direction of one recurrent layer over a time-major sequence, with per-row
lengths: what the PyTorch-compatible layers (``mlx_fastrnn.pytorch``) run for
each (layer, direction).

Variable lengths mean what ``pack_padded_sequence(..., enforce_sorted=False)``
and ``pad_packed_sequence(total_length=L)`` give in PyTorch:

* forward direction: a row's outputs past its length are zero and its final
  state is the one after its last valid step. The recurrence runs over all L
  steps; steps past a row's length never reach its earlier steps (the
  recurrence is causal), so this is exactly freezing the state there, for the
  outputs and for every gradient.
* reverse direction: each row is reversed within its own length (one gather:
  step t reads position ``len - 1 - t``; the padding stays where it is), run
  forwards, and gathered back; its final state is again the one after step
  ``len - 1``, i.e. after position 0.

Where the whole-sequence kernels take them (``steps.accepts(..., varlen=True)``),
the lengths and the reversal run inside the kernels instead (:func:`run_in_kernels`,
:func:`run_both_in_kernels`): a row's state is frozen past its length and a
reversed row reads position ``len - 1 - t`` at step t, so there is no gather
and no masking around the launch. Otherwise :func:`run_direction` does it
with gathers around the recurrence.

Padded input positions are zeroed by the caller before the first layer, so
whatever the padding holds (NaN, inf) never reaches an output or a gradient.
"""

from typing import NamedTuple

import mlx.core as mx


class InputError(ValueError, RuntimeError):
    """Bad input to a PyTorch-compatible layer. A ``ValueError`` as MLX raises,
    and a ``RuntimeError`` as PyTorch raises for the same input, so code written
    for either catches it."""


class Lengths(NamedTuple):
    """Per-row lengths of a padded time-major batch, and the indices built from them
    (for the first ``steps`` positions: no row reaches past ``max(lengths)``, so
    the recurrence runs that many steps and the rest of the output is zero)."""

    steps: int  # max(lengths)
    lengths: mx.array  # int32 [B]
    valid: mx.array  # bool [L, B, 1]: step t of row b is within its length
    reverse_index: mx.array  # int32 [L, B, 1]: position read at step t, reversed within the length
    last: mx.array  # int32 [1, B, 1]: lengths - 1
    both_directions: mx.array  # int32 [2B]: the lengths twice (a two-direction launch's rows)


def prepare_lengths(lengths, length, batch):
    """Validate ``lengths`` (int array / sequence of shape [batch], each in
    1..length) before anything runs. ``None`` when every row is full (nothing
    to mask); raises :class:`InputError` for bad lengths. (Reading the bounds
    waits for ``lengths`` to be computed, as PyTorch's packing does.)"""
    if not isinstance(lengths, mx.array):
        try:
            lengths = mx.array(lengths)
        except (TypeError, ValueError) as e:
            raise InputError(f"lengths must be an integer array of shape ({batch},); got {lengths!r}") from e
    if not mx.issubdtype(lengths.dtype, mx.integer):
        raise InputError(f"lengths must be an integer array, got dtype {lengths.dtype}")
    if tuple(lengths.shape) != (batch,):
        raise InputError(
            f"lengths must have shape ({batch},) (one length per sequence), got {tuple(lengths.shape)}"
        )
    if batch == 0:
        raise InputError("lengths of an empty batch (B = 0): PyTorch cannot pack empty tensors either")
    lo, hi = (int(v) for v in mx.stack([lengths.min(), lengths.max()]).tolist())
    if lo <= 0:
        raise InputError(
            f"every length must be > 0 (PyTorch's pack_padded_sequence refuses empty sequences); got {lo}"
        )
    if hi > length:
        raise InputError(f"lengths must be <= the sequence length {length}; got {hi}")
    if lo == length:
        return None
    lengths = lengths.astype(mx.int32)
    t = mx.arange(hi, dtype=mx.int32)[:, None]
    valid = t < lengths[None, :]
    reverse_index = mx.where(valid, lengths[None, :] - 1 - t, t)
    return Lengths(hi, lengths, valid[..., None], reverse_index[..., None], (lengths - 1)[None, :, None],
                   mx.concatenate([lengths, lengths]))


def truncate(x, lens):
    """The first ``lens.steps`` positions of a time-major ``x`` (all of it without lengths)."""
    return x if lens is None or lens.steps == x.shape[0] else x[: lens.steps]


def pad_time(a, lens, length):
    """``a`` [steps, ...] zero-padded to ``length`` positions (undoes :func:`truncate`)."""
    if lens is None or lens.steps == length:
        return a
    return mx.concatenate([a, mx.zeros((length - lens.steps, *a.shape[1:]), a.dtype)], axis=0)


def reverse_time(a, lens):
    """``a`` [L, B, K] with each row reversed in time (within its length when
    ``lens`` is given). Its own inverse."""
    if lens is None:
        return a[::-1]
    return mx.take_along_axis(a, lens.reverse_index, axis=0)


def final_step(seq):
    """``seq[-1]`` as a view (an integer index is a gather in MLX: a kernel of its own)."""
    return seq[-1:].squeeze(0)


def last_step(seq, lens):
    """The [B, K] state after each row's last valid step of ``seq`` [L, B, K]."""
    if lens is None:
        return final_step(seq)
    return mx.take_along_axis(seq, lens.last, axis=0).squeeze(0)


def run_direction(recur, xp, lens, reverse):
    """Run one direction.

    Args:
        recur: ``recur(xp) -> seqs``: the recurrence over a time-major ``xp``,
            returning each state's sequence [L, B, *] in step order (the first
            is the output).
        xp: [L, B, G*H] input pre-activations of this direction (with
            ``lens``: its first ``lens.steps`` positions, see :func:`truncate`).
        lens: a :class:`Lengths` or ``None``.
        reverse: run from each row's end to its start.

    Returns:
        ``(output [L, B, H_out] in position order, zero past each length,
        final states (each [B, *]))``.
    """
    if reverse:
        xp = reverse_time(xp, lens)
    return _finish(recur(xp), lens, reverse)


def run_both_directions(recur, xps, lens):
    """Both directions as ONE recurrence of two problems (the whole-sequence
    kernels run them in one launch): the forward ``xps[0]`` and the reversed
    ``xps[1]`` stacked on the row axis; ``recur`` runs the stacked [L, 2B, G*H].
    Returns ``[(output, finals), (output, finals)]`` as :func:`run_direction`."""
    batch = xps[0].shape[1]
    seqs = recur(mx.concatenate([xps[0], reverse_time(xps[1], lens)], axis=1))
    return [_finish([s[:, d * batch:(d + 1) * batch] for s in seqs], lens, d == 1) for d in range(2)]


def _finish(seqs, lens, reverse):
    finals = tuple(last_step(s, lens) for s in seqs)
    out = seqs[0]
    if reverse:
        out = reverse_time(out, lens)
    if lens is not None:
        out = mx.where(lens.valid, out, mx.zeros((), out.dtype))
    return out, finals


def run_in_kernels(recur_varlen, xp, lens, reverse):
    """:func:`run_direction`'s results, with the lengths and the reversal inside
    the whole-sequence kernels. ``recur_varlen(xp, lengths, rev) -> (out,
    seqs)`` runs ``ops.sequence.recurrence`` with ``lens`` / ``rev``."""
    out, seqs = recur_varlen(xp, None if lens is None else lens.lengths, 1 if reverse else 0)
    return out, tuple(final_step(s) for s in seqs)


def run_both_in_kernels(recur_varlen, xp, lens):
    """Both directions as ONE launch of two problems, the second reversed
    (``rev`` bit 1), with ``xp`` [L, B, 2 * G*H] (both directions' input
    projections) as it is: the kernels read it problem-interleaved and write
    the output so, i.e. with the directions concatenated on the last axis, so
    there is no split, gather or join around the launch.
    Returns ``(output [L, B, 2 * H], finals)``, one [2, B, *] array per state."""
    length, batch = xp.shape[0], xp.shape[1]
    lengths = None if lens is None else lens.both_directions
    out, seqs = recur_varlen(xp.reshape(length, 2 * batch, xp.shape[-1] // 2), lengths, 0b10, interleaved=True)
    return out.reshape(length, batch, -1), tuple(s[-1:].reshape(2, batch, -1) for s in seqs)
