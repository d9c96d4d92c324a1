"""mlx_fastrnn: drop-in fused-kernel replacements for mlx.nn.GRU, LSTM and RNN.

``MLX_RNN_IMPL`` (read once, here) picks the implementation: ``fast`` (default)
or ``legacy`` (stock mlx.nn, bit for bit). ``use_impl`` overrides it in a block.
"""

from .config import IMPL, IMPLS, current_impl, use_impl
from .layers import GRU, LSTM, RNN
from .multihead import SLSTM, MultiHeadGRU, MultiHeadLSTM, MultiHeadRNN
from .ops.flashrnn import flashrnn
from .patching import is_patched, patch, unpatch

__version__ = "0.1.0"
__all__ = ["GRU", "LSTM", "RNN", "IMPL", "IMPLS", "current_impl", "use_impl",
           "patch", "unpatch", "is_patched", "flashrnn",
           "SLSTM", "MultiHeadLSTM", "MultiHeadGRU", "MultiHeadRNN"]
