"""pytorch_layers_bench.py and pytorch_layers_torch.py end to end on a tiny shape (plain ``pytest``)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import pytorch_layers_torch  # noqa: E402  (pure Python at import: no torch, no MLX)

# lengths [6, 4, 6]: one row shorter than L, so the lengths cases really mask and reverse within rows
TINY = ["--shapes", "3x6x5->4", "--budget", "0.01", "--min-repeats", "2", "--max-repeats", "3",
        "--warmup", "2"]
STAT_FIELDS = {"median_ms", "iqr_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "repeats"}
CONFIG_FIELDS = {"kind", "layer", "shape", "batch", "length", "input", "hidden", "num_layers",
                 "bidirectional", "mode", "dtype", "lengths", "lengths_values", "impl"}
HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_shared_configuration():
    assert pytorch_layers_torch.parse_shape("16x1024x512->512") == dict(
        shape="16x1024x512->512", batch=16, length=1024, input=512, hidden=512)
    assert pytorch_layers_torch.parse_shape("1x256x512:256")["hidden"] == 256
    assert pytorch_layers_torch.parse_shape("8x100x128")["shape"] == "8x100x128->128"
    lengths = pytorch_layers_torch.seeded_lengths(16, 101, seed=0)
    assert lengths == pytorch_layers_torch.seeded_lengths(16, 101, seed=0)
    assert lengths[0] == 101 and all(51 <= n <= 101 for n in lengths) and min(lengths) < 101
    assert pytorch_layers_torch.seeded_lengths(3, 6) == [6, 4, 6]


def test_mlx_bench_tiny(tmp_path):
    import pytorch_layers_bench

    out = tmp_path / "mlx.json"
    assert pytorch_layers_bench.main(TINY + ["--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["complete"] and data["meta"]["tool"] == "pytorch_layers_bench"
    rows = data["results"]
    # 2 layer kinds x 2 length cases x 2 modes stacked configs + 2 x 2 direction rows, 2 impls each
    assert data["meta"]["configs"] == 12 and len(rows) == 24
    assert not any("error" in r for r in rows)
    for r in rows:
        assert CONFIG_FIELDS | STAT_FIELDS <= set(r), set(CONFIG_FIELDS | STAT_FIELDS) - set(r)
    stack = [r for r in rows if r["kind"] == "stack"]
    assert {r["impl"] for r in stack} == {"fastrnn", "stock"}
    assert all(r["num_layers"] == 2 and r["bidirectional"] for r in stack)
    ours = [r for r in stack if r["impl"] == "fastrnn"]
    assert {(r["layer"], r["mode"], r["lengths"]) for r in ours} == {
        (layer, mode, lengths) for layer in ("LSTM", "GRU") for mode in ("fwd", "fwdbwd")
        for lengths in (False, True)}
    for r in ours:  # the agreement check ran and passed
        assert r["agree"] is True and r["rel_diff_vs_stock"] < 1e-4 and r["speedup_vs_stock"] > 0
        assert r["lengths_values"] == ([6, 4, 6] if r["lengths"] else None)
    directions = [r for r in rows if r["kind"] == "directions"]
    assert {(r["impl"], r["bidirectional"], r["num_layers"]) for r in directions} == {
        ("bidirectional", True, 1), ("one_direction", False, 1)}
    assert all(r["bidir_vs_one_direction"] > 0 for r in directions if r["impl"] == "bidirectional")


def test_stock_composition_is_torch_semantics():
    """The baseline computes torch.nn's network (packed lengths included), independently of ours."""
    torch = pytest.importorskip("torch")
    import mlx.core as mx
    import numpy as np

    import pytorch_layers_bench
    from mlx_fastrnn.pytorch import GRU, LSTM

    lengths = [6, 4, 6]
    for ours_cls, torch_cls in ((LSTM, torch.nn.LSTM), (GRU, torch.nn.GRU)):
        mx.random.seed(1)
        ours = ours_cls(5, 4, num_layers=2, batch_first=True, bidirectional=True)
        stock = pytorch_layers_bench.StockComposition.from_torch_layout(ours)
        ref = torch_cls(5, 4, num_layers=2, batch_first=True, bidirectional=True)
        ref.load_state_dict({k: torch.tensor(np.array(v)) for k, v in ours.parameters().items()})
        x = mx.random.normal((3, 6, 5))
        out, states = stock(x, mx.array(lengths))
        packed = torch.nn.utils.rnn.pack_padded_sequence(torch.tensor(np.array(x)), torch.tensor(lengths),
                                                         batch_first=True, enforce_sorted=False)
        with torch.no_grad():
            ref_out, ref_states = ref(packed)
        ref_out = torch.nn.utils.rnn.pad_packed_sequence(ref_out, batch_first=True, total_length=6)[0]
        states = states if isinstance(states, tuple) else (states,)
        ref_states = ref_states if isinstance(ref_states, tuple) else (ref_states,)
        for got, want in zip((out, *states), (ref_out, *ref_states)):
            np.testing.assert_allclose(np.array(got), want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_bench_tiny(tmp_path):
    out = tmp_path / "torch.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(  # its own process, as on the device machine (no MLX in it)
        [sys.executable, os.path.join(HERE, "pytorch_layers_torch.py"), "--allow-cpu", *TINY,
         "--json", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["complete"] and data["meta"]["tool"] == "pytorch_layers_torch"
    rows = data["results"]
    assert data["meta"]["configs"] == 12 and len(rows) == 8 * 1 + 4 * 2
    assert not any("error" in r for r in rows)
    for r in rows:
        assert CONFIG_FIELDS | STAT_FIELDS | {"weights_repacked_per_call"} <= set(r)
        assert r["impl"] in ("cudnn", "torch-cpu")
    assert any(r["lengths"] and r["lengths_values"] == [6, 4, 6] for r in rows)
    assert all(r["bidir_vs_one_direction"] > 0 for r in rows if r["kind"] == "directions" and r["bidirectional"])
