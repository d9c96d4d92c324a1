"""PyTorch-compatible recurrent layers on mlx_fastrnn's fused path.

``LSTM``, ``GRU``, ``RNN`` take ``torch.nn``'s constructor arguments (stacked,
bidirectional, ``batch_first``, ``dropout``, ``proj_size``, ``nonlinearity``),
have its parameter names and shapes, and return what it returns; ``lengths``
gives packed-sequence semantics. ``load_pytorch_weights`` loads a PyTorch
checkpoint (safetensors / npz) into them. See ``layers.py``.
"""

from ..ops.direction import InputError
from .checkpoint import load_pytorch_weights
from .layers import GRU, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "load_pytorch_weights", "InputError"]
