"""Write tests/fixtures/torch_golden.safetensors: PyTorch float64 results for mlx_fastrnn.pytorch.

Run by hand (needs torch, numpy and mlx; CI only reads the file):

    python tests/torch_golden.py

For every config in ``configs()`` it builds torch.nn.LSTM/GRU/RNN in float64,
rounds the weights, inputs and initial states to float32 (so the fixture's
float32 copies are *exactly* what was computed on), runs it -- with ``lengths``
through pack_padded_sequence(enforce_sorted=False) -> layer ->
pad_packed_sequence(total_length=L) -- and back-propagates the fixed loss

    sum(output * cot/output) + sum(h_n * cot/h_n) [+ sum(c_n * cot/c_n)]

Stored per config ``<name>/...`` (all float32 except lengths, int32):
``state_dict/<key>``, ``x``, ``h0``, ``c0``, ``lengths``, ``cot/<output|h_n|c_n>``,
``expect/<output|h_n|c_n>``, ``grad/x``, ``grad/h0``, ``grad/c0``,
``grad/state_dict/<key>``. The config list is JSON in the file's metadata
(key ``configs``), read back with ``mx.load(path, return_metadata=True)``.

tests/test_pytorch_golden.py also imports ``torch_reference`` from here for its
live comparisons against torch.
"""

import json
import os
import zlib

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "torch_golden.safetensors")

I, H, P, L, B = 5, 6, 3, 7, 4
LENGTHS = [7, 1, 5, 3]  # unsorted; one equal to L and one of 1

KINDS = {  # kind -> (torch.nn class name, extra constructor kwargs)
    "lstm": ("LSTM", {}),
    "gru": ("GRU", {}),
    "rnn_tanh": ("RNN", {}),
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
}

# option name -> (constructor kwargs, call options)
_VARIANTS = {
    "base": ({}, {}),
    "layers2": (dict(num_layers=2), {}),
    "layers3": (dict(num_layers=3), {}),
    "bidir": (dict(bidirectional=True), {}),
    "batch_first": (dict(batch_first=True), {}),
    "no_bias": (dict(bias=False), {}),
    "unbatched": ({}, dict(unbatched=True)),
    "hx": ({}, dict(hx=True)),
    "lengths": ({}, dict(lengths=LENGTHS)),
    "l2_bidir_len": (dict(num_layers=2, bidirectional=True), dict(lengths=LENGTHS)),
    "l3_bidir_bf_len_hx": (dict(num_layers=3, bidirectional=True, batch_first=True), dict(lengths=LENGTHS, hx=True)),
    "l2_bidir_nobias_unbatched_hx": (dict(num_layers=2, bidirectional=True, bias=False), dict(unbatched=True, hx=True)),
    "l2_bf_nobias_len_hx": (dict(num_layers=2, batch_first=True, bias=False), dict(lengths=LENGTHS, hx=True)),
}
_LSTM_VARIANTS = {
    "proj": (dict(proj_size=P), {}),
    "proj_l2_bidir_len_hx": (dict(proj_size=P, num_layers=2, bidirectional=True), dict(lengths=LENGTHS, hx=True)),
    "proj_unbatched_hx": (dict(proj_size=P), dict(unbatched=True, hx=True)),
    "proj_l3_bidir_bf_nobias": (dict(proj_size=P, num_layers=3, bidirectional=True, batch_first=True, bias=False), {}),
}


def make_config(name, kind, ctor, call, input_size=I, hidden_size=H, seq_len=L, batch=B):
    mode, extra = KINDS[kind]
    return {
        "name": name,
        "mode": mode,  # the class name, in torch.nn and in mlx_fastrnn.pytorch
        "kwargs": dict(extra, **ctor),
        "input_size": input_size,
        "hidden_size": hidden_size,
        "seq_len": seq_len,
        "batch": None if call.get("unbatched") else batch,
        "hx": bool(call.get("hx")),
        "lengths": call.get("lengths"),
        "seed": zlib.crc32(name.encode()) % (2**31),
    }


def configs():
    out = []
    for kind in KINDS:
        variants = dict(_VARIANTS, **(_LSTM_VARIANTS if kind == "lstm" else {}))
        for v, (ctor, call) in variants.items():
            out.append(make_config(f"{kind}-{v}", kind, ctor, call))
    return out


def torch_reference(cfg):
    """Float64 torch results for one config: a dict name -> numpy array (see module doc)."""
    import numpy as np
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    gen = torch.Generator().manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])  # torch.nn's init draws from the global generator
    kw = cfg["kwargs"]
    model = getattr(torch.nn, cfg["mode"])(cfg["input_size"], cfg["hidden_size"], dtype=torch.float64, **kw)
    model.eval()  # the fixture has no dropout; eval() keeps it that way regardless
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.float().double())  # computed on exactly the stored float32 values

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).double()

    nd = 2 if kw.get("bidirectional") else 1
    nl = kw.get("num_layers", 1)
    hout = kw.get("proj_size", 0) or cfg["hidden_size"]
    steps, batch = cfg["seq_len"], cfg["batch"]
    lead = () if batch is None else (batch,)
    if batch is not None and kw.get("batch_first"):
        x = randn(batch, steps, cfg["input_size"])
    else:
        x = randn(steps, *lead, cfg["input_size"])
    inputs = {"x": x.requires_grad_()}
    if cfg["hx"]:
        inputs["h0"] = randn(nl * nd, *lead, hout, scale=0.5).requires_grad_()
        if cfg["mode"] == "LSTM":
            inputs["c0"] = randn(nl * nd, *lead, cfg["hidden_size"], scale=0.5).requires_grad_()
    hx = None
    if cfg["hx"]:
        hx = (inputs["h0"], inputs["c0"]) if cfg["mode"] == "LSTM" else inputs["h0"]

    if cfg["lengths"] is not None:
        bf = bool(kw.get("batch_first"))
        packed = pack_padded_sequence(x, torch.tensor(cfg["lengths"]), batch_first=bf, enforce_sorted=False)
        out_packed, state = model(packed, hx)
        output, _ = pad_packed_sequence(out_packed, batch_first=bf, total_length=steps)
    else:
        output, state = model(x, hx)
    results = {"output": output}
    if cfg["mode"] == "LSTM":
        results["h_n"], results["c_n"] = state
    else:
        results["h_n"] = state

    cots = {k: randn(*v.shape) for k, v in results.items()}
    loss = sum((results[k] * cots[k]).sum() for k in results)
    loss.backward()

    def f32(t):
        return t.detach().to(torch.float32).numpy()

    arrays = {f"state_dict/{k}": f32(v) for k, v in model.state_dict().items()}
    arrays.update({k: f32(v) for k, v in inputs.items()})
    if cfg["lengths"] is not None:
        arrays["lengths"] = np.asarray(cfg["lengths"], dtype=np.int32)
    arrays.update({f"cot/{k}": f32(v) for k, v in cots.items()})
    arrays.update({f"expect/{k}": f32(v) for k, v in results.items()})
    arrays.update({f"grad/{k}": f32(v.grad) for k, v in inputs.items()})
    arrays.update({f"grad/state_dict/{k}": f32(v.grad) for k, v in model.named_parameters()})
    return arrays


def main():
    import mlx.core as mx
    import torch

    cfgs = configs()
    arrays = {}
    for cfg in cfgs:
        for k, v in torch_reference(cfg).items():
            arrays[f"{cfg['name']}/{k}"] = mx.array(v)
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    metadata = {
        "configs": json.dumps(cfgs),
        "torch_version": torch.__version__,
        "generator": "tests/torch_golden.py",
    }
    mx.save_safetensors(FIXTURE, arrays, metadata=metadata)
    print(f"wrote {FIXTURE}: {len(cfgs)} configs, {len(arrays)} arrays, "
          f"{os.path.getsize(FIXTURE) / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
