"""pytest-benchmark: stock (legacy) and fast GRU / LSTM / RNN side by side.

Skipped unless asked for, so a plain ``pytest`` stays fast:

    pytest benchmarks/ --benchmark-only                      # run them
    pytest benchmarks/ --benchmark-enable                    # same
    MLX_RNN_BENCH=1 pytest benchmarks/                       # same
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
    pytest benchmarks/ --benchmark-only -k "GRU and 32x40x200"

Each group ``{layer}-{shape}-{fwd|fwdbwd}`` holds the two impls (``legacy``,
``fast``). The cases are recurrent_bench.make_case (same layer, inputs and loss).
Environment knobs:

    MLX_RNN_BENCH_DTYPE   float32 (default) | bfloat16 | float16
    MLX_RNN_BENCH_SHAPES  e.g. 32x40x200,1x1x640 (default: all five)
    MLX_RNN_BENCH_LAYERS  e.g. GRU,LSTM
    MLX_RNN_BENCH_ROUNDS  force the number of rounds for every case

Rounds scale down with the work of a case (the 16x1024x512 fwd+bwd takes over
a minute per call on a 2-core CPU; on such a machine leave it out with
MLX_RNN_BENCH_SHAPES).
"""

import os
import sys

import pytest

pytest.importorskip("pytest_benchmark")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shapes import LAYERS, MODES, parse_list, parse_shapes  # noqa: E402

IMPLS = ("legacy", "fast")
GATES = {"GRU": 3, "LSTM": 4, "RNN": 1}
DTYPE = os.environ.get("MLX_RNN_BENCH_DTYPE", "float32")
SHAPES = parse_shapes(os.environ.get("MLX_RNN_BENCH_SHAPES"))
BENCH_LAYERS = parse_list(os.environ.get("MLX_RNN_BENCH_LAYERS"), LAYERS, "layer")


def _enabled(config):
    if os.environ.get("MLX_RNN_BENCH", "").strip() not in ("", "0"):
        return True
    try:
        return bool(config.getoption("benchmark_only") or config.getoption("benchmark_enable"))
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _only_when_benchmarking(request):
    if not _enabled(request.config):
        pytest.skip("benchmark: run with --benchmark-only / --benchmark-enable or MLX_RNN_BENCH=1")


def _rounds(layer, shape, mode):
    forced = os.environ.get("MLX_RNN_BENCH_ROUNDS")
    if forced:
        return max(1, int(forced))
    _, b, length, h = shape
    # multiply-adds of the recurrent + input projections; fwd+bwd costs about three times more
    work = 2 * b * length * h * h * GATES[layer] * (3 if mode == "fwdbwd" else 1)
    if work < 2e8:
        return 20
    if work < 4e9:
        return 8
    if work < 2e10:
        return 4
    return 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("layer", BENCH_LAYERS)
def test_recurrent(benchmark, layer, shape, mode, impl):
    import mlx.core as mx

    import mlx_fastrnn
    from recurrent_bench import make_case

    benchmark.group = f"{layer}-{shape[0]}-{mode}"
    benchmark.extra_info.update(
        layer=layer, shape=shape[0], mode=mode, impl=impl, dtype=DTYPE,
        device=str(mx.default_device()), mlx_version=mx.__version__,
    )
    run = make_case(layer, shape, mode, DTYPE)

    def target():
        with mlx_fastrnn.use_impl(impl):
            return run()

    benchmark.pedantic(target, rounds=_rounds(layer, shape, mode), iterations=1, warmup_rounds=1)
