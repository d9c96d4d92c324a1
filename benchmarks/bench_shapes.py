"""Benchmark configurations shared by recurrent_bench.py, torch_baseline.py,
test_recurrent_bench.py and report.py.

Pure Python on purpose: torch_baseline.py imports it and must never import MLX.
Also the one JSON writer every benchmark script uses, and the PyTorch set-up of
the two baselines (torch imported only when called): ``open_torch`` and
``flatten_cudnn_weights``.
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


def torch_timed_ms(torch, fn, cuda=True):
    """Milliseconds one call of ``fn`` takes: CUDA events around it on a GPU
    (waiting for the end event), wall time on the CPU."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    import time

    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# ---------------------------------------------------------------------------
# cuDNN weight flattening for the PyTorch baselines
#
# Why bfloat16 needs help (read in torch 2.13's and 2.11's sources; unchanged between them):
#
# * torch/nn/modules/rnn.py, ``RNNBase.flatten_parameters`` returns early unless every weight
#   passes ``torch.backends.cudnn.is_acceptable(fw)``; ``_apply`` (``.to(dtype=...)``) ends in
#   ``_init_flat_weights`` -> ``flatten_parameters``, so this is the only flattening torch does.
# * torch/backends/cudnn/__init__.py, ``is_acceptable`` returns False when
#   ``tensor.dtype not in CUDNN_TENSOR_DTYPES``, and ``CUDNN_TENSOR_DTYPES = {torch.half,
#   torch.float, torch.double}``: bfloat16 weights are never flattened.
# * aten/src/ATen/native/RNN.cpp, ``use_cudnn`` (since pytorch#164411, "cuDNN RNN supports
#   BFloat16 inputs since 9.13") still sends bfloat16 to cuDNN: ``bfloat16_cond = st ==
#   kBFloat16 && getCUDAHooks().supportsBFloat16RNNWithCuDNN()`` (cuDNN >= 9.13, sm >= 80).
# * aten/src/ATen/native/cudnn/RNN.cpp, ``_cudnn_impl`` -> ``try_get_weight_buf`` finds no
#   single buffer, so ``_cudnn_rnn`` warns WEIGHT_FORMAT_WARN ("RNN module weights are not part
#   of single contiguous chunk of memory ...") and allocates and fills a new weight buffer on
#   EVERY call. ``_cudnn_rnn_flatten_weight`` itself takes bfloat16 (``getCudnnDataType``,
#   ``promote_rnn_math_type`` maps it to float math), only the Python gate refuses it.
#
# So for bfloat16 we run torch's own ``flatten_parameters`` with bfloat16 admitted to
# ``CUDNN_TENSOR_DTYPES`` for the duration of the call (the set is mutated in place, since
# ``is_acceptable`` reads the module global; restored in ``finally``), and then check the
# result instead of trusting it (on the H200, 2026-12-03, it flattened every bfloat16 row).

CUDNN_FLATTEN_STATES = ("flatten_parameters", "bf16_forced", "failed", "skipped")
_WEIGHT_FORMAT_WARN = "contiguous chunk"  # part of cuDNN RNN.cpp's WEIGHT_FORMAT_WARN


def _is_weight_format_warning(w):
    return _WEIGHT_FORMAT_WARN in str(getattr(w, "message", w))


def _flat_weights(module):
    weights = list(getattr(module, "_flat_weights", None) or [])
    return [w for w in weights if w is not None]


def _walk_grad_fn_names(t, limit=64):
    """Names of the autograd nodes behind ``t`` (breadth first, at most ``limit``)."""
    names, todo, seen = [], [getattr(t, "grad_fn", None)], set()
    while todo and len(names) < limit:
        node = todo.pop(0)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.append(type(node).__name__ if not hasattr(node, "name") else node.name())
        todo.extend(n for n, _ in getattr(node, "next_functions", ()) if n is not None)
    return names


def check_cudnn_weights(torch, module):
    """``(flat, cudnn_used, why)`` for a CUDA RNN module, verified rather than trusted:
    ``flat`` = every weight a view of ONE storage and a forward call raises no
    "contiguous chunk" warning; ``cudnn_used`` = that forward ran ``_cudnn_rnn``
    (a ``CudnnRnnBackward0`` node in its graph), None when it could not be told."""
    weights = _flat_weights(module)
    try:
        storages = {w.untyped_storage().data_ptr() for w in weights}
    except Exception as e:  # private attribute or API changed: no proof of flatness
        return False, None, f"storage check failed ({type(e).__name__}: {e})"
    first = weights[0]
    x = torch.zeros(1, 1, module.input_size, device=first.device, dtype=first.dtype)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.enable_grad():
            out = module(x)[0]
    warned = any(_is_weight_format_warning(w) for w in caught)
    cudnn_used = None
    if out.requires_grad:
        cudnn_used = any("CudnnRnn" in n for n in _walk_grad_fn_names(out))
    del out
    if len(storages) != 1:
        return False, cudnn_used, f"weights in {len(storages)} storages"
    if warned:
        return False, cudnn_used, "cuDNN warned: weights not part of a single contiguous chunk"
    return True, cudnn_used, None


def flatten_cudnn_weights(torch, module):
    """Put a CUDA ``torch.nn.LSTM/GRU/RNN``'s weights into ONE cuDNN weight buffer and verify
    it; call after every device/dtype change (``.to(...)``).

    Returns ``dict(cudnn_flatten=..., cudnn_used=..., cudnn_flatten_note=...)``:
    ``cudnn_flatten`` is "flatten_parameters" (torch's own call did it: float32/float16),
    "bf16_forced" (bfloat16, which ``flatten_parameters`` skips, flattened as described in
    the comment above), "failed" (not flat: cuDNN re-packs the weights on every call, the
    old ``weights_repacked_per_call``), or "skipped"
    (not on CUDA: the CPU kernels have no cuDNN weight buffer). ``cudnn_used``: the check's
    forward ran cuDNN's RNN (None where not checked). Never raises."""
    info = dict(cudnn_flatten="skipped", cudnn_used=None, cudnn_flatten_note=None)
    weights = _flat_weights(module)
    try:
        on_cuda = bool(weights) and all(bool(w.is_cuda) for w in weights)
    except Exception:
        on_cuda = False
    if not on_cuda:
        return info
    notes = []
    try:
        module.flatten_parameters()
    except Exception as e:
        notes.append(f"flatten_parameters raised {type(e).__name__}: {e}")
    try:
        flat, info["cudnn_used"], why = check_cudnn_weights(torch, module)
    except Exception as e:
        flat, why = False, f"check raised {type(e).__name__}: {e}"
    if flat:
        info["cudnn_flatten"] = "flatten_parameters"
        return info
    notes.append(f"flatten_parameters: {why}")
    info["cudnn_flatten"] = "failed"
    if weights[0].dtype != torch.bfloat16:
        info["cudnn_flatten_note"] = "; ".join(notes)[:500]
        return info

    dtypes = torch.backends.cudnn.CUDNN_TENSOR_DTYPES  # the set is_acceptable reads
    added = torch.bfloat16 not in dtypes
    try:
        if added:
            dtypes.add(torch.bfloat16)
        try:
            module.flatten_parameters()
        finally:
            if added:
                dtypes.discard(torch.bfloat16)
        flat, cudnn_used, why = check_cudnn_weights(torch, module)
    except Exception as e:
        flat, cudnn_used, why = False, None, f"raised {type(e).__name__}: {e}"
    if flat:
        info.update(cudnn_flatten="bf16_forced", cudnn_used=cudnn_used)
        notes.append("forced via CUDNN_TENSOR_DTYPES")
    else:
        notes.append(f"forced via CUDNN_TENSOR_DTYPES: {why}")
    info["cudnn_flatten_note"] = "; ".join(notes)[:500]
    return info


def flatten_after_first_call(flat, caught):
    """``flat`` (from flatten_cudnn_weights) after the first timed call, whose warnings are
    ``caught``: a "contiguous chunk" warning there means cuDNN re-packs after all -> "failed"."""
    if flat["cudnn_flatten"] != "skipped" and any(_is_weight_format_warning(w) for w in caught):
        note = "; ".join(n for n in (flat.get("cudnn_flatten_note"), "cuDNN warned on the first timed call") if n)
        return {**flat, "cudnn_flatten": "failed", "cudnn_flatten_note": note}
    return flat


def flatten_remark(flat):
    """A result row's note on its cuDNN weights ('' when torch's own flatten_parameters did it)."""
    if flat["cudnn_flatten"] == "failed":
        return "  (weights re-packed every call)"
    note = "  (bf16 weights flattened: bf16_forced)" if flat["cudnn_flatten"] == "bf16_forced" else ""
    if flat.get("cudnn_used") is False:
        note += "  (not cuDNN: torch's own RNN kernels)"
    return note


def flatten_summary(counts):
    """{'bf16_forced': 12, ...} -> 'bf16_forced 12, ...' (the closing log line of the baselines)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no results"


# ---------------------------------------------------------------------------
# FlashRNN's benchmark grid (issue 11), shared by flashrnn_bench.py (ours, MLX) and
# flashrnn_torch.py (FlashRNN itself, PyTorch): function -> (Gx, Gr, Gb) gate counts of
# Wx [B, T, Gx, N, D], R [Gr, N, D, D], b [Gb, N, D] (FlashRNN's rnn_function_registry).

FLASHRNN_GATES = {"lstm": (4, 4, 4), "slstm": (4, 4, 4), "gru": (3, 3, 4), "elman": (1, 1, 1)}
FLASHRNN_GRID = dict(functions="slstm,lstm", heads="1,4,16", dims="64,128,256", batches="1,16,64",
                     lengths="256,1024", dtype="bfloat16,float32", modes="fwd,fwdbwd")


def add_flashrnn_grid_args(parser):
    """The grid options of both FlashRNN benchmark scripts (defaults: the issue's grid)."""
    for name, default in FLASHRNN_GRID.items():
        parser.add_argument(f"--{name}", default=default, help=f"comma-separated (default {default})")


def flashrnn_grid(args):
    """``[(dtype, function, heads, dim, batch, length, mode)]`` from the parsed grid options."""
    import itertools

    def ints(text):
        return [int(v) for v in text.split(",") if v.strip()]

    return list(itertools.product(args.dtype.split(","), args.functions.split(","), ints(args.heads),
                                  ints(args.dims), ints(args.batches), ints(args.lengths),
                                  args.modes.split(",")))
