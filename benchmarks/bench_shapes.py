"""Benchmark configurations shared by recurrent_bench.py, torch_baseline.py,
test_recurrent_bench.py and report.py.

Pure Python on purpose: torch_baseline.py imports it and must never import MLX.
Also the one JSON writer every benchmark script uses, and the PyTorch set-up of
the two baselines (torch imported only when called).
"""

import json
import os

LAYERS = ("GRU", "LSTM", "RNN")
MODES = ("fwd", "fwdbwd")
DTYPES = ("float32", "bfloat16", "float16")

# (name, batch, length, hidden); input size = hidden.
SHAPES = (
    ("32x40x200", 32, 40, 200),
    ("64x256x256", 64, 256, 256),
    ("16x1024x512", 16, 1024, 512),
    ("16x100x32", 16, 100, 32),
    ("1x1x640", 1, 1, 640),  # streaming: one step, carried state passed in
)
SHAPE_BY_NAME = {s[0]: s for s in SHAPES}

# The sweep (``--shapes sweep``): 32 shapes a user might bring, B 1-256, L 50-2000,
# H 32-2048, the issue-12 table's among them; run on a GPU only (the stock
# baseline is not timed on it: its big shapes take seconds per call).
SWEEP_SHAPES = tuple((f"{b}x{l}x{h}", b, l, h) for b, l, h in (
    (1, 64, 64), (1, 256, 256), (1, 500, 128), (1, 2000, 64), (1, 100, 1024),
    (4, 2000, 256), (4, 300, 48), (4, 50, 2048),
    (8, 512, 128), (8, 128, 2048), (8, 1000, 32), (8, 200, 96),
    (16, 100, 32), (16, 256, 1024), (16, 500, 64), (16, 200, 384),
    (32, 40, 200), (32, 500, 128), (32, 100, 768), (32, 1000, 64),
    (64, 100, 64), (64, 256, 256), (64, 50, 1536), (64, 400, 32),
    (128, 200, 512), (128, 100, 128), (128, 64, 48), (128, 50, 1024),
    (256, 100, 32), (256, 50, 256), (256, 200, 64), (256, 64, 128),
))
# The default on a CPU: the small shapes, so that the README's main command
# finishes in about a minute on a 2-core machine (the big ones are matmul-bound
# there, ~7 minutes with them); --full (or a GPU) runs all of SHAPES.
CPU_DEFAULT_SHAPES = tuple(SHAPE_BY_NAME[n] for n in ("32x40x200", "16x100x32", "1x1x640"))


def is_streaming(shape):
    """Length-1 shapes are benchmarked as a streaming step: the carried state is passed in."""
    return shape[2] == 1


def parse_list(text, allowed, what):
    """'a,b' -> ['a', 'b'] (case-insensitive against ``allowed``); None/'all' -> all."""
    if text is None or text.strip().lower() in ("", "all"):
        return list(allowed)
    lookup = {a.lower(): a for a in allowed}
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.lower() not in lookup:
            raise SystemExit(f"unknown {what} {item!r}; choose from: {', '.join(allowed)}")
        out.append(lookup[item.lower()])
    return out


def parse_shapes(text, default=SHAPES):
    """'32x40x200,1x1x640' -> shape tuples; an index into SHAPES (0..4) works too.

    Shapes not in SHAPES are allowed (any BxLxH, input size = H). No text gives
    ``default``; 'all' gives SHAPES, 'sweep' SWEEP_SHAPES."""
    if text is None or text.strip() == "":
        return list(default)
    if text.strip().lower() == "all":
        return list(SHAPES)
    if text.strip().lower() == "sweep":
        return list(SWEEP_SHAPES)
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item.isdigit() and int(item) < len(SHAPES):
            out.append(SHAPES[int(item)])
            continue
        try:
            b, l, h = (int(v) for v in item.split("x"))
        except ValueError:
            raise SystemExit(
                f"bad shape {item!r}: use BxLxH (e.g. 32x40x200) or an index 0..{len(SHAPES) - 1}"
            ) from None
        out.append(SHAPE_BY_NAME.get(f"{b}x{l}x{h}", (f"{b}x{l}x{h}", b, l, h)))
    return out


def write_json(path, meta, results):
    """Write ``{"meta", "results"}`` to ``path`` (atomically: a killed run keeps the
    last complete file); nothing when ``path`` is empty."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    os.replace(tmp, path)


def open_torch(tool, allow_cpu=False, cudnn_benchmark=False):
    """``(torch, device)`` for a PyTorch baseline: CUDA, or the CPU with
    ``allow_cpu``; ``None`` after printing why there is nothing to time (no
    torch, or no CUDA without ``allow_cpu``)."""
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install
        print(f"{tool}: PyTorch is not available ({type(e).__name__}: {e}); nothing to do.")
        return None
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif allow_cpu:
        device = torch.device("cpu")
    else:
        print(f"{tool}: CUDA is not available (pass --allow-cpu to time torch on the CPU); nothing to do.")
        return None
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    return torch, device
