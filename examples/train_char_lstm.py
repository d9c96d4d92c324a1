"""Train a small character-level LSTM language model with mlx_fastrnn.LSTM.

The text is Python's own: the Zen of Python (the ``this`` module, decoded) and
the source of a few pure-Python standard-library modules, so nothing is
downloaded. The model is embedding -> mlx_fastrnn.LSTM -> linear. It prints the
training loss every ``--log-every`` steps with tokens/s, a short sample, and at
the end times the same training step under ``use_impl("legacy")`` (stock
mlx.nn) and ``use_impl("fast")``.

    python examples/train_char_lstm.py [--steps 250] [--hidden 128] [--seq 32] [--batch 32]

The training itself runs with the implementation ``MLX_RNN_IMPL`` selects
(``fast`` unless set). Defaults take about a minute on a 2-core CPU.
"""

import argparse
import codecs
import contextlib
import inspect
import io
import math
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

import mlx_fastrnn

STDLIB_MODULES = ("textwrap", "string", "bisect", "heapq", "fnmatch", "colorsys", "shlex")


def load_text():
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
        import this

    parts = [codecs.decode(this.s, "rot13")]
    for name in STDLIB_MODULES:
        try:
            parts.append(inspect.getsource(__import__(name)))
        except (ImportError, OSError, TypeError):  # e.g. a stripped install without .py files
            pass
    return "\n\n".join(parts)


class CharLSTM(nn.Module):
    def __init__(self, vocab, embed, hidden):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = mlx_fastrnn.LSTM(embed, hidden)
        self.out = nn.Linear(hidden, vocab)

    def __call__(self, tokens, hidden=None, cell=None):
        h, c = self.lstm(self.embed(tokens), hidden, cell)
        return self.out(h), h[..., -1, :], c[..., -1, :]


def loss_fn(model, x, y):
    logits, _, _ = model(x)
    return nn.losses.cross_entropy(logits, y, reduction="mean")


def make_step(model, opt):
    """A compiled training step. Build one per implementation: mx.compile traces
    the layer once, so the implementation in effect at the first call is baked in."""
    state = [model.state, opt.state]
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        opt.update(model, grads)
        return loss

    return step, state


def batches(data, batch, seq, key):
    starts = mx.random.randint(0, data.size - seq - 1, (batch,), key=key)
    idx = starts[:, None] + mx.arange(seq + 1)[None]
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


def sample(model, stoi, itos, prompt, length, temperature=0.8, key=None):
    tokens = mx.array([[stoi.get(ch, 0) for ch in prompt]])
    logits, h, c = model(tokens)
    out = []
    for _ in range(length):
        key, sub = mx.random.split(key)
        nxt = mx.random.categorical(logits[:, -1, :] / temperature, key=sub)
        out.append(itos[nxt.item()])
        logits, h, c = model(nxt[:, None], h, c)
    return prompt + "".join(out)


def time_impl(impl, args, vocab, data, weights):
    """Tokens/s of the compiled training step with ``impl``, same weights and batches."""
    model = CharLSTM(vocab, args.embed, args.hidden)
    model.update(weights)
    opt = optim.Adam(learning_rate=args.lr)
    with mlx_fastrnn.use_impl(impl):
        step, state = make_step(model, opt)
        keys = mx.random.split(mx.random.key(7), args.bench_steps + 2)
        xy = [batches(data, args.batch, args.seq, k) for k in keys]
        for x, y in xy[:2]:  # warm-up (compile)
            mx.eval(step(x, y), state)
        tic = time.perf_counter()
        for x, y in xy[2:]:
            mx.eval(step(x, y), state)
        seconds = time.perf_counter() - tic
    return args.bench_steps * args.batch * args.seq / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250, help="training steps (default 250)")
    p.add_argument("--hidden", type=int, default=128, help="LSTM hidden size (default 128)")
    p.add_argument("--seq", type=int, default=32, help="characters per sequence (default 32)")
    p.add_argument("--batch", type=int, default=32, help="sequences per batch (default 32)")
    p.add_argument("--embed", type=int, default=32, help="embedding size (default 32)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--log-every", type=int, default=25, help="print the loss every N steps")
    p.add_argument("--bench-steps", type=int, default=10,
                   help="timed steps per implementation in the final comparison (0: skip it)")
    p.add_argument("--sample", type=int, default=120, help="characters to sample at the end (0: none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    text = load_text()
    itos = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(itos)}
    data = mx.array([stoi[ch] for ch in text], dtype=mx.int32)
    vocab = len(itos)
    print(f"text: {len(text):,} characters from `this` + {', '.join(STDLIB_MODULES)}; "
          f"vocabulary {vocab}; uniform-guess loss {math.log(vocab):.3f}")
    print(f"model: Embedding({vocab}, {args.embed}) -> mlx_fastrnn.LSTM({args.embed}, {args.hidden}) "
          f"-> Linear({args.hidden}, {vocab}); impl={mlx_fastrnn.current_impl()}, "
          f"device={mx.default_device()}")

    mx.random.seed(args.seed)
    model = CharLSTM(vocab, args.embed, args.hidden)
    mx.eval(model.parameters())
    weights = model.parameters()  # kept for the timing comparison at the end
    opt = optim.Adam(learning_rate=args.lr)
    step, state = make_step(model, opt)

    key = mx.random.key(args.seed)
    window, first_loss, last_loss = [], None, None
    tic = time.perf_counter()
    tokens_since = 0
    for i in range(1, args.steps + 1):
        key, sub = mx.random.split(key)
        x, y = batches(data, args.batch, args.seq, sub)
        loss = step(x, y)
        mx.eval(loss, state)
        window.append(loss.item())
        tokens_since += x.size
        if i % args.log_every == 0 or i == args.steps:
            mean = sum(window) / len(window)
            first_loss = mean if first_loss is None else first_loss
            last_loss = mean
            now = time.perf_counter()
            print(f"step {i:5d}  loss {mean:.4f}  {tokens_since / (now - tic):8.0f} tokens/s")
            window, tokens_since, tic = [], 0, time.perf_counter()

    if args.sample > 0:
        print("sample:", repr(sample(model, stoi, itos, "def ", args.sample, key=mx.random.key(1))))

    print(f"loss: {first_loss:.4f} -> {last_loss:.4f} "
          f"({'fell' if last_loss < first_loss else 'did NOT fall'})")

    if args.bench_steps > 0:
        rates = {impl: time_impl(impl, args, vocab, data, weights) for impl in ("legacy", "fast")}
        print(f"training tokens/s, {args.bench_steps} compiled steps, batch {args.batch} x seq "
              f"{args.seq}, hidden {args.hidden}, {mx.default_device()}:")
        for impl, rate in rates.items():
            print(f"  {impl:6s} {rate:10.0f} tokens/s")
        print(f"  fast / legacy: {rates['fast'] / rates['legacy']:.2f}x")


if __name__ == "__main__":
    main()
