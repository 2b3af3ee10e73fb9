"""What jaxaccum does differently from optax.MultiSteps and optax.microbatching.

Measures, on whatever machine runs it (8 simulated CPU devices are requested
for the data-parallel check), the five differences the README claims:

1. token-weighted losses: error against the full-batch token mean;
2. inner optimizer: how many times it runs in one accumulation cycle;
3. data-parallel: all-reduces inside the loop body vs after it;
4. RNG: whether micro-batches get distinct dropout masks;
5. across-step accumulation: compiled memory and time of one call.

  python benchmarks/compare_optax.py [--out benchmarks/results/compare-optax-cpu.json]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxaccum  # noqa: E402

N = 8


def token_weighted():
  """Relative error of the gradient against the full-batch token mean."""
  rows, length, vocab = 64, 32, 16
  key = jax.random.key(0)
  tokens = jax.random.randint(key, (rows, length), 0, vocab)
  lengths = jax.random.randint(jax.random.key(1), (rows,), 1, length + 1)
  mask = (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.float32)
  table = jax.random.normal(jax.random.key(2), (vocab, vocab)) * 0.1

  def token_mean(table, batch):
    tokens, mask = batch
    logits = table[tokens[:, :-1]]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    m = mask[:, 1:]
    return jnp.sum(nll * m) / jnp.sum(m)

  batch = (tokens, mask)
  ref = jax.grad(token_mean)(table, batch)
  rel = lambda g: float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref))
  ours = jaxaccum.grad(token_mean, num_microbatches=N,
                       weight_fn=lambda b: jnp.sum(b[1][:, 1:]))(table, batch)
  micro = optax.microbatching.microbatch(
      jax.grad(token_mean), argnums=1, microbatch_size=rows // N,
      accumulator=optax.microbatching.AccumulationType.MEAN)(table, batch)
  multi = optax.MultiSteps(optax.sgd(1.0), N).gradient_transformation()
  state = multi.init(table)
  for i in range(N):
    part = jax.tree.map(lambda x, i=i: x[i * rows // N:(i + 1) * rows // N], batch)
    update, state = multi.update(jax.grad(token_mean)(table, part), state, table)
  return {"jaxaccum weight_fn": rel(ours), "optax.microbatching MEAN": rel(micro),
          "optax.MultiSteps": rel(-update)}


def inner_runs():
  """Inner optimizer executions during one cycle of k calls."""
  counts = {}
  for name, wrap in (("jaxaccum.multi_steps", lambda t: jaxaccum.multi_steps(t, N)),
                     ("optax.MultiSteps",
                      lambda t: optax.MultiSteps(t, N).gradient_transformation())):
    calls = []

    def update(updates, state, params=None, calls=calls):
      jax.debug.callback(lambda: calls.append(1))
      return optax.adam(1e-3).update(updates, state, params)

    tx = wrap(optax.GradientTransformation(optax.adam(1e-3).init, update))
    params = jnp.zeros(4)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(N):
      _, state = step(jnp.ones(4), state, params)
    jax.effects_barrier()
    counts[name] = len(calls)
  return counts


def collectives():
  """All-reduces inside / outside loops of a data-parallel accumulation step."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  params = {"w1": jnp.ones((32, 64)) * 0.01, "w2": jnp.ones((64,)) * 0.01}
  x = jax.device_put(jnp.ones((256, 32)), NamedSharding(mesh, P("data")))
  y = jax.device_put(jnp.ones((256,)), NamedSharding(mesh, P("data")))

  def loss(p, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

  steps = {
      "jaxaccum data_axis": jaxaccum.value_and_grad(
          loss, num_microbatches=N, data_axis="data", mesh=mesh),
      "optax.microbatching": optax.microbatching.microbatch(
          jax.value_and_grad(loss), argnums=1, microbatch_size=256 // N,
          accumulator=optax.microbatching.AccumulationType.MEAN),
  }
  out = {}
  for name, fn in steps.items():
    counts = jaxaccum.count_collectives(jax.jit(fn), params, (x, y))
    out[name] = {"all-reduce inside loops": counts.inside_loops.all_reduce,
                 "all-reduce outside loops": counts.outside_loops.all_reduce}
  return out


def rng():
  """Share of micro-batch pairs whose dropout masks are identical."""
  def loss(w, x, key):
    keep = jax.random.bernoulli(key, 0.5, x.shape)
    jax.debug.callback(lambda m: masks.append(np.asarray(m)), keep)
    return jnp.mean(jnp.where(keep, x, 0.0) * w)

  results = {}
  x = jnp.ones((64, 16))
  for name, fn in (
      ("jaxaccum rng_argnums", jaxaccum.grad(loss, num_microbatches=N, rng_argnums=2)),
      ("optax.microbatching", optax.microbatching.microbatch(
          jax.grad(loss), argnums=1, microbatch_size=64 // N,
          accumulator=optax.microbatching.AccumulationType.MEAN)),
  ):
    masks = []
    jax.block_until_ready(fn(jnp.float32(1.0), x, jax.random.key(0)))
    jax.effects_barrier()
    same = sum(np.array_equal(masks[i], masks[j])
               for i in range(len(masks)) for j in range(i + 1, len(masks)))
    results[name] = same / (len(masks) * (len(masks) - 1) // 2)
  return results


def across_steps():
  """Compiled memory and time of one call of the across-step transform."""
  params = {f"w{i}": jnp.ones((512, 512)) for i in range(8)}
  grads = jax.tree.map(jnp.ones_like, params)
  out = {}
  for name, tx in (
      ("jaxaccum.multi_steps", jaxaccum.multi_steps(optax.adamw(1e-3), N)),
      ("optax.MultiSteps", optax.MultiSteps(optax.adamw(1e-3), N).gradient_transformation()),
  ):
    state = tx.init(params)
    step = jax.jit(tx.update, donate_argnums=1)
    mem = step.lower(grads, state, params).compile().memory_analysis()
    for _ in range(2 * N):
      _, state = step(grads, state, params)
    jax.block_until_ready(state)
    rounds = []
    for _ in range(7):
      start = time.perf_counter()
      for _ in range(2 * N):
        _, state = step(grads, state, params)
      jax.block_until_ready(state)
      rounds.append((time.perf_counter() - start) / (2 * N) * 1e3)
    out[name] = {"temp MiB": mem.temp_size_in_bytes / 2**20,
                 "ms per call (median of 7 rounds)": float(np.median(rounds))}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args()
  results = {
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"{jax.devices()[0].platform}",
      "versions": {"jax": jax.__version__, "optax": optax.__version__},
      "token-weighted gradient, relative error vs full batch": token_weighted(),
      f"inner optimizer runs in one cycle of {N} calls": inner_runs(),
      "all-reduces, batch sharded over 8 devices": collectives(),
      "identical dropout masks between micro-batches (share of pairs)": rng(),
      "across-step transform, one call, adamw on 8x512x512 params": across_steps(),
  }
  print(json.dumps(results, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
