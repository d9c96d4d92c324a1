"""Implementation selection (MLX_RNN_IMPL, use_impl), patch()/unpatch(), and the
``python -m mlx_fastrnn SCRIPT`` runner.

Environment-variable behaviour is checked in fresh interpreters
(``sys.executable -c ...``) since MLX_RNN_IMPL is read once at import.
Legacy must be stock mlx.nn bit for bit (``mx.array_equal``).
"""

import os
import subprocess
import sys
import textwrap

import pytest

import mlx.core as mx
import mlx.nn as nn
import mlx.nn.layers
import mlx.nn.layers.recurrent as recurrent

import mlx_fastrnn
from conftest import (
    KIND_NAMES,
    OURS,
    ROOT,
    STOCK,
    assert_close,
    assert_equal_bits,
    forward,
    forward_and_grads,
    is_lstm,
    make_pair,
    rand,
)

NAMES = ["GRU", "LSTM", "RNN"]


def _env(impl):
    env = dict(os.environ)
    env.pop("MLX_RNN_IMPL", None)
    if impl is not None:
        env["MLX_RNN_IMPL"] = impl
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_py(code, impl=None, cwd=None, args=()):
    return subprocess.run(
        [sys.executable, *args] if not code else [sys.executable, "-c", textwrap.dedent(code), *args],
        env=_env(impl), cwd=cwd or ROOT, capture_output=True, text=True, timeout=120,
    )


# Builds stock and ours with identical weights, compares outputs and gradients bitwise.
_BITWISE = """
import mlx.core as mx, mlx.nn as nn
import mlx.nn.layers.recurrent as R
from mlx.utils import tree_flatten
import mlx_fastrnn
print("IMPL", mlx_fastrnn.IMPL, mlx_fastrnn.current_impl())
for name in ("GRU", "LSTM", "RNN"):
    for kw in ({}, {"bias": False}) + (({"nonlinearity": nn.relu},) if name == "RNN" else ()):
        mx.random.seed(0)
        s = getattr(R, name)(5, 7, **kw)
        o = getattr(mlx_fastrnn, name)(5, 7, **kw)
        o.load_weights(list(tree_flatten(s.parameters())))
        x = mx.random.normal((3, 6, 5), key=mx.random.key(1))
        h = mx.random.normal((3, 7), key=mx.random.key(2))
        def loss(layer):
            def f(params, x, h):
                layer.update(params)
                out = layer(x, h)
                out = out if isinstance(out, tuple) else (out,)
                return sum((v * (i + 1.5)).sum() for i, v in enumerate(out))
            return f
        ref = s(x, h); got = o(x, h)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = got if isinstance(got, tuple) else (got,)
        same = all(mx.array_equal(a, b).item() and a.dtype == b.dtype for a, b in zip(got, ref))
        gs = mx.grad(loss(s), argnums=(0, 1, 2))(s.trainable_parameters(), x, h)
        go = mx.grad(loss(o), argnums=(0, 1, 2))(o.trainable_parameters(), x, h)
        fs, fo = tree_flatten(gs), tree_flatten(go)
        gsame = [k for k, _ in fs] == [k for k, _ in fo] and all(
            mx.array_equal(a, b).item() for (_, a), (_, b) in zip(fs, fo))
        print("BITWISE", name, sorted(kw), same, gsame)
"""


def test_env_unset_selects_fast():
    r = _run_py("import mlx_fastrnn; print(mlx_fastrnn.IMPL, mlx_fastrnn.current_impl())", impl=None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["fast", "fast"]


def test_env_fast_selects_fast():
    r = _run_py("import mlx_fastrnn; print(mlx_fastrnn.IMPL)", impl="fast")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "fast"


def test_env_legacy_is_stock_bit_for_bit():
    r = _run_py(_BITWISE, impl="legacy")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["IMPL", "legacy", "legacy"]
    bitwise = [l for l in lines if l.startswith("BITWISE")]
    assert len(bitwise) == 7
    bad = [l for l in bitwise if not l.endswith("True True")]
    assert not bad, "legacy differs from stock: " + "; ".join(bad)


def test_env_read_once_at_import():
    code = """
    import os, mlx_fastrnn
    os.environ["MLX_RNN_IMPL"] = "fast"
    print(mlx_fastrnn.IMPL, mlx_fastrnn.current_impl())
    """
    r = _run_py(code, impl="legacy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["legacy", "legacy"]


def test_env_bogus_fails_import_with_one_clear_line():
    r = _run_py("import mlx_fastrnn\nprint('IMPORTED')", impl="bogus")
    assert r.returncode != 0
    assert "IMPORTED" not in r.stdout
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    clear = [l for l in lines if "bogus" in l and "fast" in l and "legacy" in l]
    assert len(clear) >= 1, f"no line naming the bad value and the valid ones in:\n{r.stderr}"
    # the final line (what a user reads first) is that message
    assert lines[-1] in clear, f"last stderr line is not the clear message:\n{r.stderr}"
    assert "MLX_RNN_IMPL" in lines[-1]


def test_env_bogus_fails_via_runner_too(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("print('RAN')\n")
    r = subprocess.run([sys.executable, "-m", "mlx_fastrnn", str(script)], env=_env("bogus"),
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "RAN" not in r.stdout
    assert "fast" in r.stderr and "legacy" in r.stderr


# --------------------------------------------------------------------------- use_impl

def test_use_impl_switches_and_restores():
    base = mlx_fastrnn.current_impl()
    assert base == mlx_fastrnn.IMPL
    with mlx_fastrnn.use_impl("legacy"):
        assert mlx_fastrnn.current_impl() == "legacy"
        with mlx_fastrnn.use_impl("fast"):
            assert mlx_fastrnn.current_impl() == "fast"
        assert mlx_fastrnn.current_impl() == "legacy"
    assert mlx_fastrnn.current_impl() == base
    with pytest.raises(RuntimeError):
        with mlx_fastrnn.use_impl("legacy"):
            raise RuntimeError("boom")
    assert mlx_fastrnn.current_impl() == base


def test_use_impl_is_per_thread():
    import threading

    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other():
        entered.wait(10)
        seen["other"] = mlx_fastrnn.current_impl()
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with mlx_fastrnn.use_impl("legacy" if mlx_fastrnn.IMPL == "fast" else "fast"):
        entered.set()
        release.wait(10)
    t.join(10)
    assert seen["other"] == mlx_fastrnn.IMPL


def test_use_impl_rejects_unknown():
    with pytest.raises(ValueError) as info:
        with mlx_fastrnn.use_impl("bogus"):
            pass
    assert "fast" in str(info.value) and "legacy" in str(info.value)
    assert set(mlx_fastrnn.IMPLS) == {"fast", "legacy", "cell"}
    for bad in (None, 1):
        with pytest.raises(ValueError):
            with mlx_fastrnn.use_impl(bad):
                pass
    with mlx_fastrnn.use_impl("LEGACY"):  # any case, as MLX_RNN_IMPL is read
        assert mlx_fastrnn.current_impl() == "legacy"


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_use_impl_legacy_bitwise_stock_and_fast_close(kind):
    stock, ours = make_pair(kind, 5, 7)
    x, h = rand((3, 6, 5), 60), rand((3, 7), 61)
    c = h if is_lstm(kind) else None
    out_s, g_s = forward_and_grads(stock, x, h, c)
    out_l, g_l = forward_and_grads(ours, x, h, c, impl="legacy")
    for a, b in zip(out_l, out_s):
        assert_equal_bits(a, b, "legacy output")
    for k in g_s:
        assert_equal_bits(g_l[k], g_s[k], f"legacy grad {k}")
    out_f, g_f = forward_and_grads(ours, x, h, c, impl="fast")
    for a, b in zip(out_f, out_s):
        assert_close(a, b, "fast output")
    # and back again in the same process
    out_l2 = forward(ours, x, h, c, impl="legacy")
    for a, b in zip(out_l2, out_s):
        assert_equal_bits(a, b, "legacy output after fast")


# --------------------------------------------------------------------------- patch

def test_patch_replaces_every_import_path_and_unpatch_restores():
    assert not mlx_fastrnn.is_patched()
    mlx_fastrnn.patch()
    try:
        assert mlx_fastrnn.is_patched()
        for name in NAMES:
            assert getattr(nn, name) is OURS[name]
            assert getattr(recurrent, name) is OURS[name]
            assert getattr(mlx.nn.layers, name, OURS[name]) is OURS[name]
        from mlx.nn import LSTM
        from mlx.nn.layers.recurrent import GRU
        assert LSTM is mlx_fastrnn.LSTM and GRU is mlx_fastrnn.GRU
        # layers made through mlx.nn now are ours, and still work on both impls
        layer = nn.GRU(3, 4)
        assert type(layer) is mlx_fastrnn.GRU
        x = rand((2, 3, 3), 62)
        for impl in ("legacy", "fast"):
            out = forward(layer, x, impl=impl)
            assert out[0].shape == (2, 3, 4)
        lstm = nn.LSTM(3, 4)
        rnn = nn.RNN(3, 4, nonlinearity=lambda v: mx.sin(v))  # falls back to stock code
        for impl in ("legacy", "fast"):
            forward(lstm, x, impl=impl)
            forward(rnn, x, impl=impl)
    finally:
        mlx_fastrnn.unpatch()
    assert not mlx_fastrnn.is_patched()
    for name in NAMES:
        assert getattr(nn, name) is STOCK[name]
        assert getattr(recurrent, name) is STOCK[name]
        assert getattr(mlx.nn.layers, name, STOCK[name]) is STOCK[name]
    from mlx.nn import LSTM
    assert LSTM is STOCK["LSTM"]


def test_patch_and_unpatch_idempotent():
    mlx_fastrnn.patch()
    mlx_fastrnn.patch()
    assert mlx_fastrnn.is_patched()
    assert nn.RNN is OURS["RNN"]
    assert OURS["RNN"].__mro__[1] is STOCK["RNN"]  # no self-inheritance after re-patching
    mlx_fastrnn.unpatch()
    assert not mlx_fastrnn.is_patched()
    assert nn.RNN is STOCK["RNN"]
    mlx_fastrnn.unpatch()
    assert nn.GRU is STOCK["GRU"] and nn.LSTM is STOCK["LSTM"] and nn.RNN is STOCK["RNN"]


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_patched_legacy_still_bitwise_stock(kind):
    stock, ours = make_pair(kind, 4, 5)
    x = rand((2, 4, 4), 63)
    ref = forward(stock, x)
    mlx_fastrnn.patch()
    try:
        got = forward(ours, x, impl="legacy")  # super().__call__ must be stock's, not recursive
    finally:
        mlx_fastrnn.unpatch()
    for a, b in zip(got, ref):
        assert_equal_bits(a, b, "patched legacy")


def test_patch_in_fresh_interpreter_before_user_imports():
    code = """
    import mlx_fastrnn
    mlx_fastrnn.patch()
    from mlx.nn import GRU, LSTM, RNN
    import mlx.nn as nn
    print(GRU.__module__, LSTM.__module__, RNN.__module__, type(nn.RNN(2, 3)).__module__)
    """
    r = _run_py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["mlx_fastrnn.layers"] * 4


# --------------------------------------------------------------------------- runner

_SCRIPT = """
import sys
import mlx.nn
from mlx.nn import LSTM
print("MODULE", type(mlx.nn.GRU(2, 3)).__module__)
print("LSTM", LSTM.__module__)
print("ARGV", repr(sys.argv))
print("NAME", __name__)
sys.exit(7)
"""


def test_runner_patches_and_passes_argv_and_exit_code(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "mlx_fastrnn", str(script), "a", "b"],
                       env=_env(None), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 7, r.stderr
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert out["MODULE"].startswith("mlx_fastrnn"), r.stdout
    assert out["LSTM"].startswith("mlx_fastrnn"), r.stdout
    assert eval(out["ARGV"]) == [str(script), "a", "b"]
    assert out["NAME"] == "__main__"


def test_runner_relative_script_path_and_sibling_import(tmp_path):
    (tmp_path / "helper.py").write_text("VALUE = 41\n")
    (tmp_path / "script.py").write_text(
        "import sys, helper\nprint('ARGV', repr(sys.argv))\nsys.exit(helper.VALUE + 1)\n")
    r = subprocess.run([sys.executable, "-m", "mlx_fastrnn", "script.py", "--flag", "x y"],
                       env=_env(None), cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 42, r.stderr
    assert eval(r.stdout.split(" ", 1)[1]) == ["script.py", "--flag", "x y"]


def test_runner_sets_up_the_script_as_python_does(tmp_path):
    """``sys.path`` as ``python sub/script.py`` makes it: the script's directory first, the
    working directory not added (``python -m`` adds it)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "probe.py").write_text(
        "import os, sys\nprint(repr((sys.path[0], os.getcwd() in sys.path[1:])))\n")
    runs = [subprocess.run([sys.executable, *prefix, os.path.join("sub", "probe.py")], env=_env(None),
                           cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
            for prefix in ((), ("-m", "mlx_fastrnn"))]
    plain, ours = (eval(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert ours == plain == (str(tmp_path / "sub"), False), (ours, plain)


def test_runner_script_exception_gives_nonzero_exit(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("raise KeyError('boom')\n")
    r = subprocess.run([sys.executable, "-m", "mlx_fastrnn", str(script)],
                       env=_env(None), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "KeyError" in r.stderr


def test_runner_without_arguments_prints_usage_and_exits_2():
    r = subprocess.run([sys.executable, "-m", "mlx_fastrnn"], env=_env(None), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "usage" in (r.stderr + r.stdout).lower()


def test_runner_legacy_env_runs_stock_math(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("""
        import mlx.core as mx, mlx.nn as nn, mlx_fastrnn
        print(type(nn.LSTM(2, 3)).__module__, mlx_fastrnn.current_impl())
    """))
    r = subprocess.run([sys.executable, "-m", "mlx_fastrnn", str(script)], env=_env("legacy"),
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["mlx_fastrnn.layers", "legacy"]


def test_cell_impl_drops_only_the_whole_sequence_kernels():
    """`cell` pins the per-step fused cells: same steps, no persistent kernels."""
    from mlx_fastrnn.cells import GRU_CELL, LSTM_CELL, RNN_TANH_CELL

    for cell in (GRU_CELL, LSTM_CELL, RNN_TANH_CELL):
        whole = cell.kernel_steps("cuda", True)
        per_step = cell.kernel_steps("cuda", False)
        assert whole.forward_sequence is not None and whole.backward_sequence_kernel is not None
        assert per_step.forward_sequence is None and per_step.backward_sequence_kernel is None
        assert cell.kernel_steps("metal").forward_sequence is None  # no grid barrier on Metal
        assert per_step.backward_step is not None
    with mlx_fastrnn.use_impl("cell"):
        assert mlx_fastrnn.current_impl() == "cell"
        m = mlx_fastrnn.GRU(3, 4)
        x = mx.random.normal((2, 5, 3))
        with mlx_fastrnn.use_impl("legacy"):
            ref = m(x)
        assert mx.allclose(m(x), ref, rtol=1e-5, atol=1e-6).item()


def test_cell_value_from_the_environment():
    r = _run_py("import mlx_fastrnn; print(mlx_fastrnn.IMPL)", impl="cell")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "cell"
