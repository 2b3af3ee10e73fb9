"""Digits: a BatchNorm CNN trained with the full batch and with 8 micro-batches.

Trains a small Flax Linen CNN with BatchNorm on scikit-learn's 8x8 handwritten
digits twice, from the same initialization and on the same sequence of
batches of ``--batch`` images:

1. full batch: ``jax.value_and_grad`` on the whole batch in one pass;
2. accumulated: ``jaxaccum.value_and_grad(..., num_microbatches=8,
   state_argnums=2)``, the same step in one jitted call, with the BatchNorm
   ``batch_stats`` threaded through the micro-batches.

Both use the idiomatic ``flax.training.train_state.TrainState`` with a
``batch_stats`` field. With BatchNorm, accumulation does not reproduce the
full-batch gradient: each micro-batch is normalized with its own statistics,
as a batch of ``--batch / 8`` images would be, and the running statistics are
updated micro-batch after micro-batch (``state_policy="sequential"``). The two
runs differ, but reach similar accuracy. It prints the final test accuracies
and the compiled temporary memory of one step of each, and writes the loss and
test-accuracy curves to ``digits_cnn.png`` in ``--out``. About a minute on a
2-core CPU:

  python examples/digits_cnn.py
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax.training import train_state
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxaccum

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class Conv3x3(nn.Module):
  """A 3x3 ``"SAME"`` convolution as one matrix product over 9 shifted copies.

  The same function as ``nn.Conv(features, (3, 3))`` (its kernel reshaped to
  ``(9 * in_features, features)``). XLA:CPU compiles the kernel gradient of a
  convolution inside a loop body to a naive loop nest, which made this model's
  accumulated step over ten times slower than the full batch
  (https://github.com/jax-ml/jax/issues/12868); as a matrix product, the
  micro-batch loop runs at full speed on CPU too.
  """

  features: int

  @nn.compact
  def __call__(self, x):
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = [padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)]
    return nn.Dense(self.features)(jnp.concatenate(shifted, axis=-1))


class CNN(nn.Module):
  """Two 3x3 convolutions with BatchNorm, global average pooling, a classifier."""

  widths: tuple[int, ...] = (32, 64)

  @nn.compact
  def __call__(self, x, train: bool):
    for width in self.widths:
      x = Conv3x3(width)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


MODEL = CNN()


class TrainState(train_state.TrainState):
  batch_stats: Any


def loss_fn(params, batch, batch_stats):
  """Mean cross-entropy of ``batch = (images, labels)``, and new statistics.

  Returns ``(loss, new_batch_stats)``: the form that
  ``jaxaccum.value_and_grad(..., state_argnums=2)`` threads through the
  micro-batches, and that ``jax.value_and_grad(..., has_aux=True)`` returns.
  """
  images, labels = batch
  logits, updates = MODEL.apply({"params": params, "batch_stats": batch_stats}, images,
                                train=True, mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, updates["batch_stats"]


def make_step(grad_fn):
  """The usual Flax step, with the gradient from ``grad_fn``."""

  def step(state, batch):
    (loss, batch_stats), grads = grad_fn(state.params, batch, state.batch_stats)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss

  return step


@jax.jit
def evaluate(state, images, labels):
  """Test loss and accuracy with the running BatchNorm statistics."""
  logits = MODEL.apply({"params": state.params, "batch_stats": state.batch_stats},
                       images, train=False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def batches(rng, rows, batch, steps):
  """Indices of ``steps`` batches: epochs of a shuffled order, in fixed-size chunks."""
  order = np.concatenate([rng.permutation(rows) for _ in range(steps * batch // rows + 1)])
  return order[:steps * batch].reshape(steps, batch)


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
  parser.add_argument("--batch", type=int, default=256, help="images per optimizer step")
  parser.add_argument("--microbatches", type=int, default=8,
                      help="micro-batches per optimizer step")
  parser.add_argument("--lr", type=float, default=3e-3, help="adamw learning rate")
  parser.add_argument("--eval-every", type=int, default=10,
                      help="steps between evaluations")
  parser.add_argument("--out", default=".", help="folder for digits_cnn.png")
  args = parser.parse_args()
  n = args.microbatches
  begin = time.perf_counter()

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
  x_train, x_test, y_train, y_test = train_test_split(
      images, digits.target.astype(np.int32), test_size=0.2, random_state=0,
      stratify=digits.target)
  print(f"digits: {len(x_train)} training and {len(x_test)} test images; "
        f"{args.steps} steps of {args.batch} images")

  params_and_stats = MODEL.init(jax.random.key(0), jnp.asarray(x_train[:2]), train=False)
  tx = optax.adamw(args.lr, weight_decay=1e-4)
  initial = TrainState.create(apply_fn=MODEL.apply, params=params_and_stats["params"],
                              tx=tx, batch_stats=params_and_stats["batch_stats"])
  steps = {
      "full batch": make_step(jax.value_and_grad(loss_fn, has_aux=True)),
      f"N={n} micro-batches": make_step(jaxaccum.value_and_grad(
          loss_fn, num_microbatches=n, state_argnums=2)),
  }
  order = batches(np.random.default_rng(0), len(x_train), args.batch, args.steps)
  example = (jnp.asarray(x_train[order[0]]), jnp.asarray(y_train[order[0]]))
  test = (jnp.asarray(x_test), jnp.asarray(y_test))

  results = {}
  for name, step in steps.items():
    compiled = jax.jit(step).lower(initial, example).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    state = initial
    losses, evals = [], []
    start = time.perf_counter()
    for i in tqdm(range(args.steps), desc=name, leave=False):
      state, loss = compiled(state, (jnp.asarray(x_train[order[i]]),
                                     jnp.asarray(y_train[order[i]])))
      losses.append(loss)
      if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
        evals.append((i + 1, *map(float, evaluate(state, *test))))
    seconds = time.perf_counter() - start
    results[name] = dict(losses=np.asarray(jax.device_get(losses)), evals=np.asarray(evals),
                         temp=temp, seconds=seconds)

  print(f"after {args.steps} steps (adamw, lr {args.lr}, same init and batches):")
  for name, r in results.items():
    _, test_loss, accuracy = r["evals"][-1]
    print(f"  {name:18s} test accuracy {accuracy:.4f}   test loss {test_loss:.4f}   "
          f"last batch loss {r['losses'][-1]:.4f}   {r['seconds']:.1f} s")
  print("compiled temporary memory of one training step (memory_analysis):")
  base = results["full batch"]["temp"]
  for name, r in results.items():
    print(f"  {name:18s} {r['temp'] / 2**20:7.2f} MiB  ({r['temp'] / base:.2f}x full batch)")

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for color, (name, r) in zip(("C0", "C1"), results.items()):
    ax_loss.plot(np.arange(1, args.steps + 1), r["losses"], color=color, alpha=0.6,
                 label=f"{name} (train)")
    ax_loss.plot(r["evals"][:, 0], r["evals"][:, 1], "--", color=color,
                 label=f"{name} (test)")
    ax_acc.plot(r["evals"][:, 0], r["evals"][:, 2], marker=".", color=color, label=name)
  ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy", yscale="log",
              title="loss")
  ax_acc.set(xlabel="optimizer step", ylabel="accuracy", title="test accuracy",
             ylim=(0, 1))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
  ax_loss.legend()
  ax_acc.legend(loc="lower right")
  fig.suptitle(f"digits CNN with BatchNorm: effective batch {args.batch}, "
               f"full batch vs {n} micro-batches")
  fig.tight_layout()
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "digits_cnn.png")
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")
  print(f"done in {time.perf_counter() - begin:.1f} s on {jax.devices()[0].platform}")


if __name__ == "__main__":
  main()
