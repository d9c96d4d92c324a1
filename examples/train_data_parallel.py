"""Data-parallel training of a stacked bidirectional LSTM with MLX's own distributed layer.

Every process builds the same model (same seed), takes its own shard of the
global batch and averages its gradients with the others' through
``mlx.nn.average_gradients`` before each optimizer step, so all processes keep
identical parameters and train as one process would on the whole batch. The
model is ``mlx_fastrnn.pytorch.LSTM`` (torch.nn.LSTM's constructor and parameter
names; 2 layers, bidirectional) -> mean over time -> linear. The task is
synthetic sequence classification (labels from a fixed random "teacher") on one
fixed batch made from ``--seed``, so nothing is downloaded.

Two processes on this machine (MLX's ring backend over 127.0.0.1):

    mlx.launch -n 2 --python "$(command -v python)" -- examples/train_data_parallel.py --steps 20

``--python`` is needed: without it mlx.launch executes the script file itself.
The ``--`` keeps mlx.launch's own options (``-n``, ``--env``, ...) from being
picked out of the script's arguments. The ring listens on ``--starting-port``
(default 32323) and the next port, one per process. One process:

    python examples/train_data_parallel.py --steps 20

Rank 0 prints the loss of the global batch at every step, ``loss: A -> B`` and
the tokens/s of the whole job. With ``--out DIR`` every rank writes its
parameters to ``DIR/rank{r}.safetensors`` and rank 0 also writes the initial
ones to ``DIR/init.safetensors``.
"""

import argparse
import os
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_fastrnn.pytorch import LSTM


class Classifier(nn.Module):
    def __init__(self, features, hidden, classes):
        super().__init__()
        self.lstm = LSTM(features, hidden, num_layers=2, bias=True, batch_first=True,
                         dropout=0.0, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def __call__(self, x):
        out, (h_n, c_n) = self.lstm(x, lengths=None)  # out: (B, L, 2 * hidden)
        return self.head(out.mean(axis=1))


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="global batch (all processes together)")
    ap.add_argument("--seq", type=int, default=16, help="sequence length")
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", metavar="DIR", help="write DIR/rank{r}.safetensors (and DIR/init.safetensors)")
    return ap.parse_args()


def init_distributed():
    # `mlx.launch -n 1` hands its single process an empty hostfile, which
    # mx.distributed.init() cannot parse; one process needs no hostfile at all.
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile) and not open(hostfile).read().strip():
        del os.environ["MLX_HOSTFILE"]
    return mx.distributed.init()  # the launched group, or a group of one without mlx.launch


def save(model, path, **metadata):
    mx.save_safetensors(path, dict(tree_flatten(model.parameters())),
                        metadata={k: str(v) for k, v in metadata.items()})


def main():
    args = parse_args()
    group = init_distributed()
    rank, size = group.rank(), group.size()
    if args.batch % size:
        raise SystemExit(f"--batch {args.batch} does not split evenly over {size} processes")
    shard = args.batch // size  # equal shards: the mean of the shards' losses is the batch's
    say = print if rank == 0 else (lambda *a, **k: None)

    # The same seed on every rank: the same initial parameters and the same data.
    mx.random.seed(args.seed)
    model = Classifier(args.features, args.hidden, args.classes)
    mx.eval(model.parameters())
    # The training set: one fixed global batch; every step is a full pass over it.
    k_teacher, k_data = mx.random.split(mx.random.key(args.seed + 1))
    teacher = mx.random.normal((args.features, args.classes), key=k_teacher)
    x = mx.random.normal((args.batch, args.seq, args.features), key=k_data)
    y = mx.argmax(x.mean(axis=1) @ teacher, axis=-1)
    x, y = x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]  # this rank's shard
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        if rank == 0:
            save(model, os.path.join(args.out, "init.safetensors"), size=size, steps=0)

    optimizer = optim.Adam(learning_rate=args.lr)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    say(f"{size} process(es); global batch {args.batch} = {size} x {shard} sequences of {args.seq}", flush=True)

    losses, t0 = [], None
    for step in range(args.steps):
        if step == 1:
            t0 = time.perf_counter()  # step 0 is the warm-up
        loss, grads = loss_and_grad(model, x, y)
        grads = nn.average_gradients(grads)  # all_sum over the group / size (a no-op for one process)
        optimizer.update(model, grads)
        loss = mx.distributed.all_sum(loss) / size  # the global batch's loss, for printing
        mx.eval(loss, model.parameters(), optimizer.state)
        losses.append(loss.item())
        say(f"step {step + 1:3d}  loss {losses[-1]:.4f}", flush=True)

    if losses:
        say(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
    if t0 is not None:
        rate = (args.steps - 1) * args.batch * args.seq / (time.perf_counter() - t0)
        say(f"tokens/s: {rate:.0f} ({size} process(es) together, steps 2-{args.steps})")
    if args.out:
        save(model, os.path.join(args.out, f"rank{rank}.safetensors"), rank=rank, size=size, steps=args.steps)


if __name__ == "__main__":
    main()
