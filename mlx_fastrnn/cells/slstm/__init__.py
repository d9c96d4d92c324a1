"""The sLSTM cell (FlashRNN's formulation, one head): states ``(y, c, n, m)``."""

from .. import Cell
from . import naive

SLSTM_CELL = Cell(
    name="slstm",
    num_gates=4,
    num_states=4,
    forward_step=naive.forward_step,
    backward_step=naive.backward_step,
    backward_sequence=naive.backward_sequence,
    kernels=__name__ + ".kernels",
    persistent=__name__ + ".persistent",
)
