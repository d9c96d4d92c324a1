"""Recurrent cells. Each folder holds one cell's math once (``naive.py``), its fused
step kernels (``kernels.py``) and its persistent CUDA kernels (``persistent.py``);
this module only describes them to the driver."""

import functools
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx


@dataclass(frozen=True, eq=False)  # hashed by identity: one instance per cell
class Cell:
    """What the sequence driver needs to know about a cell.

    ``forward_step`` / ``backward_step`` follow the step contract in docs/DESIGN.md;
    ``backward_sequence`` is the CPU backward (vectorized over time around a
    minimal serial loop).
    ``param_grads(dhp_seq)`` turns the stacked ``dhp`` [L, B, G*H] into the
    cotangents of the cell's extra params (GRU: ``bhn``).
    """

    name: str
    num_gates: int
    num_states: int
    forward_step: Callable
    backward_step: Callable
    backward_sequence: Callable
    kernels: str  # module holding the fused steps, imported only on a GPU
    step_kwargs: dict = field(default_factory=dict)
    param_grads: Callable = lambda dhp_seq: ()
    persistent: str = None  # module holding the whole-sequence CUDA kernels (None: none)

    def __post_init__(self):
        if self.persistent is not None:
            from ..kernels import persistent

            persistent.register_cell(self.name, self.persistent)

    @functools.cached_property
    def compiled_steps(self):
        """The CPU fast path: the reference step fused by mx.compile, and the
        sequence backward. (mx.compile does not fuse under a gradient
        transformation, hence a backward built from few, large ops.)"""
        fwd = functools.partial(self.forward_step, **self.step_kwargs)
        bwd = functools.partial(self.backward_sequence, **self.step_kwargs)
        return Steps("compiled", mx.compile(fwd), backward_sequence=bwd)

    @functools.cached_property
    def reference_steps(self):
        """The reference steps unfused, one backward step at a time: the
        oracle the fused kernels are compared with."""
        kw = self.step_kwargs
        return Steps(
            "reference",
            functools.partial(self.forward_step, **kw),
            backward_step=functools.partial(self.backward_step, **kw),
        )

    @functools.lru_cache(maxsize=None)
    def kernel_steps(self, target, whole_sequence=True):
        """The fused-kernel steps for ``target`` ('metal' or 'cuda'); on CUDA,
        with ``whole_sequence``, also the persistent whole-sequence kernels
        (tried first; they decline shapes they can't run)."""
        import importlib

        module = importlib.import_module(self.kernels)
        kw = dict(self.step_kwargs, target=target)
        forward_sequence = backward_sequence = accepts = None
        if target == "cuda" and whole_sequence and self.persistent is not None:
            from ..kernels import classes

            forward_sequence = functools.partial(classes.sequence, self.name)
            backward_sequence = functools.partial(classes.backward, self.name)
            accepts = functools.partial(classes.accepts, self.name)
        return Steps(
            target + ("+sequence" if forward_sequence else ""),
            functools.partial(module.forward_step, **kw),
            backward_step=functools.partial(module.backward_step, **kw),
            forward_sequence=forward_sequence,
            backward_sequence_kernel=backward_sequence,
            accepts=accepts,
        )


@dataclass(frozen=True)
class Steps:
    """One implementation of a cell's steps: a forward step, and either a
    per-step backward (kernels) or a whole-sequence backward (CPU)."""

    name: str
    forward_step: Callable
    backward_step: Callable = None
    backward_sequence: Callable = None
    # Whole-sequence kernels, tried before the step loop; they return None
    # for shapes they can't run (the step loop runs then).
    forward_sequence: Callable = None
    backward_sequence_kernel: Callable = None
    # accepts(xp, w_h, varlen=False, kind="directions", forward_only=False): whether
    # the whole-sequence kernels take this launch, forward and backward (with
    # forward_only, heads without lengths: the forward; the backward then runs the
    # step loop of problems): NP independent problems at once when w_h is
    # [NP, G*H, H] (rows problem-major; ``kind`` says what they are: "heads" or
    # "directions"), and with varlen per-row lengths and reversed problems inside
    # the kernels; only then may a caller pass lens / rev to
    # ``ops.sequence.recurrence`` (they have no per-step form).
    accepts: Callable = None
    # Every forward / backward step takes params per unit ([H]) or per row ([rows, H],
    # broadcast like the states: a multi-problem step loop's per-problem params): MLX ops
    # broadcast, the fused GRU step kernels read bhn per row under template ROWB.


from .gru import GRU_CELL  # noqa: E402
from .lstm import LSTM_CELL  # noqa: E402
from .rnn import RNN_RELU_CELL, RNN_TANH_CELL  # noqa: E402
from .slstm import SLSTM_CELL  # noqa: E402
