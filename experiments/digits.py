"""Quick start: train an MLP on scikit-learn's embedded digits, printing per-example GNQ.

    python -m experiments.digits
"""
import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import gujax


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    model = MLP()
    params = model.init(jax.random.key(args.seed), x[:1])["params"]
    opt = optax.sgd(0.1)
    opt_state = opt.init(params)

    def loss(p, ex):
        return -jax.nn.log_softmax(model.apply({"params": p}, ex["x"]))[ex["y"]]

    @jax.jit
    def step(params, opt_state, batch):
        grads = gujax.per_example_grads(loss, params, batch)
        scores = gujax.gnq(grads, reg=1e-2)
        mean = jax.tree_util.tree_map(lambda g: g.mean(0), grads)
        updates, opt_state = opt.update(mean, opt_state)
        return optax.apply_updates(params, updates), opt_state, scores

    rng = np.random.default_rng(args.seed)
    for epoch in range(args.epochs):
        order = rng.permutation(len(x))
        scores = []
        for i in range(0, len(x) - args.batch_size + 1, args.batch_size):
            idx = order[i:i + args.batch_size]
            params, opt_state, s = step(params, opt_state, {"x": x[idx], "y": y[idx]})
            scores.append(np.asarray(s))
        s = np.concatenate(scores)
        acc = float(np.mean(np.argmax(model.apply({"params": params}, x), -1) == y))
        print(f"epoch {epoch}: train acc {acc:.3f}  GNQ median {np.median(s):.3g}  "
              f"max {s.max():.3g}  disclosure max {0.5 * np.log1p(s.max()):.3g} nats")


if __name__ == "__main__":
    main()
