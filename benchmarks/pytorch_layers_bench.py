"""Benchmark mlx_fastrnn.pytorch's LSTM / GRU (stacked, bidirectional) against stock mlx.nn composed.

    python benchmarks/pytorch_layers_bench.py                            # 2-layer bidirectional LSTM, GRU
    python benchmarks/pytorch_layers_bench.py --full --dtype float32,bfloat16 --json /tmp/ptl.json
    python benchmarks/pytorch_layers_bench.py --layers GRU --num-layers 1,2 --directions 1,2 \
        --shapes '32x40x200->200' --modes fwd --lengths with

Runs on ``mx.default_device()``. Each ``stack`` config is ``LSTM/GRU(H_in, H,
num_layers, bidirectional=..., batch_first=True)`` on ``x [B, L, H_in]``, with no
``lengths`` or with the seeded ``lengths`` of pytorch_layers_torch.seeded_lengths
(in [L/2, L], row 0 at L; the same in the torch baseline), timed for two impls
built from the same seed (same weights, same input):

- ``fastrnn``: ``mlx_fastrnn.pytorch.<LSTM|GRU>``.
- ``stock``: the same network written the way MLX ports of PyTorch models write it
  (:class:`StockComposition`): per layer a forward ``mlx.nn.LSTM/GRU`` and a
  backward one on the time-reversed input (reversed within each row's length
  with ``lengths``), outputs concatenated, ``h_n`` (and ``c_n``) from each
  direction's last valid step; torch's biases folded into stock's at load time
  (LSTM ``bias = b_ih + b_hh``; GRU ``b = b_ih + [b_hr, b_hz, 0]``, ``bhn = b_hn``).

``fwd``: outputs and final states evaluated. ``fwdbwd``: ``mx.value_and_grad`` of
``mean(output)`` w.r.t. all trainable parameters and the input, everything
evaluated. Results are checked at no timing cost: ``rel.diff`` = worst
max|fastrnn - stock| / max|stock| over output, h_n, c_n (fwd) or the loss, every
gradient (stock's mapped to torch's names) and the input gradient (fwdbwd);
``agree`` = rel.diff <= the dtype's tolerance. ``directions`` rows time one
bidirectional fastrnn layer against one one-direction layer of the same size
(the target: bidirectional <= 1.3x one direction at 1x256x256->256 on a GPU).

Timing is recurrent_bench.py's: a length-2 twin first (compilation), warm-up,
repeats adapted to --budget; both impls in alternating rounds when both medians
are below --interleave-below ms; one call only past --slow s (``*``).
``--json`` is rewritten after every config.
"""

import argparse
import datetime
import os
import sys
import time

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_layers_torch import add_common_args, build_configs, config_label, seeded_lengths  # noqa: E402
from recurrent_bench import (MX_DTYPES, _stats, device_meta, fmt_ms, machine_meta, measure,  # noqa: E402
                             measure_interleaved, rel_diff, write_json)

try:
    import mlx_fastrnn
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import mlx_fastrnn
import mlx_fastrnn.pytorch as fastrnn_pytorch  # noqa: E402

# rel.diff fastrnn vs stock above this = the two do not compute the same network
AGREE_TOL = {"float32": 1e-3, "bfloat16": 1e-1, "float16": 2e-2}


class StockComposition(nn.Module):
    """``torch.nn.<kind>(num_layers, bidirectional, batch_first=True)`` from stock mlx.nn layers.

    ``cells[layer * D + direction]`` is a stock ``mlx.nn.LSTM/GRU/RNN``; call
    ``(x [B, L, H_in], lengths=None)`` -> what the PyTorch-compatible layer returns.
    """

    def __init__(self, kind, input_size, hidden_size, num_layers, bidirectional):
        super().__init__()
        stock = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}[kind]
        self.kind, self.hidden_size, self.num_layers = kind, hidden_size, num_layers
        self.num_directions = 2 if bidirectional else 1
        self.cells = [stock(input_size if layer == 0 else self.num_directions * hidden_size, hidden_size)
                      for layer in range(num_layers) for _ in range(self.num_directions)]

    def _torch_key(self, k):
        return f"l{k // self.num_directions}{'_reverse' if k % self.num_directions else ''}"

    @classmethod
    def from_torch_layout(cls, layer):
        """The composition holding ``layer``'s weights (a mlx_fastrnn.pytorch layer, torch's names)."""
        if mlx_fastrnn.is_patched():
            raise RuntimeError("mlx.nn's recurrent layers are patched; the baseline must be stock")
        kind = "RNN" if layer.mode.startswith("RNN") else layer.mode
        if layer.mode == "RNN_RELU" or layer.proj_size or not layer.bias:
            raise ValueError("the stock composition covers tanh RNN, no projection, with biases")
        self = cls(kind, layer.input_size, layer.hidden_size, layer.num_layers, layer.bidirectional)
        p, h = layer.parameters(), layer.hidden_size
        for k, cell in enumerate(self.cells):
            key = self._torch_key(k)
            w_ih, w_hh = p[f"weight_ih_{key}"], p[f"weight_hh_{key}"]
            b_ih, b_hh = p[f"bias_ih_{key}"], p[f"bias_hh_{key}"]
            if kind == "LSTM":
                cell.update({"Wx": w_ih, "Wh": w_hh, "bias": b_ih + b_hh})
            elif kind == "GRU":
                cell.update({"Wx": w_ih, "Wh": w_hh, "bhn": b_hh[2 * h:],
                             "b": b_ih + mx.concatenate([b_hh[: 2 * h], mx.zeros((h,), b_hh.dtype)])})
            else:
                cell.update({"Wxh": w_ih, "Whh": w_hh, "bias": b_ih + b_hh})
        return self

    def grads_to_torch_layout(self, grads):
        """Gradients w.r.t. stock's parameters -> w.r.t. torch's (the chain rule of the bias folding)."""
        out, h = {}, self.hidden_size
        for k, g in enumerate(grads["cells"]):
            key = self._torch_key(k)
            if self.kind == "GRU":
                out.update({f"weight_ih_{key}": g["Wx"], f"weight_hh_{key}": g["Wh"], f"bias_ih_{key}": g["b"],
                            f"bias_hh_{key}": mx.concatenate([g["b"][: 2 * h], g["bhn"]])})
            else:
                names = ("Wx", "Wh") if self.kind == "LSTM" else ("Wxh", "Whh")
                out.update({f"weight_ih_{key}": g[names[0]], f"weight_hh_{key}": g[names[1]],
                            f"bias_ih_{key}": g["bias"], f"bias_hh_{key}": g["bias"]})
        return out

    def __call__(self, x, lengths=None):
        batch, length = x.shape[:2]
        if lengths is not None:  # the indices a port builds from the lengths, per call
            t = mx.arange(length)[None, :]
            valid = (t < lengths[:, None])[..., None]  # [B, L, 1]
            reverse_index = mx.where(valid[..., 0], lengths[:, None] - 1 - t, t)[..., None]
            last = (lengths - 1)[:, None, None]
            x = mx.where(valid, x, mx.zeros((), x.dtype))

        def reverse(a):
            return a[:, ::-1] if lengths is None else mx.take_along_axis(a, reverse_index, axis=1)

        def last_step(a):
            return a[:, -1] if lengths is None else mx.take_along_axis(a, last, axis=1)[:, 0]

        finals = [[], []]
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                seqs = self.cells[layer * self.num_directions + d](layer_in if d == 0 else reverse(layer_in))
                seqs = seqs if isinstance(seqs, tuple) else (seqs,)
                for acc, s in zip(finals, seqs):
                    acc.append(last_step(s))  # run order: the state after the row's last valid step
                out = seqs[0] if d == 0 else reverse(seqs[0])
                outs.append(out if lengths is None else mx.where(valid, out, mx.zeros((), out.dtype)))
            layer_in = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)
        if self.kind == "LSTM":
            return layer_in, (mx.stack(finals[0]), mx.stack(finals[1]))
        return layer_in, mx.stack(finals[0])


# ---------------------------------------------------------------------------
# cases


def make_runs(cfg, seed=0, length=None, stock=True):
    """{impl: run} for one config (``length`` overrides L: the short twin). ``run()``
    does the work, evaluates everything and returns the results as a flat list.

    ``kind: stack``: fastrnn and (``stock``) its StockComposition, same weights and
    input. ``kind: directions``: a bidirectional and a one-direction fastrnn layer.
    """
    length = length or cfg["length"]
    dt = MX_DTYPES[cfg["dtype"]]
    cls = getattr(fastrnn_pytorch, cfg["layer"])
    variants = {"fastrnn": cfg["bidirectional"]} if cfg["kind"] == "stack" else {
        "bidirectional": True, "one_direction": False}
    runs = {}
    for name, bidirectional in variants.items():
        mx.random.seed(seed)
        layer = cls(cfg["input"], cfg["hidden"], num_layers=cfg["num_layers"], batch_first=True,
                    bidirectional=bidirectional)
        x = mx.random.normal((cfg["batch"], length, cfg["input"])).astype(dt)
        models = {name: layer}
        if cfg["kind"] == "stack" and stock:
            models["stock"] = StockComposition.from_torch_layout(layer)  # folded in float32, then cast
        lengths = (mx.array(seeded_lengths(cfg["batch"], length, seed), dtype=mx.int32)
                   if cfg["lengths"] else None)
        for impl, model in models.items():
            if dt != mx.float32:
                model.set_dtype(dt)
            mx.eval(model.parameters(), x)
            runs[impl] = _make_run(model, x, lengths, cfg["mode"])
    return runs


def _make_run(model, x, lengths, mode):
    stock = isinstance(model, StockComposition)

    def forward(x):
        return model(x, lengths=lengths)

    if mode == "fwd":
        def run():
            output, states = forward(x)
            results = [output, *(states if isinstance(states, tuple) else (states,))]
            mx.eval(results)
            return results
        return run

    def loss_fn(params, x):
        model.update(params)
        return forward(x)[0].astype(mx.float32).mean()

    value_and_grad = mx.value_and_grad(loss_fn, argnums=(0, 1))
    params = model.trainable_parameters()

    def run():
        loss, (grads, grad_x) = value_and_grad(params, x)
        mx.eval(loss, grads, grad_x)
        if stock:
            grads = model.grads_to_torch_layout(grads)
        return [loss, *(grads[k] for k in sorted(grads)), grad_x]

    return run


# ---------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--slow", type=float, default=2.0,
                   help="a config whose first call takes longer than this (s) is timed by that call only "
                        "(default 2.0; 0 disables)")
    p.add_argument("--interleave-below", type=float, default=2.0, metavar="MS",
                   help="configs where both medians are below this are timed again in alternating rounds "
                        "(default 2.0; 0 disables)")
    return p.parse_args(argv)


def time_config(cfg, args, slow):
    """-> ({impl: stats}, {impl: results}) for one config."""
    runs = make_runs(cfg, seed=args.seed)
    twins = make_runs(cfg, seed=args.seed, length=2) if cfg["length"] > 2 else runs
    stats, outs = {}, {}
    for impl, run in runs.items():
        stats[impl], outs[impl] = measure(run, budget=args.budget, min_repeats=args.min_repeats,
                                          max_repeats=args.max_repeats, max_warmup=args.warmup,
                                          slow=slow, prewarm=twins[impl])
    if (args.interleave_below > 0 and not any(s["single_call"] for s in stats.values())
            and max(s["median_ms"] for s in stats.values()) < args.interleave_below):
        timed = measure_interleaved(runs, budget=args.budget, min_repeats=args.min_repeats)
        for impl, old in stats.items():
            stats[impl] = _stats(timed[impl], warmup=old["warmup"], first_ms=old["first_ms"],
                                 prewarm_ms=old["prewarm_ms"], single_call=False, interleaved=True)
    return stats, outs


def print_tables(results):
    stack = [r for r in results if r["kind"] == "stack" and r["impl"] == "fastrnn"]
    by_key = {(r["kind"], r["config"], r["impl"]): r for r in results}
    header = (f"{'dtype':8} {'layer':5} {'stack':6} {'shape':18} {'mode':6} {'lengths':7} {'fastrnn ms':>16} "
              f"{'stock ms':>16} {'speed-up':>8} {'n':>7} {'rel.diff':>8} agree")
    print("\n# stock = mlx.nn layers composed per direction and layer; speed-up = stock / fastrnn; "
          "* = one call only\n" + header + "\n" + "-" * len(header))
    for r in stack:
        s = by_key.get(("stack", r["config"], "stock"), {})
        ok = "error" not in r and "error" not in s
        speed = f"{r['speedup_vs_stock']:.2f}x" if r.get("speedup_vs_stock") else "-"
        diff = f"{r['rel_diff_vs_stock']:.1e}" if "rel_diff_vs_stock" in r else "-"
        n = f"{r.get('repeats', '-')}/{s.get('repeats', '-')}"
        print(f"{r['dtype']:8} {r['layer']:5} {str(r['num_layers']) + 'L' + ('bi' if r['bidirectional'] else 'uni'):6} "
              f"{r['shape']:18} {r['mode']:6} {'yes' if r['lengths'] else '-':7} "
              f"{fmt_ms(r) if ok else 'error':>16} {fmt_ms(s) if ok else 'error':>16} {speed:>8} {n:>7} "
              f"{diff:>8} {r.get('agree', '-')}")
    bidir = [r for r in results if r["kind"] == "directions" and r["impl"] == "bidirectional"]
    if bidir:
        header = (f"{'dtype':8} {'layer':5} {'shape':18} {'mode':6} {'bidirectional ms':>16} "
                  f"{'one dir ms':>16} {'bi / one':>8}")
        print("\n# one fastrnn layer (num_layers=1): bidirectional vs one direction (target <= 1.3x on a GPU)\n"
              + header + "\n" + "-" * len(header))
        for r in bidir:
            u = by_key.get(("directions", r["config"], "one_direction"), {})
            ok = "error" not in r and "error" not in u
            ratio = f"{r['bidir_vs_one_direction']:.2f}x" if r.get("bidir_vs_one_direction") else "-"
            print(f"{r['dtype']:8} {r['layer']:5} {r['shape']:18} {r['mode']:6} "
                  f"{fmt_ms(r) if ok else 'error':>16} {fmt_ms(u) if ok else 'error':>16} {ratio:>8}")


def main(argv=None):
    args = parse_args(argv)
    slow = args.slow if args.slow and args.slow > 0 else None
    dev = device_meta()
    configs = build_configs(args, on_gpu=dev["device_type"] == "gpu")
    meta = {
        "tool": "pytorch_layers_bench",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mlx_version": mx.__version__,
        "mlx_fastrnn_version": getattr(mlx_fastrnn, "__version__", "?"),
        "impl": mlx_fastrnn.current_impl(), "env_MLX_RNN_IMPL": os.environ.get("MLX_RNN_IMPL"),
        "agree_tol": AGREE_TOL, "budget_s": args.budget, "min_repeats": args.min_repeats, "slow_s": slow,
        "seed": args.seed, **dev, "machine": machine_meta(), "configs": len(configs), "complete": False,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    results = []
    write_json(args.json, meta, results)
    print(f"# mlx_fastrnn.pytorch benchmark: device {meta['device']} ({meta['backend']}"
          f"{', ' + meta['device_name'] if meta.get('device_name') else ''}), mlx {mx.__version__}, "
          f"{meta['date']}; {len(configs)} configs; median ms ±IQR", flush=True)
    t_start = time.perf_counter()
    for i, cfg in enumerate(configs, 1):
        label = config_label(cfg)
        print(f"# [{i}/{len(configs)}, {time.perf_counter() - t_start:.1f} s] {label}", flush=True)
        base = {**cfg, "config": label,
                "lengths_values": seeded_lengths(cfg["batch"], cfg["length"], args.seed) if cfg["lengths"] else None}
        impls = ["fastrnn", "stock"] if cfg["kind"] == "stack" else ["bidirectional", "one_direction"]
        try:
            stats, outs = time_config(cfg, args, slow)
        except Exception as e:  # keep going; record the failure
            msg = f"{type(e).__name__}: {e}"
            print(f"#   FAILED {msg[:300]}", flush=True)
            results.extend({**base, "impl": impl, "error": msg[:2000]} for impl in impls)
            write_json(args.json, meta, results)
            continue
        rows = {impl: {**base, "impl": impl, **stats[impl]} for impl in impls}
        for impl in impls:
            if impl == "one_direction":
                rows[impl]["bidirectional"] = False
        first, second = rows[impls[0]], rows[impls[1]]
        if cfg["kind"] == "stack":
            first["speedup_vs_stock"] = second["median_ms"] / first["median_ms"]
            first["rel_diff_vs_stock"] = diff = rel_diff(outs["fastrnn"], outs["stock"])
            first["agree"] = bool(diff <= AGREE_TOL[cfg["dtype"]])
            line = (f"fastrnn {fmt_ms(first)}  stock {fmt_ms(second)}  speed-up {first['speedup_vs_stock']:.2f}x  "
                    f"rel.diff {diff:.1e}{'' if first['agree'] else ' DISAGREE'}")
        else:
            first["bidir_vs_one_direction"] = first["median_ms"] / second["median_ms"]
            line = (f"bidirectional {fmt_ms(first)}  one direction {fmt_ms(second)}  "
                    f"bi/one {first['bidir_vs_one_direction']:.2f}x")
        print(f"{label}: {line}", flush=True)
        results.extend(rows.values())
        outs = stats = None
        write_json(args.json, meta, results)
        mx.clear_cache()
    meta["complete"] = True
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None  # other work on the machine
    write_json(args.json, meta, results)
    print_tables(results)
    bad = [r["config"] for r in results if "error" in r or r.get("agree") is False]
    print(f"# done in {meta['elapsed_s']} s" + (f"; results in {args.json}" if args.json else "")
          + (f"; FAILED or DISAGREE: {sorted(set(bad))}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
