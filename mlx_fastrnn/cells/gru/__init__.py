from .. import Cell
from . import naive


def _bhn_grad(dhp_seq):
    hidden = dhp_seq.shape[-1] // 3
    return (dhp_seq[..., 2 * hidden :].sum(axis=tuple(range(dhp_seq.ndim - 1))),)


GRU_CELL = Cell(
    name="gru",
    num_gates=3,
    num_states=1,
    forward_step=naive.forward_step,
    backward_step=naive.backward_step,
    backward_sequence=naive.backward_sequence,
    kernels=__name__ + ".kernels",
    persistent=__name__ + ".persistent",
    param_grads=_bhn_grad,
)
