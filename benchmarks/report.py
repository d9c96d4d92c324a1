"""Merge recurrent_bench.py / torch_baseline.py JSON results into markdown tables.

    python benchmarks/report.py /tmp/cpu_f32.json                         # to stdout
    python benchmarks/report.py $OUT/mlx_*.json $OUT/torch.json --out $OUT/results.md --png $OUT/speedup.png

One table per (machine, device, dtype): stock mlx.nn (legacy) / fast / cuDNN
median ms and the speed-ups (stock / fast, cuDNN / fast: above 1 = fast is
quicker). Results from runs of one impl each (``MLX_RNN_IMPL=legacy`` and
``=fast`` separately) merge the same way as a ``--compare`` run. Partial files
(a run killed by a timeout) are fine. ``--png`` draws a bar chart of the
speed-ups when matplotlib can be imported, and is skipped otherwise.

``--flashrnn``: the files are flashrnn_bench.py (ours) and flashrnn_torch.py
(FlashRNN) results instead: FlashRNN's fastest backend ÷ ours per configuration
timed on both sides, summarised by subset (dtype and mode, N·D, where
``triton_fused`` is FlashRNN's fastest), then every configuration where ours is slower.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shapes import DTYPES, LAYERS, MODES, SHAPES  # noqa: E402

IMPL_ORDER = ("legacy", "fast", "cudnn", "torch-cpu")
SHAPE_ORDER = {s[0]: i for i, s in enumerate(SHAPES)}


def load(paths):
    """-> sections: {(host, device_type, dtype): {"meta": [...], "rows": {(layer, shape, mode): {impl: rec}}}}"""
    sections = {}
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            print(f"report: skipping {path}: {e}", file=sys.stderr)
            continue
        meta = data.get("meta", {})
        host = meta.get("machine", {}).get("hostname", "?")
        dev = meta.get("device_type", "?")
        for rec in data.get("results", []):
            key = (host, dev, rec.get("dtype", "?"))
            sec = sections.setdefault(key, {"meta": [], "rows": {}})
            if not any(m is meta for m in sec["meta"]):
                sec["meta"].append(meta)
            row = sec["rows"].setdefault((rec["layer"], rec["shape"], rec["mode"]), {})
            row[rec.get("impl", "?")] = rec
    return sections


def _ms(rec, iqr=False):
    if rec is None:
        return ""
    if "error" in rec:
        return "error"
    m = rec["median_ms"]
    d = 3 if m < 1 else 2 if m < 100 else 1 if m < 1000 else 0
    s = f"{m:.{d}f}"
    if rec.get("single_call"):
        s += "*"
    elif iqr:
        s += f" ±{rec['iqr_ms']:.{d}f}"
    return s


def _ratio(num, den):
    if not num or not den or "error" in num or "error" in den or den["median_ms"] <= 0:
        return None
    return num["median_ms"] / den["median_ms"]


def _sort_key(item):
    (layer, shape, mode), _ = item
    return (
        LAYERS.index(layer) if layer in LAYERS else 99,
        SHAPE_ORDER.get(shape, 99),
        shape,
        MODES.index(mode) if mode in MODES else 99,
    )


def _describe(metas):
    lines = []
    for m in metas:
        tool = m.get("tool", "?")
        if tool == "torch_baseline":
            lines.append(f"- cuDNN: torch {m.get('torch_version')}, CUDA {m.get('cuda_version')}, cuDNN "
                         f"{m.get('cudnn_version')}, {m.get('device_name')}, {m.get('date')}"
                         f"{'' if m.get('complete') else ' (INCOMPLETE run)'}: `{m.get('command')}`")
        else:
            mach = m.get("machine", {})
            lines.append(f"- MLX {m.get('mlx_version')} ({m.get('backend')}, {m.get('device')}"
                         f"{', ' + m['device_name'] if m.get('device_name') else ''}), impl {m.get('impl')}, "
                         f"{m.get('date')}, {mach.get('nproc')} cores {mach.get('cpu_model', '')}"
                         f"{'' if m.get('complete') else ' (INCOMPLETE run)'}: `{m.get('command')}`")
    return lines


def render(sections, iqr=False):
    out = []
    def order(item):
        host, dev, dtype = item[0]
        return (host, dev, DTYPES.index(dtype) if dtype in DTYPES else 99, dtype)

    for (host, dev, dtype), sec in sorted(sections.items(), key=order):
        rows = sorted(sec["rows"].items(), key=_sort_key)
        impls = {i for _, r in rows for i in r}
        has = {i: i in impls for i in IMPL_ORDER}
        ref = "cudnn" if has["cudnn"] else "torch-cpu" if has["torch-cpu"] else None
        out.append(f"### {dev.upper()} ({host}), {dtype}\n")
        out.extend(_describe(sec["meta"]))
        out.append("")
        cols = ["layer", "shape B×L×H", "mode"]
        if has["legacy"]:
            cols.append("stock mlx.nn ms")
        if has["fast"]:
            cols.append("fast ms")
        if ref:
            cols.append("cuDNN ms" if ref == "cudnn" else "torch CPU ms")
        if has["legacy"] and has["fast"]:
            cols.append("fast vs stock")
        if ref and has["fast"]:
            cols.append("fast vs cuDNN" if ref == "cudnn" else "fast vs torch")
        has_err = any("rel_err_vs_f32" in rec for _, r in rows for rec in r.values())
        if has_err:
            cols += ["stock err vs f32", "fast err vs f32"]
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "|".join("---" if i < 3 else "--:" for i in range(len(cols))) + "|")
        speedups = {m: [] for m in MODES}
        vs_ref = {}  # (layer, mode) -> [ref / fast]
        for (layer, shape, mode), r in rows:
            cells = [layer, shape.replace("x", "×"), "fwd+bwd" if mode == "fwdbwd" else mode]
            if has["legacy"]:
                cells.append(_ms(r.get("legacy"), iqr))
            if has["fast"]:
                cells.append(_ms(r.get("fast"), iqr))
            if ref:
                cells.append(_ms(r.get(ref), iqr)
                             + ("†" if (r.get(ref) or {}).get("weights_repacked_per_call") else ""))
            if has["legacy"] and has["fast"]:
                s = _ratio(r.get("legacy"), r.get("fast"))
                cells.append(f"**{s:.2f}×**" if s else "")
                if s and mode in speedups:
                    speedups[mode].append(s)
            if ref and has["fast"]:
                s = _ratio(r.get(ref), r.get("fast"))
                cells.append(f"{s:.2f}×" if s else "")
                if s:
                    vs_ref.setdefault((layer, mode), []).append(s)
            if has_err:
                for impl in ("legacy", "fast"):
                    e = (r.get(impl) or {}).get("rel_err_vs_f32")
                    cells.append(f"{e:.1e}" if e is not None else "")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        notes = []
        for mode, vals in speedups.items():
            if vals:
                g = math.exp(sum(math.log(v) for v in vals) / len(vals))
                notes.append(f"{'fwd+bwd' if mode == 'fwdbwd' else mode} geomean fast vs stock "
                             f"{g:.2f}× (min {min(vals):.2f}×, max {max(vals):.2f}×, {len(vals)} configs)")
        if notes:
            out.append("Speed-up = other / fast (above 1: fast is quicker). " + "; ".join(notes) + ".")
        if vs_ref and ref == "cudnn":
            out.append("")
            out.append("| layer | mode | fast ≤ cuDNN time | geomean cuDNN ÷ fast | min | max |")
            out.append("|---|---|--:|--:|--:|--:|")
            for (layer, mode), vals in sorted(vs_ref.items(), key=lambda kv: (
                    LAYERS.index(kv[0][0]) if kv[0][0] in LAYERS else 99, kv[0][1])):
                g = math.exp(sum(math.log(v) for v in vals) / len(vals))
                out.append(f"| {layer} | {'fwd+bwd' if mode == 'fwdbwd' else mode} | "
                           f"{sum(v >= 1 for v in vals)} of {len(vals)} | {g:.2f}× | {min(vals):.2f}× | "
                           f"{max(vals):.2f}× |")
        diffs = [(rec["rel_diff_vs_legacy"], key) for key, r in rows for rec in r.values()
                 if "rel_diff_vs_legacy" in rec]
        if diffs:
            d, (layer, shape, mode) = max(diffs)
            out.append(f"Worst fast-vs-stock relative difference (max|fast-stock|/max|stock|, outputs or "
                       f"loss+gradients): {d:.1e} ({layer} {shape} {mode}).")
        if has_err:
            out.append("err vs f32 = the same measure against a float32 stock run on the same rounded "
                       "weights and inputs.")
        if any(rec.get("weights_repacked_per_call") for _, r in rows for rec in r.values()):
            out.append("`†` = PyTorch left the cuDNN weights unflattened (it does for bfloat16), so "
                       "they are re-packed on every call: a pessimistic cuDNN time.")
        if any(rec.get("single_call") for _, r in rows for rec in r.values()):
            out.append("`*` = a single call (the first call was slower than --slow seconds).")
        out.append("")
    return "\n".join(out)


def plot(sections, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"report: no PNG ({type(e).__name__}: matplotlib not importable)", file=sys.stderr)
        return False
    keys = sorted(sections)
    fig, axes = plt.subplots(len(keys), 1, figsize=(16, 5 * max(1, len(keys))), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        rows = sorted(sections[key]["rows"].items(), key=_sort_key)
        labels, vs_stock, vs_ref = [], [], []
        for (layer, shape, mode), r in rows:
            labels.append(f"{layer} {shape} {mode}")
            vs_stock.append(_ratio(r.get("legacy"), r.get("fast")) or 0)
            vs_ref.append(_ratio(r.get("cudnn"), r.get("fast")) or 0)
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], vs_stock, 0.4, label="stock mlx.nn / fast")
        if any(vs_ref):
            ax.bar([x + 0.2 for x in xs], vs_ref, 0.4, label="cuDNN / fast")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7, rotation=90)
        ax.set_ylabel("speed-up (x)")
        ax.set_title(f"{key[1]} ({key[0]}), {key[2]}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def heatmap(sections, path):
    """fast vs cuDNN (log2 of cuDNN time / fast time) per shape and mode, one panel
    per (dtype, layer); shapes ordered by batch, then hidden, then length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"report: no heat map ({type(e).__name__}: matplotlib not importable)", file=sys.stderr)
        return False
    panels = []
    for (host, dev, dtype), sec in sorted(sections.items(), key=lambda kv: (
            DTYPES.index(kv[0][2]) if kv[0][2] in DTYPES else 99)):
        for layer in LAYERS:
            cells = {(sh, mode): _ratio(r.get("cudnn"), r.get("fast"))
                     for (ly, sh, mode), r in sec["rows"].items() if ly == layer}
            cells = {k: v for k, v in cells.items() if v}
            if cells:
                panels.append((f"{layer} {dtype}", cells))
    if not panels:
        return False

    def dims(shape):
        b, length, h = (int(v) for v in shape.split("x"))
        return b, h, length

    fig, axes = plt.subplots(1, len(panels), figsize=(1.9 * len(panels) + 1.5, 11), squeeze=False)
    for n, (ax, (title, cells)) in enumerate(zip(axes[0], panels)):
        shapes = sorted({sh for sh, _ in cells}, key=dims)
        grid = [[math.log2(cells[(sh, m)]) if (sh, m) in cells else float("nan") for m in MODES] for sh in shapes]
        im = ax.imshow(grid, cmap="RdYlGn", vmin=-3, vmax=3, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{2 ** v:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(MODES)))
        ax.set_xticklabels(["fwd", "fwd+bwd"], fontsize=7)
        ax.set_yticks(range(len(shapes)))
        ax.set_yticklabels([s.replace("x", "×") for s in shapes] if n == 0 else [], fontsize=6)
        ax.set_title(title, fontsize=9)
    fig.suptitle("cuDNN time ÷ fast time (above 1, green: fast is quicker); shapes B×L×H", fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.5, label="log2(cuDNN / fast)")
    fig.savefig(path, dpi=110)
    return True


FLASHRNN_KEY = ("dtype", "function", "heads", "dim", "batch", "length", "mode")


def flashrnn_pairs(paths):
    """[(config, ours_ms, theirs_ms, their_backend)] over the configurations timed on
    both sides (FlashRNN: its fastest backend), from flashrnn_bench / flashrnn_torch files."""
    ours, theirs = {}, {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        tool = data.get("meta", {}).get("tool")
        for rec in data.get("results", []):
            if not rec.get("median_ms"):
                continue
            key = tuple(rec[k] for k in FLASHRNN_KEY)
            if tool == "flashrnn_torch":
                best = theirs.get(key)
                if best is None or rec["median_ms"] < best[0]:
                    theirs[key] = (rec["median_ms"], rec.get("backend", "?"))
            elif tool == "flashrnn_bench":
                ours[key] = rec["median_ms"]
    return [(k, ours[k], *theirs[k]) for k in sorted(ours) if k in theirs]


def render_flashrnn(pairs):
    """Markdown: FlashRNN ÷ ours (> 1: ours faster) by subset, then ours' losses."""
    def row(name, sel):
        if not sel:
            return None
        r = [t / o for _, o, t, _ in sel]
        g = math.exp(sum(map(math.log, r)) / len(r))
        return (f"| {name} | {len(r)} | {sum(x > 1 for x in r)} | {g:.2f}× | {min(r):.2f}× | "
                f"{max(r):.2f}× |")

    field = {k: i for i, k in enumerate(FLASHRNN_KEY)}
    subsets = [("all", pairs)]
    for dt in sorted({k[field["dtype"]] for k, *_ in pairs}):
        for mode in sorted({k[field["mode"]] for k, *_ in pairs}):
            subsets.append((f"{dt} {mode}", [p for p in pairs if p[0][field["dtype"]] == dt
                                             and p[0][field["mode"]] == mode]))
    for nd in sorted({k[field["heads"]] * k[field["dim"]] for k, *_ in pairs}):
        subsets.append((f"N·D = {nd}", [p for p in pairs if p[0][field["heads"]] * p[0][field["dim"]] == nd]))
    for b in sorted({k[field["batch"]] for k, *_ in pairs}):
        subsets.append((f"B = {b}", [p for p in pairs if p[0][field["batch"]] == b]))
    subsets.append(("where `triton_fused` is its fastest", [p for p in pairs if p[3] == "triton_fused"]))
    lines = ["| subset | configs | ours faster | geomean | min | max |", "|---|--:|--:|--:|--:|--:|"]
    lines += [r for r in (row(n, sel) for n, sel in subsets) if r]
    losses = sorted((t / o, k, o, t, be) for k, o, t, be in pairs if t < o)
    if losses:
        lines += ["", "Slower (FlashRNN ÷ ours, ours ms, FlashRNN ms and backend):", ""]
        lines += [f"- {' '.join(str(v) for v in k)}: {x:.2f}× ({o:.3f} / {t:.3f} ms, {be})"
                  for x, k, o, t, be in losses]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="result files from recurrent_bench.py / torch_baseline.py")
    p.add_argument("--out", default=None, help="write the markdown here (default: stdout)")
    p.add_argument("--png", default=None, help="also draw a speed-up bar chart here (needs matplotlib)")
    p.add_argument("--heatmap", default=None, help="also draw a fast-vs-cuDNN heat map here (needs matplotlib)")
    p.add_argument("--iqr", action="store_true", help="show ±IQR next to each median")
    p.add_argument("--title", default=None, help="a heading above the tables")
    p.add_argument("--flashrnn", action="store_true",
                   help="the files are flashrnn_bench.py / flashrnn_torch.py results: FlashRNN ÷ ours")
    args = p.parse_args(argv)
    paths = [q for q in args.json if os.path.exists(q)]
    missing = [q for q in args.json if not os.path.exists(q)]
    for q in missing:
        print(f"report: {q} does not exist (skipped)", file=sys.stderr)
    if not paths:
        print("report: none of the result files exists", file=sys.stderr)
        return 1
    if args.flashrnn:
        pairs = flashrnn_pairs(paths)
        text = (f"## {args.title}\n\n" if args.title else "") + (render_flashrnn(pairs) if pairs else "_no pairs_\n")
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        else:
            print(text)
        return 0
    sections = load(paths)
    text = (f"## {args.title}\n\n" if args.title else "") + (
        render(sections, iqr=args.iqr) if sections else "_no results_\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"report: wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    if args.png and sections:
        if plot(sections, args.png):
            print(f"report: wrote {args.png}", file=sys.stderr)
    if args.heatmap and sections:
        if heatmap(sections, args.heatmap):
            print(f"report: wrote {args.heatmap}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
