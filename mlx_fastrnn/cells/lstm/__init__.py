from .. import Cell
from . import naive

LSTM_CELL = Cell(
    name="lstm",
    num_gates=4,
    num_states=2,
    forward_step=naive.forward_step,
    backward_step=naive.backward_step,
    backward_sequence=naive.backward_sequence,
    kernels=__name__ + ".kernels",
    persistent=__name__ + ".persistent",
)
