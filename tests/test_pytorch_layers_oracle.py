"""mlx_fastrnn.pytorch's LSTM/GRU/RNN against an oracle written here in plain MLX ops.

No torch needed (runs in every CI). The oracle below spells out torch.nn's cell
equations step by step in mlx ops, float32, with explicit per-sequence masking
for ``lengths`` (the state freezes once ``t >= length``; the output is zero
there; the reverse direction runs over each sequence reversed within its own
length), so it means exactly pack_padded_sequence -> layer -> pad_packed_sequence.
Its gradients are plain MLX autodiff of the same ops. It was checked against
torch float64 by hand (see tests/torch_golden.py for the fixture-based check).

Tolerances: outputs/states rtol 1e-5, atol 1e-5 * max(1, max|ref|); gradients
rtol 1e-4, atol 1e-4 * max(1, max|ref|) (float32 both sides; a fused kernel
sums in another order, and the weight gradients are long sums over time).
"""

import math
import re
import warnings

import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_fastrnn.pytorch import GRU, LSTM, RNN
from conftest import assert_close

FWD_TOL = 1e-5
GRAD_TOL = 1e-4

# kind -> (class, extra constructor kwargs, gates per hidden unit)
KINDS = {
    "lstm": (LSTM, {}, 4),
    "gru": (GRU, {}, 3),
    "rnn_tanh": (RNN, {}, 1),
    "rnn_relu": (RNN, {"nonlinearity": "relu"}, 1),
}

I, H, P, L, B = 5, 6, 3, 6, 4  # input, hidden, proj, sequence length, batch
LENGTHS = [6, 1, 4, 3]          # unsorted; one equal to L and one of 1

# Options alone, then combined. "unbatched" is (L, I) input; "hx" gives an initial
# state; "dropout_eval" builds with dropout>0 and calls .eval() (must equal no dropout).
CONFIGS = {
    "base": {},
    "layers2": dict(num_layers=2),
    "layers3": dict(num_layers=3),
    "bidir": dict(bidirectional=True),
    "batch_first": dict(batch_first=True),
    "no_bias": dict(bias=False),
    "unbatched": dict(unbatched=True),
    # torch ignores batch_first for unbatched input
    "unbatched_batch_first": dict(unbatched=True, batch_first=True),
    "hx": dict(hx=True),
    "lengths": dict(lengths=LENGTHS),
    "dropout_eval": dict(num_layers=2, dropout=0.5),
    "l3_bidir_bf_len_hx": dict(num_layers=3, bidirectional=True, batch_first=True, lengths=LENGTHS, hx=True),
    "l2_bidir_nobias_unbatched_hx": dict(num_layers=2, bidirectional=True, bias=False, unbatched=True, hx=True),
    "l2_bidir_len_dropout_eval": dict(num_layers=2, bidirectional=True, lengths=LENGTHS, dropout=0.3),
    "l2_bf_nobias_len": dict(num_layers=2, batch_first=True, bias=False, lengths=LENGTHS),
}
LSTM_CONFIGS = {
    "proj": dict(proj_size=P),
    "proj_l2_bidir_len_hx": dict(proj_size=P, num_layers=2, bidirectional=True, lengths=LENGTHS, hx=True),
    "proj_nobias_unbatched_hx": dict(proj_size=P, bias=False, unbatched=True, hx=True),
    "proj_l3_bidir_bf": dict(proj_size=P, num_layers=3, bidirectional=True, batch_first=True),
}
CASES = [(k, c) for k in KINDS for c in CONFIGS] + [("lstm", c) for c in LSTM_CONFIGS]

CTOR_KEYS = ("num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size")


def rand(shape, seed, scale=1.0):
    return mx.random.normal(shape, key=mx.random.key(seed)) * scale


# --------------------------------------------------------------------------- the oracle

def _cell(kind, p, sfx, x_t, h, c):
    """One torch.nn cell step (gate order: LSTM i,f,g,o; GRU r,z,n)."""
    gi = x_t @ p[f"weight_ih_{sfx}"].T
    gh = h @ p[f"weight_hh_{sfx}"].T
    if f"bias_ih_{sfx}" in p:
        gi = gi + p[f"bias_ih_{sfx}"]
        gh = gh + p[f"bias_hh_{sfx}"]
    if kind == "lstm":
        i, f, g, o = mx.split(gi + gh, 4, axis=-1)
        c = mx.sigmoid(f) * c + mx.sigmoid(i) * mx.tanh(g)
        h = mx.sigmoid(o) * mx.tanh(c)
        if f"weight_hr_{sfx}" in p:
            h = h @ p[f"weight_hr_{sfx}"].T
        return h, c
    if kind == "gru":
        ir, iz, in_ = mx.split(gi, 3, axis=-1)
        hr, hz, hn = mx.split(gh, 3, axis=-1)
        r = mx.sigmoid(ir + hr)
        z = mx.sigmoid(iz + hz)
        n = mx.tanh(in_ + r * hn)  # torch: b_hn sits inside r * (...)
        return (1 - z) * n + z * h, c
    pre = gi + gh
    return (mx.tanh(pre) if kind == "rnn_tanh" else nn.relu(pre)), c


def _run_direction(kind, p, sfx, xs, h, c, lengths, reverse):
    """xs (L, B, In); lengths (B,) int. Returns (out (L, B, H_out), h_last, c_last)."""
    steps = xs.shape[0]
    t = mx.arange(steps)[:, None]
    if reverse:
        # reverse each sequence within its own length; padding stays put. The map is
        # its own inverse, so the same gather puts the outputs back in time order.
        idx = mx.where(t < lengths[None], lengths[None] - 1 - t, t)
        xs = mx.take_along_axis(xs, mx.broadcast_to(idx[..., None], xs.shape), axis=0)
    outs = []
    for s in range(steps):
        h_new, c_new = _cell(kind, p, sfx, xs[s], h, c)
        valid = (s < lengths)[:, None]
        h = mx.where(valid, h_new, h)  # state frozen past the sequence's end
        c = mx.where(valid, c_new, c)
        outs.append(mx.where(valid, h_new, 0.0))
    out = mx.stack(outs)
    if reverse:
        out = mx.take_along_axis(out, mx.broadcast_to(idx[..., None], out.shape), axis=0)
    return out, h, c


def oracle(kind, cfg, p, x, h0=None, c0=None, lengths=None, zero_between_layers=False):
    """torch.nn semantics in mlx ops -> {"output", "h_n"[, "c_n"]}.

    ``zero_between_layers`` stands for train-mode dropout with p=1 (every input of
    layers >= 1 zeroed; torch's dropout(p=1) returns zeros).
    """
    nl = cfg.get("num_layers", 1)
    nd = 2 if cfg.get("bidirectional") else 1
    hout = cfg.get("proj_size", 0) or H
    unbatched = x.ndim == 2
    if unbatched:
        x = x[:, None]
        h0 = None if h0 is None else h0[:, None]
        c0 = None if c0 is None else c0[:, None]
    elif cfg.get("batch_first"):
        x = x.transpose(1, 0, 2)
    steps, batch = x.shape[:2]
    lengths = mx.full((batch,), steps, dtype=mx.int32) if lengths is None else mx.array(lengths, dtype=mx.int32)
    if h0 is None:
        h0 = mx.zeros((nl * nd, batch, hout))
    if c0 is None:
        c0 = mx.zeros((nl * nd, batch, H))
    inp, hn, cn = x, [], []
    for layer in range(nl):
        if layer > 0 and zero_between_layers:
            inp = mx.zeros_like(inp)
        outs = []
        for d in range(nd):
            k = layer * nd + d  # torch's h_n index
            sfx = f"l{layer}" + ("_reverse" if d else "")
            o, h, c = _run_direction(kind, p, sfx, inp, h0[k], c0[k], lengths, reverse=d == 1)
            outs.append(o)
            hn.append(h)
            cn.append(c)
        inp = mx.concatenate(outs, axis=-1)
    res = {"output": inp, "h_n": mx.stack(hn), "c_n": mx.stack(cn)}
    if unbatched:
        res = {k: v[:, 0] for k, v in res.items()}
    elif cfg.get("batch_first"):
        res["output"] = res["output"].transpose(1, 0, 2)
    if kind != "lstm":
        del res["c_n"]
    return res


# --------------------------------------------------------------------------- ours, driven the same way

def build(kind, cfg, seed=0, input_size=I, hidden_size=H):
    cls, extra, _ = KINDS[kind]
    kw = dict(extra, **{k: cfg[k] for k in CTOR_KEYS if k in cfg})
    mx.random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dropout with one layer: tested apart
        layer = cls(input_size, hidden_size, **kw)
    if cfg.get("dropout", 0) > 0:
        layer.eval()
    mx.eval(layer.parameters())
    return layer


def run_ours(kind, layer, x, h0=None, c0=None, lengths=None):
    hx = (h0, c0) if kind == "lstm" and h0 is not None else h0
    args = (x,) if hx is None else (x, hx)
    out, state = layer(*args) if lengths is None else layer(*args, lengths=lengths)
    if kind == "lstm":
        return {"output": out, "h_n": state[0], "c_n": state[1]}
    return {"output": out, "h_n": state}


def make_inputs(kind, cfg, seed=10):
    nl = cfg.get("num_layers", 1)
    nd = 2 if cfg.get("bidirectional") else 1
    hout = cfg.get("proj_size", 0) or H
    lead = () if cfg.get("unbatched") else (B,)
    x = rand((L, *lead, I) if not cfg.get("batch_first") or not lead else (B, L, I), seed)
    inputs = {"x": x}
    if cfg.get("hx"):
        inputs["h0"] = rand((nl * nd, *lead, hout), seed + 1, 0.5)
        if kind == "lstm":
            inputs["c0"] = rand((nl * nd, *lead, H), seed + 2, 0.5)
    return inputs


def cotangents(res, seed=100):
    return {k: rand(v.shape, seed + i) for i, (k, v) in enumerate(sorted(res.items()))}


def _loss(res, cots):
    return sum((res[k] * cots[k]).sum() for k in sorted(cots))


def oracle_grads(kind, cfg, params, inputs, cots, lengths):
    def f(p, inp):
        return _loss(oracle(kind, cfg, p, inp["x"], inp.get("h0"), inp.get("c0"), lengths), cots)

    gp, gi = mx.grad(f, argnums=(0, 1))(params, inputs)
    return {**{f"param {k}": v for k, v in gp.items()}, **{f"input {k}": v for k, v in gi.items()}}


def ours_grads(kind, layer, inputs, cots, lengths):
    params = layer.trainable_parameters()

    def f(p, inp):
        layer.update(p)
        return _loss(run_ours(kind, layer, inp["x"], inp.get("h0"), inp.get("c0"), lengths), cots)

    try:
        gp, gi = mx.grad(f, argnums=(0, 1))(params, inputs)
    finally:
        layer.update(params)
    return {**{f"param {k}": v for k, v in tree_flatten(gp)}, **{f"input {k}": v for k, v in gi.items()}}


def check_all(actual, expected, tol, what):
    """Every quantity is checked; the failure lists all that differ, not just the first."""
    errors = []
    assert sorted(actual) == sorted(expected), f"{what}: keys {sorted(actual)} != {sorted(expected)}"
    for k in sorted(expected):
        try:
            assert_close(actual[k], expected[k], f"{what} {k}", rtol=tol, atol=tol)
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


# --------------------------------------------------------------------------- the matrix

@pytest.mark.parametrize("kind,config", CASES, ids=[f"{k}-{c}" for k, c in CASES])
def test_matches_oracle(kind, config):
    cfg = {**CONFIGS, **LSTM_CONFIGS}[config]
    layer = build(kind, cfg)
    params = dict(tree_flatten(layer.parameters()))
    inputs = make_inputs(kind, cfg)
    lengths = cfg.get("lengths")
    args = (inputs["x"], inputs.get("h0"), inputs.get("c0"), lengths)

    ref = oracle(kind, cfg, params, *args)
    got = run_ours(kind, layer, *args)
    mx.eval(ref, got)
    check_all(got, ref, FWD_TOL, f"{kind}/{config}")

    cots = cotangents(ref)
    g_ref = oracle_grads(kind, cfg, params, inputs, cots, lengths)
    g_got = ours_grads(kind, layer, inputs, cots, lengths)
    mx.eval(g_ref, g_got)
    check_all(g_got, g_ref, GRAD_TOL, f"{kind}/{config} grad")


@pytest.mark.parametrize("kind", list(KINDS))
def test_nn_value_and_grad_matches_oracle(kind):
    cfg = dict(num_layers=2, bidirectional=True, lengths=LENGTHS)
    layer = build(kind, cfg)
    params = dict(tree_flatten(layer.parameters()))
    inputs = make_inputs(kind, cfg)
    cots = cotangents(oracle(kind, cfg, params, inputs["x"], lengths=LENGTHS))

    def loss(x):
        return _loss(run_ours(kind, layer, x, lengths=LENGTHS), cots)

    _, grads = nn.value_and_grad(layer, loss)(inputs["x"])
    got = {f"param {k}": v for k, v in tree_flatten(grads)}
    ref = oracle_grads(kind, cfg, params, {"x": inputs["x"]}, cots, LENGTHS)
    ref.pop("input x")
    check_all(got, ref, GRAD_TOL, f"{kind} nn.value_and_grad")


@pytest.mark.parametrize("kind", list(KINDS))
def test_lengths_forms_agree_and_full_lengths_equal_none(kind):
    cfg = dict(bidirectional=True, batch_first=True)
    layer = build(kind, cfg)
    x = make_inputs(kind, cfg)["x"]
    as_list = run_ours(kind, layer, x, lengths=LENGTHS)
    for form in (mx.array(LENGTHS, dtype=mx.int32), mx.array(LENGTHS, dtype=mx.int64),
                 mx.array(LENGTHS, dtype=mx.uint32)):
        check_all(run_ours(kind, layer, x, lengths=form), as_list, FWD_TOL, f"{kind} lengths {form.dtype}")
    check_all(run_ours(kind, layer, x, lengths=[L] * B), run_ours(kind, layer, x), FWD_TOL,
              f"{kind} lengths all L vs none")


@pytest.mark.parametrize("kind", list(KINDS))
def test_padding_content_is_ignored(kind):
    # pack_padded_sequence never reads past a length: NaN/inf padding must change
    # nothing, neither the results nor any gradient (the input's is 0 there).
    cfg = dict(num_layers=2, bidirectional=True, lengths=LENGTHS)
    layer = build(kind, cfg)
    x = make_inputs(kind, cfg)["x"]
    pad = (mx.arange(L)[:, None] >= mx.array(LENGTHS)[None])[..., None]
    dirty = mx.where(pad, mx.array([mx.nan, mx.inf, -mx.inf, 1e30, 0, 0])[mx.arange(I) % 6], x)
    clean = run_ours(kind, layer, x, lengths=LENGTHS)
    check_all(run_ours(kind, layer, dirty, lengths=LENGTHS), clean, FWD_TOL, f"{kind} dirty padding")
    cots = cotangents(clean)
    g_clean = ours_grads(kind, layer, {"x": x}, cots, LENGTHS)
    g_dirty = ours_grads(kind, layer, {"x": dirty}, cots, LENGTHS)
    check_all(g_dirty, g_clean, GRAD_TOL, f"{kind} dirty padding grad")
    assert not mx.any(mx.where(pad, g_dirty["input x"], 0) != 0).item()


# --------------------------------------------------------------------------- dropout

def test_layers_start_in_training_mode():
    for cls in (LSTM, GRU, RNN):
        layer = cls(I, H, 2, dropout=0.5)
        assert layer.training, cls.__name__
        layer.eval()
        assert not layer.training


@pytest.mark.parametrize("kind", list(KINDS))
def test_dropout_train_between_layers_only(kind):
    cfg = dict(num_layers=2, bidirectional=True)
    layer = build(kind, dict(cfg, dropout=0.5))  # build() calls .eval()
    x = make_inputs(kind, cfg)["x"]
    ev = run_ours(kind, layer, x)
    layer.train()
    mx.random.seed(7)
    tr = run_ours(kind, layer, x)
    mx.eval(ev, tr)
    # layer 0 (h_n/c_n rows 0 and 1) sees the raw input: dropout must not touch it
    for k in ("h_n", "c_n"):
        if k in tr:
            assert_close(tr[k][:2], ev[k][:2], f"{kind} train {k} layer 0", rtol=FWD_TOL, atol=FWD_TOL)
    # layer 1 sees dropped inputs, so its states and the output move
    assert mx.abs(tr["h_n"][2:] - ev["h_n"][2:]).max().item() > 1e-3, "layer 1 unaffected by dropout"
    assert mx.abs(tr["output"] - ev["output"]).max().item() > 1e-3, "output unaffected by dropout"
    if kind != "rnn_relu":  # relu makes true zeros; tanh/sigmoid-gated outputs never are
        # no dropout after the last layer: a dropped output would be ~half exact zeros
        assert not mx.any(tr["output"] == 0).item(), "dropout applied to the last layer's output"


@pytest.mark.parametrize("kind", list(KINDS))
def test_dropout_one_in_train_mode_zeroes_layer_inputs(kind):
    # torch accepts dropout=1 (it checks 0 <= p <= 1); in train mode every input of
    # layers >= 1 is then zero -- deterministic, so it pins down where dropout sits.
    cfg = dict(num_layers=3, bidirectional=True, lengths=LENGTHS)
    layer = build(kind, dict(cfg, dropout=1.0))
    layer.train()
    params = dict(tree_flatten(layer.parameters()))
    x = make_inputs(kind, cfg)["x"]
    ref = oracle(kind, cfg, params, x, lengths=LENGTHS, zero_between_layers=True)
    check_all(run_ours(kind, layer, x, lengths=LENGTHS), ref, FWD_TOL, f"{kind} dropout=1 train")


def test_dropout_is_inverted_dropout_scaled_by_one_over_keep():
    # Make layer 1 of a 2-layer tanh RNN transparent (W_ih = s*I, W_hh = 0, no bias), so
    # atanh(output)/s reads back exactly what dropout handed it: every element must be
    # 0 or layer 0's output / (1 - p), as torch.nn.functional.dropout gives in training.
    p, s = 0.25, 0.1
    layer = build("rnn_tanh", dict(num_layers=2, bias=False, dropout=p))
    layer.update({"weight_ih_l1": s * mx.eye(H), "weight_hh_l1": mx.zeros((H, H))})
    x = make_inputs("rnn_tanh", {})["x"]
    one = build("rnn_tanh", dict(bias=False))
    one.update({k: v for k, v in layer.parameters().items() if k.endswith("_l0")})
    layer0 = run_ours("rnn_tanh", one, x)["output"]
    layer.train()
    mx.random.seed(11)
    seen = mx.arctanh(run_ours("rnn_tanh", layer, x)["output"]) / s
    zero = mx.abs(seen) <= 1e-5
    kept = mx.abs(seen - layer0 / (1 - p)) <= 1e-4 * (1 + mx.abs(layer0))
    assert mx.all(zero | kept).item(), "dropout output is neither 0 nor x / (1 - p)"
    frac = mx.mean(zero & ~kept).item()  # 168 draws: p +- 0.15 is > 4 sigma
    assert p - 0.15 < frac < p + 0.15, f"{frac:.2f} of the elements dropped with p={p}"


DROPOUT_WARNING = ("dropout option adds dropout after all but last recurrent layer, so non-zero "
                   "dropout expects num_layers greater than 1, but got dropout=0.5 and num_layers=1")


@pytest.mark.parametrize("cls", [LSTM, GRU, RNN], ids=lambda c: c.__name__)
def test_dropout_with_one_layer_warns(cls):
    with pytest.warns(UserWarning, match=re.escape(DROPOUT_WARNING)):
        cls(I, H, dropout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these must not warn
        cls(I, H, num_layers=2, dropout=0.5)
        cls(I, H, dropout=0.0)


# --------------------------------------------------------------------------- parameters and init

def expected_parameters(kind, num_layers, bidirectional, bias, proj_size):
    """torch's rule (RNNBase.__init__): per layer and direction weight_ih, weight_hh,
    [bias_ih, bias_hh], [weight_hr]; suffix _l{layer}[_reverse]."""
    gates = KINDS[kind][2] * H
    hout = proj_size or H
    nd = 2 if bidirectional else 1
    shapes = {}
    for layer in range(num_layers):
        for d in range(nd):
            s = f"_l{layer}" + ("_reverse" if d else "")
            shapes[f"weight_ih{s}"] = (gates, I if layer == 0 else hout * nd)
            shapes[f"weight_hh{s}"] = (gates, hout)
            if bias:
                shapes[f"bias_ih{s}"] = (gates,)
                shapes[f"bias_hh{s}"] = (gates,)
            if proj_size:
                shapes[f"weight_hr{s}"] = (proj_size, H)
    return shapes


PARAM_CASES = [(k, nl, bd, bias, proj) for k in KINDS for nl in (1, 3) for bd in (False, True)
               for bias in (True, False) for proj in ((0, P) if k == "lstm" else (0,))]


@pytest.mark.parametrize("kind,num_layers,bidirectional,bias,proj_size", PARAM_CASES)
def test_parameter_names_and_shapes(kind, num_layers, bidirectional, bias, proj_size):
    cfg = dict(num_layers=num_layers, bidirectional=bidirectional, bias=bias)
    if proj_size:
        cfg["proj_size"] = proj_size
    layer = build(kind, cfg)
    got = {k: tuple(v.shape) for k, v in tree_flatten(layer.parameters())}
    assert got == expected_parameters(kind, num_layers, bidirectional, bias, proj_size)
    assert {k for k, _ in tree_flatten(layer.trainable_parameters())} == set(got)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(layer.parameters()))


@pytest.mark.parametrize("kind", list(KINDS))
def test_init_is_uniform_within_one_over_sqrt_hidden(kind):
    hidden = 16
    cfg = dict(num_layers=2, bidirectional=True, **({"proj_size": 4} if kind == "lstm" else {}))
    layer = build(kind, cfg, hidden_size=hidden)
    bound = 1 / math.sqrt(hidden)
    for name, v in tree_flatten(layer.parameters()):
        lo, hi = v.min().item(), v.max().item()
        assert -bound <= lo and hi <= bound, f"{name}: [{lo}, {hi}] outside +-{bound}"
        if v.size >= 48:  # U(-b, b): a few dozen draws reach past +-b/2 both ways
            assert lo < -bound / 2 and hi > bound / 2, f"{name}: [{lo}, {hi}] not spread over +-{bound}"
    # fresh draws per layer: two layers do not share values
    a, b = layer.parameters()["weight_hh_l0"], layer.parameters()["weight_hh_l1"]
    assert not mx.array_equal(a, b).item()


def test_positional_argument_order():
    # torch: LSTM(input, hidden, num_layers, bias, batch_first, dropout, bidirectional, proj_size)
    lstm = LSTM(I, H, 2, False, True, 0.0, True, P)
    assert set(dict(tree_flatten(lstm.parameters()))) == set(expected_parameters("lstm", 2, True, False, P))
    gru = GRU(I, H, 2, False, True, 0.0, True)
    assert set(dict(tree_flatten(gru.parameters()))) == set(expected_parameters("gru", 2, True, False, 0))
    # torch: RNN(input, hidden, num_layers, nonlinearity, bias, batch_first, dropout, bidirectional)
    rnn = RNN(I, H, 2, "relu", False, True, 0.0, True)
    assert set(dict(tree_flatten(rnn.parameters()))) == set(expected_parameters("rnn_relu", 2, True, False, 0))
    x = rand((2, 3, I), 0)  # batch_first=True: batch is axis 0 -> h_n batch 2
    assert run_ours("lstm", lstm, x)["h_n"].shape == (4, 2, P)
    assert run_ours("gru", gru, x)["h_n"].shape == (4, 2, H)
    out = run_ours("rnn_relu", rnn, x)
    assert out["h_n"].shape == (4, 2, H)
    assert mx.all(out["output"] >= 0).item(), "RNN's 4th positional argument is nonlinearity"


@pytest.mark.parametrize("kind", list(KINDS))
def test_dtype_and_device_arguments(kind):
    cls, extra, _ = KINDS[kind]
    kw = dict(extra, num_layers=2, bidirectional=True, **({"proj_size": P} if kind == "lstm" else {}))
    for dtype in (mx.float16, mx.bfloat16, mx.float32):
        layer = cls(I, H, **kw, device=None, dtype=dtype)
        assert {v.dtype for _, v in tree_flatten(layer.parameters())} == {dtype}
        out = run_ours(kind, layer, rand((L, B, I), 0).astype(dtype))
        assert all(v.dtype == dtype for v in out.values())
    with pytest.raises(ValueError, match="device must be None"):
        cls(I, H, **kw, device="cuda")
    for bad in (mx.int32, "float16", float):
        with pytest.raises(TypeError, match="floating dtype"):
            cls(I, H, **kw, dtype=bad)


@pytest.mark.parametrize("kind", list(KINDS))
def test_all_weights_flatten_and_reset_parameters(kind):
    cls, extra, _ = KINDS[kind]
    kw = dict(extra, num_layers=2, bidirectional=True, **({"proj_size": P} if kind == "lstm" else {}))
    for bias in (True, False):
        layer = cls(I, H, **kw, bias=bias, dtype=mx.bfloat16)
        names = [k for k, _ in tree_flatten(layer.parameters())]
        per = 2 + 2 * bias + (kind == "lstm")
        groups = layer.all_weights
        assert len(groups) == 4 and all(len(g) == per for g in groups)
        # torch's order: per (layer, direction) w_ih, w_hh[, b_ih, b_hh][, w_hr], the arrays themselves
        flat = [w for g in groups for w in g]
        assert all(w is getattr(layer, n) for w, n in zip(flat, layer._weight_names()))
        assert set(layer._weight_names()) == set(names)
        assert [tuple(w.shape) for w in groups[1][:2]] == [tuple(layer.weight_ih_l0_reverse.shape),
                                                        tuple(layer.weight_hh_l0_reverse.shape)]
        assert layer.flatten_parameters() is None
        before = {k: v for k, v in tree_flatten(layer.parameters())}
        layer.reset_parameters()
        after = {k: v for k, v in tree_flatten(layer.parameters())}
        bound = 1 / math.sqrt(H)
        for k, v in after.items():
            assert v.dtype == mx.bfloat16 and v.shape == before[k].shape
            assert not mx.array_equal(v, before[k]).item(), k
            assert mx.all(mx.abs(v.astype(mx.float32)) <= bound * 1.01).item(), k


def test_all_weights_match_torchs_structure():
    torch = pytest.importorskip("torch")
    for tcls, ours, kw in ((torch.nn.LSTM, LSTM, dict(proj_size=P)), (torch.nn.GRU, GRU, {}),
                           (torch.nn.RNN, RNN, dict(nonlinearity="relu"))):
        for bias in (True, False):
            t = tcls(I, H, num_layers=2, bidirectional=True, bias=bias, **kw)
            o = ours(I, H, num_layers=2, bidirectional=True, bias=bias, **kw)
            assert [[tuple(w.shape) for w in g] for g in o.all_weights] == \
                [[tuple(w.shape) for w in g] for g in t.all_weights]
            assert [n for g in t._all_weights for n in g] == o._weight_names()


# --------------------------------------------------------------------------- bad input

DROPOUT_MSG = ("dropout should be a number in range [0, 1] representing the probability "
               "of an element being zeroed")
# (class name, args, kwargs, exception type, message), as torch.nn raises them
CTOR_ERRORS = [
    *[(c, (I, H), dict(dropout=d), ValueError, DROPOUT_MSG)
      for c in ("LSTM", "GRU", "RNN") for d in (-0.1, 1.5, "0.5", True)],
    *[(c, (I, H), kw, TypeError, msg) for c in ("LSTM", "GRU", "RNN") for kw, msg in (
        (dict(bias=1), "bias should be of type bool, got: int"),
        (dict(batch_first=0), "batch_first should be of type bool, got: int"),
    )],
    *[(c, a, {}, e, msg) for c in ("LSTM", "GRU", "RNN") for a, e, msg in (
        ((5.0, H), TypeError, "input_size should be of type int, got: float"),
        ((0, H), ValueError, "input_size must be greater than zero"),
        ((I, 6.0), TypeError, "hidden_size should be of type int, got: float"),
        ((I, 0), ValueError, "hidden_size must be greater than zero"),
        ((I, -2), ValueError, "hidden_size must be greater than zero"),
        ((I, H, 0), ValueError, "num_layers must be greater than zero"),
    )],
    ("LSTM", (I, H), dict(proj_size=-1), ValueError,
     "proj_size should be a positive integer or zero to disable projections"),
    ("LSTM", (I, H), dict(proj_size=H), ValueError, "proj_size has to be smaller than hidden_size"),
    ("LSTM", (I, H), dict(proj_size=H + 1), ValueError, "proj_size has to be smaller than hidden_size"),
    ("GRU", (I, H), dict(proj_size=2), ValueError, "proj_size argument is only supported for LSTM, not RNN or GRU"),
    ("RNN", (I, H), dict(proj_size=2), ValueError, "proj_size argument is only supported for LSTM, not RNN or GRU"),
    ("RNN", (I, H), dict(nonlinearity="sigmoid"), ValueError,
     "Unknown nonlinearity 'sigmoid'. Select from 'tanh' or 'relu'."),
    ("RNN", (I, H, 1, "gelu"), {}, ValueError, "Unknown nonlinearity 'gelu'. Select from 'tanh' or 'relu'."),
]
CTOR_IDS = [f"{c}-{a}-{kw}" for c, a, kw, _, _ in CTOR_ERRORS]
CLASSES = {"LSTM": LSTM, "GRU": GRU, "RNN": RNN}


@pytest.mark.parametrize("name,args,kwargs,exc,msg", CTOR_ERRORS, ids=CTOR_IDS)
def test_constructor_errors_as_torch(name, args, kwargs, exc, msg):
    with pytest.raises(exc, match=f"^{re.escape(msg)}$"):
        CLASSES[name](*args, **kwargs)


def test_constructor_error_table_is_torchs():
    """The table above, checked against the installed torch (skipped without it)."""
    torch = pytest.importorskip("torch")
    for name, args, kwargs, exc, msg in CTOR_ERRORS:
        with pytest.raises(exc) as info:
            getattr(torch.nn, name)(*args, **kwargs)
        assert str(info.value) == msg, (name, args, kwargs)


BAD_LENGTHS = {  # name -> (unbatched input?, lengths)
    "zero": (False, [6, 0, 4, 3]), "negative": (False, [6, -1, 4, 3]),
    "longer_than_L": (False, [L + 1, 1, 4, 3]), "too_few": (False, [6, 1, 4]),
    "too_many": (False, [6, 1, 4, 3, 2]), "two_dim": (False, [LENGTHS]),
    "float_array": (False, mx.array([6.0, 1.0, 4.0, 3.0])), "float_list": (False, [6.0, 1.0, 4.0, 3.0]),
    "unbatched_input": (True, [L]), "unbatched_input_scalar": (True, L),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", list(BAD_LENGTHS))
def test_bad_lengths_raise_value_error(kind, case):
    unbatched, lengths = BAD_LENGTHS[case]
    x = rand((L, I) if unbatched else (L, B, I), 0)
    layer = build(kind, {})
    with pytest.raises(ValueError):
        mx.eval(layer(x, lengths=lengths))


@pytest.mark.parametrize("kind", list(KINDS))
def test_lengths_of_an_empty_batch_raise_input_error(kind):
    layer = build(kind, {})
    for catch in (ValueError, RuntimeError):  # MLX's error type and torch's ("Cannot pack empty tensors")
        with pytest.raises(catch, match="empty batch"):
            layer(mx.zeros((L, 0, I)), lengths=mx.zeros((0,), mx.int32))


def _bad_call_cases(kind, nl=2):
    x = rand((L, B, I), 0)
    c = mx.zeros((nl, B, H))
    wrap = (lambda h: (h, c)) if kind == "lstm" else (lambda h: h)
    cases = {
        "feature_size": (rand((L, B, I + 1), 0), None), "feature_size_unbatched": (rand((L, I - 1), 0), None),
        "input_1d": (rand((I,), 0), None), "input_4d": (rand((1, L, B, I), 0), None),
        "hx_layers": (x, wrap(mx.zeros((nl + 1, B, H)))), "hx_batch": (x, wrap(mx.zeros((nl, B + 1, H)))),
        "hx_width": (x, wrap(mx.zeros((nl, B, H + 1)))), "hx_2d_for_batched": (x, wrap(mx.zeros((nl, H)))),
        "hx_3d_for_unbatched": (rand((L, I), 0), wrap(mx.zeros((nl, 1, H)))),
    }
    if kind == "lstm":
        cases["c_width"] = (x, (mx.zeros((nl, B, H)), mx.zeros((nl, B, H + 1))))
        cases["c_batch"] = (x, (mx.zeros((nl, B, H)), mx.zeros((nl, B - 1, H))))
    return cases


BAD_CALLS = [(k, c) for k in KINDS for c in _bad_call_cases(k)]


@pytest.mark.parametrize("kind,case", BAD_CALLS, ids=[f"{k}-{c}" for k, c in BAD_CALLS])
def test_bad_input_or_hx_raises_value_error(kind, case):
    layer = build(kind, dict(num_layers=2))
    x, hx = _bad_call_cases(kind)[case]  # rebuilt per test: cheap, and no shared arrays
    with pytest.raises(ValueError):
        mx.eval(layer(x) if hx is None else layer(x, hx))


def test_cpu_runs_the_second_direction_on_a_stream_of_its_own(monkeypatch):
    """On the CPU a bidirectional layer's directions are independent until joined: the
    second runs on a CPU stream of its own (its own thread), the first on the default
    stream; one direction keeps the default stream. The results are those of both on
    one stream (``test_matches_oracle`` checks them against the oracle)."""
    from mlx_fastrnn.pytorch import directions
    from mlx_fastrnn.pytorch import layers as torch_layers

    if mx.default_device().type != mx.cpu:
        pytest.skip("the CPU's streams")
    first, second = directions.direction_streams(2)
    assert first is None and second is not None and second.device == mx.Device(mx.cpu)
    assert second != mx.default_stream(mx.Device(mx.cpu))
    assert directions.direction_streams(1) == (None,)
    assert directions.direction_streams(2, stackable=True) == (None, None)  # one launch may take both
    layer = LSTM(5, 4, num_layers=2, bidirectional=True)
    x = mx.random.normal((6, 3, 5), key=mx.random.key(1))
    out, (h, c) = layer(x)
    monkeypatch.setattr(torch_layers, "direction_streams", lambda d, stackable=False: (None,) * d)
    out1, (h1, c1) = layer(x)
    for a, b in ((out, out1), (h, h1), (c, c1)):
        assert mx.array_equal(a, b)
