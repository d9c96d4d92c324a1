"""Cases for tests/test_flashrnn.py, FlashRNN's vanilla backend as their
reference, and the generator of the golden fixture (a CI without torch tests
against that).

    python tests/flashrnn_golden.py   # needs torch and flashrnn==1.0.8 (pip install --no-deps)

writes tests/fixtures/flashrnn_golden.safetensors: for every case in
GOLDEN_CASES its float32 inputs (Wx, R, b, states when given), the float32
cotangents of the two results (d_seq, d_last) and the vanilla backend's
float64 results and gradients (seq, last, dWx, dR, db, dstates; stored as
their bits in uint32, as MLX's safetensors writer takes no float64, and read
back by :func:`read_fixture`). The case list is in the file's metadata.

Inputs are float32 numbers (the vanilla backend runs them in float64), so the
reference is exact for what flashrnn() is given. Reading the fixture needs
mlx only; making cases needs numpy, the reference torch and flashrnn.
"""

import json
import os

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "flashrnn_golden.safetensors")

# function -> (Gx, Gr, Gb, S), FlashRNN's rnn_function_registry
GATES = {"lstm": (4, 4, 4, 2), "gru": (3, 3, 4, 1), "elman": (1, 1, 1, 1), "slstm": (4, 4, 4, 4)}

# What the initial states are:
#   none     states=None (zeros; sLSTM: the fresh first step)
#   random   normal (sLSTM: n >= 1, so no fresh step)
#   zeros    given as zeros (sLSTM: fresh, and the tie of max(f n + i, 1) at 1)
#   partial  sLSTM: n zero in batch row 0 only (vanilla's whole-tensor test says: not fresh)
#   tie      sLSTM: i_raw == log_sigmoid(f_raw) + m at t = 0 (the max's tie)
#   fresh_low sLSTM, states=None, i_raw = -200 at t = 0 (vanilla's float32 f overflows there)
F64_SUFFIX = ":f64"  # a float64 array stored as its bits, uint32 [..., 2 * last]

STATE_KINDS = ("none", "random", "zeros", "partial", "tie", "fresh_low")


def make_case(function, batch, length, heads, dim, states="none", seed=0):
    """A case's float32 inputs and cotangents (numpy)."""
    import numpy as np

    gx, gr, gb, ns = GATES[function]
    rng = np.random.default_rng([seed, batch, length, heads, dim, STATE_KINDS.index(states),
                                 list(GATES).index(function)])
    f32 = np.float32
    case = dict(
        Wx=rng.standard_normal((batch, length, gx, heads, dim)).astype(f32),
        # ~1/sqrt(D) keeps the recurrence from saturating over 64 steps
        R=(rng.standard_normal((gr, heads, dim, dim)) / np.sqrt(dim)).astype(f32),
        b=rng.standard_normal((gb, heads, dim)).astype(f32),
        states=None,
        d_seq=rng.standard_normal((ns, batch, length, heads, dim)).astype(f32),
        d_last=rng.standard_normal((ns, batch, 1, heads, dim)).astype(f32),
    )
    shape = (ns, batch, 1, heads, dim)
    if states == "random":
        s = rng.standard_normal(shape).astype(f32)
        if function == "slstm":
            s[2] = 1 + np.abs(s[2])
        case["states"] = s
    elif states == "zeros":
        case["states"] = np.zeros(shape, f32)
    elif states in ("partial", "tie"):
        _need_slstm(function, states)
        s = rng.standard_normal(shape).astype(f32)
        s[2] = 1 + np.abs(s[2])
        if states == "partial":
            s[2, 0] = 0.0
        else:
            # y0 = 0 makes Ry = 0 at t = 0; b_i = b_f = 0, Wx_i = m0 and
            # Wx_f = 200 (log_sigmoid(200) = -0 in float32 and float64) give
            # i_raw == lf == m0 exactly.
            s[0] = 0.0
            s[3] = 0.5
            case["Wx"][:, 0, 0] = 0.5
            case["Wx"][:, 0, 1] = 200.0
            case["b"][:2] = 0.0
        case["states"] = s
    elif states == "fresh_low":
        _need_slstm(function, states)
        case["Wx"][:, 0, 0] = -200.0
    return case


def _need_slstm(function, states):
    if function != "slstm":
        raise ValueError(f"states kind {states!r} is for slstm only")


def vanilla_reference(case, function, dtype="float64"):
    """FlashRNN 1.0.8 ``backend="vanilla"`` on the case, in ``dtype``: the results
    and the gradients of ``<seq, d_seq> + <last, d_last>`` (numpy, that dtype)."""
    import torch
    from flashrnn import flashrnn as flashrnn_torch

    tdtype = getattr(torch, dtype)
    names = ["Wx", "R", "b"] + (["states"] if case["states"] is not None else [])
    leaves = {k: torch.tensor(case[k], dtype=tdtype, requires_grad=True) for k in names}
    # One thread: these ops are tiny, and a second one only contends (a
    # [4, 1, 16] x [4, 16, 64] bmm took 15 ms with two threads on two cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq, last = flashrnn_torch(leaves["Wx"], leaves["R"], leaves["b"],
                                   states=leaves.get("states"), function=function,
                                   backend="vanilla", dtype=dtype)
        loss = (seq * torch.tensor(case["d_seq"], dtype=tdtype)).sum() + \
            (last * torch.tensor(case["d_last"], dtype=tdtype)).sum()
        loss.backward()
    finally:
        torch.set_num_threads(threads)
    ref = {"seq": seq.detach().numpy(), "last": last.detach().numpy()}
    ref.update({"d" + k: leaves[k].grad.numpy() for k in names})
    return ref


# (function, B, T, N, D, states): small, and every special case of the sLSTM.
GOLDEN_CASES = [
    *[(f, 2, 5, 2, 3, "none") for f in GATES],
    *[(f, 3, 4, 1, 5, "random") for f in GATES],
    *[(f, 1, 3, 4, 2, "random") for f in GATES],
    ("lstm", 2, 3, 2, 3, "zeros"),
    ("gru", 2, 3, 2, 3, "zeros"),
    ("slstm", 2, 4, 2, 3, "zeros"),
    ("slstm", 2, 4, 2, 3, "partial"),
    ("slstm", 2, 4, 2, 3, "tie"),
    ("slstm", 2, 4, 2, 3, "fresh_low"),
]


def write_fixture(path=FIXTURE):
    import mlx.core as mx
    import numpy as np

    arrays = {}
    for index, spec in enumerate(GOLDEN_CASES):
        case = make_case(*spec)
        ref = vanilla_reference(case, spec[0])
        for key, value in (*case.items(), *ref.items()):
            if value is None:
                continue
            if value.dtype == np.float64:  # safetensors in MLX has no float64: its bits as uint32
                key, value = key + F64_SUFFIX, np.ascontiguousarray(value).view(np.uint32)
            arrays[f"{index}/{key}"] = mx.array(value)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mx.save_safetensors(path, arrays, metadata={"cases": json.dumps(GOLDEN_CASES),
                                                "source": "flashrnn==1.0.8 backend=vanilla, float64"})
    return path


def read_fixture(path=FIXTURE):
    """``[(spec, arrays)]``: per case its spec and a dict of mx arrays."""
    import mlx.core as mx

    arrays, metadata = mx.load(path, return_metadata=True)
    out = []
    for index, spec in enumerate(json.loads(metadata["cases"])):
        prefix = f"{index}/"
        case = {}
        for key, value in arrays.items():
            if key.startswith(prefix):
                key = key[len(prefix):]
                if key.endswith(F64_SUFFIX):
                    key, value = key[: -len(F64_SUFFIX)], value.view(mx.float64, stream=mx.cpu)  # float64: CPU only
                case[key] = value
        out.append((tuple(spec), case))
    return out


if __name__ == "__main__":
    print(write_fixture(), os.path.getsize(FIXTURE), "bytes")
