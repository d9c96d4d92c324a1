"""Load a PyTorch checkpoint into MLX modules without importing torch.

A ``state_dict`` saved by PyTorch as safetensors (``safetensors.torch.save_file``)
or as ``.npz`` (``numpy.savez(path, **{k: v.numpy() ...})``) is read with
``mx.load``; the keys under ``prefix`` are loaded into ``module`` with that
prefix removed. For the layers of :mod:`mlx_fastrnn.pytorch` the names are
PyTorch's, so no renaming is needed.
"""

import mlx.core as mx
from mlx.utils import tree_flatten


def load_pytorch_weights(module, source, prefix="", strict=True):
    """Load ``source`` (a path to ``.safetensors`` / ``.npz``, or a dict of
    name -> array) into ``module``; returns ``module``.

    Only keys starting with ``prefix`` are taken (``prefix="encoder.lstm."``
    picks one layer out of a whole model's checkpoint). A key of ``module`` whose
    array has another shape is refused either way (``ValueError``, as PyTorch's
    ``load_state_dict`` refuses a size mismatch even when not strict). With
    ``strict`` every parameter of ``module`` must be there, and nothing else
    under ``prefix`` (``ValueError`` otherwise, naming the keys); without it the
    keys ``module`` has are loaded and the rest skipped. Arrays keep the
    checkpoint's dtype unless it differs from the module's, then they are cast
    to the module's (a float64 export loads into float32 layers).
    """
    weights = mx.load(str(source)) if not isinstance(source, dict) else dict(source)
    taken = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not taken:
        raise ValueError(f"no keys start with prefix {prefix!r} (found e.g. {sorted(weights)[:5]})")
    own = dict(tree_flatten(module.parameters()))
    missing = sorted(set(own) - set(taken)) if strict else []
    extra = sorted(set(taken) - set(own)) if strict else []
    wrong = sorted(f"{k} {tuple(taken[k].shape)} (the module's: {tuple(own[k].shape)})"
                   for k in set(own) & set(taken) if tuple(own[k].shape) != tuple(taken[k].shape))
    if missing or extra or wrong:
        detail = "; ".join(
            f"{what}: {keys}" for what, keys in (("missing", missing), ("unexpected", extra),
                                                 ("wrong shape", wrong)) if keys)
        raise ValueError(f"checkpoint does not match the module ({detail})")
    items = [(k, v.astype(own[k].dtype) if v.dtype != own[k].dtype else v) for k, v in taken.items() if k in own]
    module.load_weights(items, strict=strict)
    return module
