import mlx.core as mx


def split_time(a):
    """Split a time-major [L, B, ...] array into L row-contiguous pieces [B, ...].

    One multi-output op instead of L slices (each op costs microseconds on the
    CPU, and the loop runs one per time step).
    """
    length = a.shape[0]
    flat = a.reshape(-1, *a.shape[2:])
    return mx.split(flat, length, axis=0) if length > 1 else [flat]
