"""mlx_fastrnn.pytorch against PyTorch's own float64 results.

CI (no torch): tests/fixtures/torch_golden.safetensors (written by
tests/torch_golden.py) holds, per config, a torch state_dict, inputs, initial
states, lengths and torch.nn's float64 outputs/states and gradients of a fixed
loss. Each config's layer is built here, the state_dict loaded strictly, and
everything compared. With torch installed, the same comparison also runs live
on randomly drawn configs, and load_pytorch_weights reads state_dicts that
torch itself saved.

Tolerances (ours float32 vs torch float64 on the same float32 inputs):
outputs/states rtol 1e-5, atol 1e-5 * max(1, max|ref|); gradients rtol 1e-4,
atol 1e-4 * max(1, max|ref|).
"""

import json
import os
import random

import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

import mlx_fastrnn.pytorch as fastrnn_pytorch
from mlx_fastrnn.pytorch import load_pytorch_weights
from conftest import assert_close

FWD_TOL = 1e-5
GRAD_TOL = 1e-4

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "torch_golden.safetensors")
_ARRAYS, _META = mx.load(FIXTURE, return_metadata=True)
CONFIGS = {c["name"]: c for c in json.loads(_META["configs"])}


def fixture_case(name):
    """The fixture's arrays of one config, keys without the ``<name>/`` prefix."""
    pre = f"{name}/"
    return {k[len(pre):]: v for k, v in _ARRAYS.items() if k.startswith(pre)}


def state_dict_of(ref):
    return {k[len("state_dict/"):]: v for k, v in ref.items() if k.startswith("state_dict/")}


def build(cfg):
    cls = getattr(fastrnn_pytorch, cfg["mode"])
    layer = cls(cfg["input_size"], cfg["hidden_size"], **cfg["kwargs"])
    layer.eval()
    return layer


def _call(layer, cfg, x, h0=None, c0=None, lengths=None):
    lstm = cfg["mode"] == "LSTM"
    hx = (h0, c0) if lstm and h0 is not None else h0
    args = (x,) if hx is None else (x, hx)
    out, state = layer(*args) if lengths is None else layer(*args, lengths=lengths)
    if lstm:
        return {"output": out, "h_n": state[0], "c_n": state[1]}
    return {"output": out, "h_n": state}


def compare_with_reference(cfg, ref, what):
    """Build ours for ``cfg``, load ``ref``'s state_dict strictly, compare everything.

    ``ref`` is laid out as tests/torch_golden.py stores one config. All
    quantities are checked; the failure lists every one that differs.
    """
    layer = build(cfg)
    sd = state_dict_of(ref)
    layer.load_weights(list(sd.items()), strict=True)
    mx.eval(layer.parameters())
    inputs = {k: ref[k] for k in ("x", "h0", "c0") if k in ref}
    lengths = ref.get("lengths")
    cots = {k[len("cot/"):]: v for k, v in ref.items() if k.startswith("cot/")}

    errors = []

    def check(actual, key, tol):
        try:
            assert_close(actual, ref[key], f"{what} {key}", rtol=tol, atol=tol)
        except AssertionError as e:
            errors.append(str(e))

    got = _call(layer, cfg, inputs["x"], inputs.get("h0"), inputs.get("c0"), lengths)
    mx.eval(got)
    assert sorted(got) == sorted(cots), f"{what}: results {sorted(got)} vs torch's {sorted(cots)}"
    for k in sorted(got):
        check(got[k], f"expect/{k}", FWD_TOL)

    params = layer.trainable_parameters()

    def loss(p, inp):
        layer.update(p)
        res = _call(layer, cfg, inp["x"], inp.get("h0"), inp.get("c0"), lengths)
        return sum((res[k] * cots[k]).sum() for k in sorted(cots))

    try:
        gp, gi = mx.grad(loss, argnums=(0, 1))(params, inputs)
    finally:
        layer.update(params)
    gp = dict(tree_flatten(gp))
    mx.eval(gp, gi)
    assert sorted(gp) == sorted(sd), f"{what}: gradient keys {sorted(gp)} vs {sorted(sd)}"
    for k in sorted(gp):
        check(gp[k], f"grad/state_dict/{k}", GRAD_TOL)
    for k in sorted(gi):
        check(gi[k], f"grad/{k}", GRAD_TOL)
    assert not errors, "\n".join(errors)


# --------------------------------------------------------------------------- the fixture (CI)

def test_fixture_covers_the_options():
    kw = [c["kwargs"] for c in CONFIGS.values()]
    assert {c["mode"] for c in CONFIGS.values()} == {"LSTM", "GRU", "RNN"}
    assert {k.get("num_layers", 1) for k in kw} == {1, 2, 3}
    for opt in ("bidirectional", "batch_first", "proj_size"):
        assert any(k.get(opt) for k in kw), opt
    assert any(k.get("bias") is False for k in kw)
    assert any(k.get("nonlinearity") == "relu" for k in kw)
    assert any(c["batch"] is None for c in CONFIGS.values())
    assert any(c["hx"] for c in CONFIGS.values())
    with_lengths = [c for c in CONFIGS.values() if c["lengths"]]
    assert any(1 in c["lengths"] and c["seq_len"] in c["lengths"] for c in with_lengths)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_names_and_shapes_are_torchs(name):
    cfg = CONFIGS[name]
    ours = {k: tuple(v.shape) for k, v in tree_flatten(build(cfg).parameters())}
    torchs = {k: tuple(v.shape) for k, v in state_dict_of(fixture_case(name)).items()}
    assert ours == torchs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_torch_float64_fixture(name):
    compare_with_reference(CONFIGS[name], fixture_case(name), name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_torch_float64_fixture_on_the_gpu(name):
    """The fixture comparison with the GPU as the default device (whole-sequence
    kernels on CUDA, per-step cells on Metal), at the same tolerances."""
    if mx.default_device().type != mx.gpu:
        pytest.skip("the default device is not a GPU")
    compare_with_reference(CONFIGS[name], fixture_case(name), f"{name} (GPU)")


# --------------------------------------------------------------------------- live against torch

def _random_config(seed):
    import torch_golden

    rng = random.Random(seed)
    kind = rng.choice(list(torch_golden.KINDS))
    hidden = rng.randint(2, 8)
    seq_len, batch = rng.randint(1, 7), rng.randint(1, 4)
    ctor = dict(num_layers=rng.randint(1, 3), bidirectional=rng.random() < 0.5,
                batch_first=rng.random() < 0.5, bias=rng.random() < 0.7)
    if kind == "lstm" and rng.random() < 0.5:
        ctor["proj_size"] = rng.randint(1, hidden - 1)
    call = {"hx": rng.random() < 0.5}
    if rng.random() < 0.2:
        call["unbatched"] = True
    elif rng.random() < 0.6:
        lengths = [rng.randint(1, seq_len) for _ in range(batch)]
        lengths[rng.randrange(batch)] = seq_len  # torch needs max(lengths) == L for total_length
        call["lengths"] = lengths
    return torch_golden.make_config(f"random{seed}-{kind}", kind, ctor, call, input_size=rng.randint(1, 7),
                                    hidden_size=hidden, seq_len=seq_len, batch=batch)


@pytest.mark.parametrize("seed", range(6))
def test_matches_torch_float64_live(seed):
    pytest.importorskip("torch")
    pytest.importorskip("numpy")
    import torch_golden

    cfg = _random_config(seed)
    ref = {k: mx.array(v) for k, v in torch_golden.torch_reference(cfg).items()}
    compare_with_reference(cfg, ref, f"{cfg['name']} {cfg}")


# --------------------------------------------------------------------------- load_pytorch_weights

LOAD_CASE = "lstm-proj_l2_bidir_len_hx"  # every key kind: ih/hh weights, both biases, hr, _reverse
PREFIX = "encoder.rnn."


def _prefixed_source(sd):
    src = {PREFIX + k: v for k, v in sd.items()}
    src["encoder.rnn2.weight"] = mx.zeros((2, 2))  # shares the prefix's text but not its dot
    src["decoder.weight"] = mx.zeros((3,))
    src["decoder." + PREFIX + "weight_ih_l0"] = mx.zeros((1,))  # holds the prefix, not at the start
    return src


def _assert_loaded(layer, sd, what):
    got = dict(tree_flatten(layer.parameters()))
    assert sorted(got) == sorted(sd), what
    for k, v in sd.items():
        assert got[k].dtype == mx.float32, f"{what} {k}: dtype {got[k].dtype}"
        assert mx.array_equal(got[k], v).item(), f"{what} {k}: loaded values differ"


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors_pathlib", "npz", "dict"])
def test_load_pytorch_weights_from_fixture_state_dict(fmt, tmp_path):
    cfg, ref = CONFIGS[LOAD_CASE], fixture_case(LOAD_CASE)
    sd = state_dict_of(ref)
    src = _prefixed_source(sd)
    if fmt.startswith("safetensors"):
        source = tmp_path / "model.safetensors"
        mx.save_safetensors(str(source), src)
        source = source if fmt == "safetensors_pathlib" else str(source)
    elif fmt == "npz":
        source = str(tmp_path / "model.npz")
        mx.savez(source, **src)
    else:
        source = src
    layer = build(cfg)
    load_pytorch_weights(layer, source, prefix=PREFIX)
    _assert_loaded(layer, sd, fmt)
    got = _call(layer, cfg, ref["x"], ref["h0"], ref["c0"], ref["lengths"])
    for k, v in got.items():
        assert_close(v, ref[f"expect/{k}"], f"{fmt} {k}", rtol=FWD_TOL, atol=FWD_TOL)


def test_load_pytorch_weights_without_prefix_and_strictness(tmp_path):
    cfg = CONFIGS[LOAD_CASE]
    sd = state_dict_of(fixture_case(LOAD_CASE))
    layer = build(cfg)
    load_pytorch_weights(layer, dict(sd))  # prefix "" and strict by default
    _assert_loaded(layer, sd, "no prefix")

    missing = dict(sd)
    missing.pop("weight_hr_l1_reverse")
    with pytest.raises(ValueError):
        load_pytorch_weights(build(cfg), missing)
    with pytest.raises(ValueError):  # a key the module does not have, strict
        load_pytorch_weights(build(cfg), dict(sd, extra=mx.zeros((1,))))
    with pytest.raises(ValueError):  # a wrong shape, strict
        load_pytorch_weights(build(cfg), dict(sd, weight_ih_l0=mx.zeros((1, 1))))
    with pytest.raises(ValueError):  # prefix given but the keys have none: all missing
        load_pytorch_weights(build(cfg), dict(sd), prefix=PREFIX)

    # strict=False: a subset loads, the rest keeps its values
    layer = build(cfg)
    before = dict(tree_flatten(layer.parameters()))
    load_pytorch_weights(layer, {PREFIX + "weight_hh_l0": sd["weight_hh_l0"]}, prefix=PREFIX, strict=False)
    after = dict(tree_flatten(layer.parameters()))
    assert mx.array_equal(after["weight_hh_l0"], sd["weight_hh_l0"]).item()
    assert all(mx.array_equal(after[k], before[k]).item() for k in before if k != "weight_hh_l0")
    # strict=False still refuses a size mismatch (as torch's load_state_dict), before loading
    # anything, and skips keys the module does not have
    with pytest.raises(ValueError, match="weight_ih_l0"):
        load_pytorch_weights(layer, {"weight_hh_l0": sd["weight_hh_l0"] + 1, "weight_ih_l0": mx.zeros((1, 1))},
                             strict=False)
    assert mx.array_equal(layer.weight_hh_l0, sd["weight_hh_l0"]).item()
    load_pytorch_weights(layer, {"weight_hh_l0": sd["weight_hh_l0"] + 1, "not_a_key": mx.zeros((1,))},
                         strict=False)
    assert mx.array_equal(layer.weight_hh_l0, sd["weight_hh_l0"] + 1).item() and "not_a_key" not in layer


def _torch_model(kind):
    import torch

    class Net(torch.nn.Module):  # the layer sits under "rnn." in the state_dict, as in real models
        def __init__(self):
            super().__init__()
            if kind == "lstm":
                self.rnn = torch.nn.LSTM(4, 7, num_layers=2, bidirectional=True, proj_size=3)
            elif kind == "gru":
                self.rnn = torch.nn.GRU(4, 7, num_layers=3, batch_first=True, bias=False)
            else:
                self.rnn = torch.nn.RNN(4, 7, 2, "relu", bidirectional=True)
            self.head = torch.nn.Linear(7, 2)

    torch.manual_seed(0)
    return Net()


OURS_FOR_TORCH_MODEL = {
    "lstm": lambda: fastrnn_pytorch.LSTM(4, 7, num_layers=2, bidirectional=True, proj_size=3),
    "gru": lambda: fastrnn_pytorch.GRU(4, 7, num_layers=3, batch_first=True, bias=False),
    "rnn": lambda: fastrnn_pytorch.RNN(4, 7, 2, "relu", bidirectional=True),
}


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_load_pytorch_weights_real_torch_state_dict(kind, fmt, tmp_path):
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    net = _torch_model(kind)
    sd = net.state_dict()
    if fmt == "safetensors":
        st = pytest.importorskip("safetensors.torch")
        path = tmp_path / "net.safetensors"
        st.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "net.npz"
        np.savez(str(path), **{k: v.numpy() for k, v in sd.items()})

    ours = OURS_FOR_TORCH_MODEL[kind]()
    load_pytorch_weights(ours, str(path), prefix="rnn.")
    rnn_sd = {k[len("rnn."):]: mx.array(v.numpy()) for k, v in sd.items() if k.startswith("rnn.")}
    _assert_loaded(ours, rnn_sd, f"{kind} {fmt}")

    # and it computes what torch computes with those weights (both float32 here)
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t_out, t_state = net.rnn(x)
    t_h = t_state[0] if kind == "lstm" else t_state
    out, state = ours(mx.array(x.numpy()))
    h = state[0] if kind == "lstm" else state
    assert_close(out, mx.array(t_out.numpy()), f"{kind} output", rtol=FWD_TOL, atol=FWD_TOL)
    assert_close(h, mx.array(t_h.numpy()), f"{kind} h_n", rtol=FWD_TOL, atol=FWD_TOL)
