"""The one-line swap: an existing mlx.nn model, with its recurrent layers taken from mlx_fastrnn.

The model below is ordinary MLX code (a small speech-style frame classifier:
feature projection, two stacked LSTMs, a GRU, a linear head). Everything uses
``import mlx.nn as nn``; the only line that differs between the stock and the
fast version is where ``GRU`` and ``LSTM`` are imported from::

    from mlx.nn import GRU, LSTM          # stock
    from mlx_fastrnn import GRU, LSTM     # fast (drop-in subclasses)

This script builds the model both ways with the same weights, runs the same
forward pass and the same few training steps, and prints how far apart the two
are (float32 round-off, ~1e-6, is expected).

    python examples/swap_import.py [--steps 20] [--hidden 64] [--frames 50] [--batch 8]
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten


def import_layers(fast):
    """THE swap. In your own code this is a single import line at the top of the file."""
    global GRU, LSTM
    if fast:
        from mlx_fastrnn import GRU, LSTM
    else:
        from mlx.nn import GRU, LSTM


# --------------------------------------------------------------------------
# Unmodified model code: nothing below knows which GRU/LSTM it gets.
# --------------------------------------------------------------------------
class SpeechEncoder(nn.Module):
    """[batch, frames, n_mels] features -> [batch, frames, n_classes] logits."""

    def __init__(self, n_mels, hidden, n_classes):
        super().__init__()
        self.proj = nn.Linear(n_mels, hidden)
        self.lstm1 = LSTM(hidden, hidden)
        self.lstm2 = LSTM(hidden, hidden)
        self.gru = GRU(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, n_classes)

    def __call__(self, feats):
        x = nn.gelu(self.proj(feats))
        h, _ = self.lstm1(x)
        h2, _ = self.lstm2(h)
        x = h + h2
        x = x + self.gru(x)
        return self.head(self.norm(x))


def loss_fn(model, feats, labels):
    return nn.losses.cross_entropy(model(feats), labels, reduction="mean")


# --------------------------------------------------------------------------


def make_data(key, batch, frames, n_mels, n_classes):
    """Synthetic 'speech': smooth random features; each frame's label depends on
    the recent past of the features (so a recurrent model can learn it)."""
    k1, k2 = mx.random.split(key)
    noise = mx.random.normal((batch, frames, n_mels), key=k1)
    feats = mx.cumsum(noise, axis=1) / mx.sqrt(mx.arange(1, frames + 1, dtype=mx.float32))[:, None]
    proj = mx.random.normal((n_mels, n_classes), key=k2)
    labels = mx.argmax(feats @ proj, axis=-1)
    return feats, labels


def run(fast, weights, args, data):
    import_layers(fast)
    mx.random.seed(0)
    model = SpeechEncoder(args.n_mels, args.hidden, args.n_classes)
    model.update(weights)  # identical starting point for both versions
    mx.eval(model.parameters())

    feats, labels = data[0]
    out = model(feats)
    mx.eval(out)

    opt = optim.Adam(learning_rate=args.lr)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    losses = []
    tic = time.perf_counter()
    for step in range(args.steps):
        feats, labels = data[step % len(data)]
        loss, grads = loss_and_grad(model, feats, labels)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        losses.append(loss.item())
    seconds = time.perf_counter() - tic
    return out, losses, seconds, model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--frames", type=int, default=50, help="frames per utterance (default 50)")
    p.add_argument("--batch", type=int, default=8, help="utterances per batch (default 8)")
    p.add_argument("--n-mels", type=int, default=40)
    p.add_argument("--n-classes", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()

    key = mx.random.key(1234)
    data = [make_data(k, args.batch, args.frames, args.n_mels, args.n_classes)
            for k in mx.random.split(key, 4)]

    import_layers(fast=False)
    mx.random.seed(0)
    weights = SpeechEncoder(args.n_mels, args.hidden, args.n_classes).parameters()

    import mlx_fastrnn

    print(f"mlx_fastrnn implementation: {mlx_fastrnn.current_impl()} (MLX_RNN_IMPL), "
          f"device: {mx.default_device()}")
    results = {}
    for name, fast in (("stock mlx.nn", False), ("mlx_fastrnn", True)):
        results[name] = run(fast, weights, args, data)
        out, losses, seconds, _ = results[name]
        print(f"{name:13s} ({GRU.__module__}.GRU)  loss: {losses[0]:.4f} -> {losses[-1]:.4f}  "
              f"{args.steps} steps in {seconds:.2f} s")

    (out_s, loss_s, _, model_s), (out_f, loss_f, _, model_f) = results.values()
    out_diff = mx.max(mx.abs(out_s - out_f)).item()
    loss_diff = max(abs(a - b) for a, b in zip(loss_s, loss_f))
    param_diff = max(
        mx.max(mx.abs(a - b)).item()
        for (_, a), (_, b) in zip(tree_flatten(model_s.parameters()), tree_flatten(model_f.parameters()))
    )
    print(f"max |output stock - fast|            : {out_diff:.3e}")
    print(f"max |loss stock - fast| over {args.steps:3d} steps : {loss_diff:.3e}")
    print(f"max |parameter stock - fast| after training: {param_diff:.3e}")
    print(f"loss: {loss_f[0]:.4f} -> {loss_f[-1]:.4f} ({'fell' if loss_f[-1] < loss_f[0] else 'did NOT fall'})")


if __name__ == "__main__":
    main()
