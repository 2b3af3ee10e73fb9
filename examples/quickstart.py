"""Quickstart: the same training run with the full batch and with 8 micro-batches.

Trains a small Flax MLP classifier on synthetic data three ways with the same
effective batch of 2048 rows:

1. full batch: ``jax.value_and_grad`` on all rows, one ``optax.adamw`` step;
2. in-step accumulation: ``jaxaccum.value_and_grad(..., num_microbatches=8)``
   inside the same jitted step;
3. across-step accumulation: ``jaxaccum.multi_steps(adamw, every_k_schedule=8)``
   fed one 256-row micro-batch per call.

It prints how far apart the parameters end up (float32 rounding only) and the
compiled temporary memory of one step (``memory_analysis()``), which falls with
the number of micro-batches. Runs on CPU in well under a minute:

  python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxaccum


class MLP(nn.Module):
  width: int = 512
  depth: int = 3
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.gelu(nn.Dense(self.width)(x))
    return nn.Dense(self.classes)(x)


def make_data(key, rows: int, features: int = 64, classes: int = 10):
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (rows, features))
  labels = jnp.argmax(x @ jax.random.normal(kw, (features, classes)), axis=-1)
  return x, labels


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
  parser.add_argument("--batch", type=int, default=2048, help="rows per optimizer step")
  parser.add_argument("--microbatches", type=int, default=8,
                      help="micro-batches per optimizer step")
  args = parser.parse_args()
  n = args.microbatches

  model = MLP()
  x, labels = make_data(jax.random.key(0), args.batch)
  params = model.init(jax.random.key(1), x[:1])["params"]
  tx = optax.adamw(1e-3, weight_decay=1e-4)

  def loss_fn(params, batch):
    x, labels = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def make_step(grad_fn):
    @jax.jit
    def step(params, opt_state, batch):
      loss, grads = grad_fn(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    return step

  full_step = make_step(jax.value_and_grad(loss_fn))
  accum_step = make_step(jaxaccum.value_and_grad(loss_fn, num_microbatches=n))

  multi = jaxaccum.multi_steps(tx, every_k_schedule=n)

  @jax.jit
  def multi_step(params, opt_state, micro):
    loss, grads = jax.value_and_grad(loss_fn)(params, micro)
    updates, opt_state = multi.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.perf_counter()
  runs = {}
  for name, step in (("full batch", full_step), (f"value_and_grad N={n}", accum_step)):
    p, s = params, tx.init(params)
    for _ in range(args.steps):
      p, s, _ = step(p, s, (x, labels))
    runs[name] = p
  p, s = params, multi.init(params)
  for _ in range(args.steps):
    for i in range(n):  # the same strided micro-batches the in-step loop uses
      p, s, _ = multi_step(p, s, (x[i::n], labels[i::n]))
  runs[f"multi_steps k={n}"] = p

  reference = runs["full batch"]
  final_loss = jax.jit(loss_fn)
  print(f"{args.steps} optimizer steps of adamw, effective batch {args.batch}:")
  for name, p in runs.items():
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(reference)))
    print(f"  {name:24s} final loss {float(final_loss(p, (x, labels))):.6f}"
          f"   max |param - full batch| = {diff:.2e}")
  for name, p in runs.items():
    same = all(jnp.allclose(a, b, rtol=1e-4, atol=1e-5)
               for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(reference)))
    if not same:
      raise SystemExit(f"parameters of {name!r} do not match the full batch")
  print("parameters match the full-batch run (float32 rounding only)")

  print("compiled temporary memory of one training step (memory_analysis):")
  state = tx.init(params)
  base = None
  for count in (1, 2, 4, 8):
    step = make_step(jaxaccum.value_and_grad(loss_fn, num_microbatches=count))
    temp = step.lower(params, state, (x, labels)).compile().memory_analysis().temp_size_in_bytes
    base = base or temp
    print(f"  N={count}: {temp / 2**20:7.2f} MiB  ({temp / base:.2f}x N=1)")
  print(f"done in {time.perf_counter() - start:.1f} s on {jax.devices()[0].platform}")


if __name__ == "__main__":
  main()
