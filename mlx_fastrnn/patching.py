"""Swap mlx.nn's recurrent layers for ours, so unmodified code picks them up."""

import mlx.nn
import mlx.nn.layers
import mlx.nn.layers.recurrent as _recurrent

from . import layers

_NAMES = ("GRU", "LSTM", "RNN")
_MODULES = (mlx.nn, mlx.nn.layers, _recurrent)
_STOCK = {name: getattr(_recurrent, name) for name in _NAMES}


def patch():
    """Make ``mlx.nn.GRU/LSTM/RNN`` (and their other import paths) ours. Idempotent."""
    for module in _MODULES:
        for name in _NAMES:
            if hasattr(module, name):
                setattr(module, name, getattr(layers, name))


def unpatch():
    """Put the stock classes back."""
    for module in _MODULES:
        for name in _NAMES:
            if hasattr(module, name):
                setattr(module, name, _STOCK[name])


def is_patched():
    return mlx.nn.GRU is layers.GRU
