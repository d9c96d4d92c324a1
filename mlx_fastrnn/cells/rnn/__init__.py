from .. import Cell
from . import naive

RNN_TANH_CELL = Cell(
    name="rnn_tanh",
    num_gates=1,
    num_states=1,
    forward_step=naive.forward_step,
    backward_step=naive.backward_step,
    backward_sequence=naive.backward_sequence,
    kernels=__name__ + ".kernels",
    persistent=__name__ + ".persistent",
    step_kwargs={"relu": False},
)
RNN_RELU_CELL = Cell(
    name="rnn_relu",
    num_gates=1,
    num_states=1,
    forward_step=naive.forward_step,
    backward_step=naive.backward_step,
    backward_sequence=naive.backward_sequence,
    kernels=__name__ + ".kernels",
    persistent=__name__ + ".persistent",
    step_kwargs={"relu": True},
)
