"""Data-parallel training with one gradient all-reduce per step.

Trains a small Flax Linen MLP classifier on 8 simulated CPU devices: the batch
is sharded over the mesh axis ``"data"``, the parameters are replicated, and
each step accumulates ``--microbatches`` micro-batches per device with
``jaxaccum.value_and_grad(..., data_axis="data")``. The effective batch is
``devices x microbatch-size x microbatches`` rows.

It prints what ``jaxaccum.count_collectives`` finds in the compiled step
(no collective inside the micro-batch loop, the gradient all-reduce after
it), the same for a naive step without ``data_axis`` (an all-reduce in
every micro-step), and how far the parameters end up from the same run on
one device with the whole batch at once (float32 rounding only). Runs in
about 10 seconds on a 2-core CPU:

  python examples/data_parallel.py --steps 5
"""

from __future__ import annotations

import os

# The simulated devices must be requested before jax is imported.
DEVICES = 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxaccum  # noqa: E402

FEATURES = 32
CLASSES = 10


class MLP(nn.Module):
  width: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.width)(x))
    x = nn.gelu(nn.Dense(self.width)(x))
    return nn.Dense(CLASSES)(x)


MODEL = MLP()


def loss_fn(params, batch):
  """Mean cross-entropy over the examples of ``batch = (x, labels)``."""
  x, labels = batch
  logits = MODEL.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnums=1)
def make_batch(key, rows):
  """Synthetic data: the label is the argmax of a fixed linear map of x."""
  x = jax.random.normal(key, (rows, FEATURES))
  projection = jax.random.normal(jax.random.key(1234), (FEATURES, CLASSES))
  return x, jnp.argmax(x @ projection, axis=-1).astype(jnp.int32)


def make_step(grad_fn, tx):
  def step(params, opt_state, batch):
    loss, grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step)


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
  parser.add_argument("--microbatches", type=int, default=4,
                      help="micro-batches per device and step")
  parser.add_argument("--microbatch-size", type=int, default=16,
                      help="rows per micro-batch on each device")
  args = parser.parse_args()

  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_rows = DEVICES * args.microbatch_size * args.microbatches
  print(f"{DEVICES} devices x {args.microbatch_size} rows x {args.microbatches} "
        f"micro-batches = {batch_rows} rows per step")

  tx = optax.adamw(1e-3)
  params = MODEL.init(jax.random.key(0), jnp.zeros((1, FEATURES)))["params"]
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P("data"))

  accumulated = jaxaccum.value_and_grad(
      loss_fn, num_microbatches=args.microbatches, data_axis="data", mesh=mesh)
  step = make_step(accumulated, tx)
  naive = make_step(jaxaccum.value_and_grad(loss_fn, num_microbatches=args.microbatches), tx)
  # The reference: the whole batch at once, on one device.
  reference = make_step(jax.value_and_grad(loss_fn), tx)

  p = jax.device_put(params, replicated)
  s = jax.device_put(tx.init(params), replicated)
  one_device = jax.devices()[0]
  ref_p = jax.device_put(params, one_device)
  ref_s = jax.device_put(tx.init(params), one_device)

  example = jax.device_put(make_batch(jax.random.key(1), batch_rows), sharded)
  for name, fn in (("data_axis step", step), ("naive step (no data_axis)", naive)):
    counts = jaxaccum.count_collectives(fn, p, s, example)
    print(f"{name}:\n  inside loops:  {counts.inside_loops}\n"
          f"  outside loops: {counts.outside_loops}")

  for i in range(args.steps):
    batch = make_batch(jax.random.fold_in(jax.random.key(1), i), batch_rows)
    p, s, loss = step(p, s, jax.device_put(batch, sharded))
    ref_p, ref_s, ref_loss = reference(ref_p, ref_s, jax.device_put(batch, one_device))
    print(f"step {i}: loss {float(loss):.5f} (one device, whole batch: {float(ref_loss):.5f})")

  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p))]
  scale = max(float(np.max(np.abs(np.asarray(b)))) for b in jax.tree.leaves(ref_p))
  print(f"parameters after {args.steps} steps: max |data_axis - one device| = "
        f"{max(diffs):.2e} (largest parameter {scale:.2f})")
  if max(diffs) > 1e-4 * scale:
    raise SystemExit("the parameters differ from the single-device run")
  print("parameters match the single-device run")


if __name__ == "__main__":
  main()
