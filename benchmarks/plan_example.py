"""The numbers of ``docs/beyond.md``: planner, noise scale, skip_nonfinite.

1. Planner: the tiny GPT of :mod:`benchmarks.gpt` (global batch 32), a whole
   AdamW training step with donated parameters and optimizer state, planned
   against a memory budget with :func:`jaxaccum.plan_step`. For reference,
   every divisor of the batch is compiled too (what a full search would cost).
2. Noise scale: ``with_stats=True`` on a linear regression whose ``B_simple``
   is known (17), one step's estimate against the ``noise_scale_ema`` average;
   then the smoothed ``B_simple`` along a short tiny-GPT training run.
3. ``skip_nonfinite``: one NaN micro-batch out of 8 in the tiny GPT step: the
   result against the gradient of the 7 good ones, and the cost per step.

  PYTHONPATH=. python3 benchmarks/plan_example.py [--budget-mib 32]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxaccum
from benchmarks import gpt

MIB = 2**20


def _make_step(loss, tx):
  def make_step(n):
    def step(params, opt_state, batch):
      value, grads = jaxaccum.value_and_grad(loss, num_microbatches=n)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))

  return make_step


def planner(budget_mib: float) -> None:
  config = gpt.CONFIGS["tiny"]
  loss, tx = gpt.make_loss(config), gpt.optimizer()
  params = gpt.init_params(config)
  # Shapes only: planning allocates nothing for the arguments.
  args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                      (params, tx.init(params), gpt.make_batch(config)))
  make_step = _make_step(loss, tx)
  print(f"== planner: tiny GPT ({config.layers} layers, d_model {config.d_model}, seq "
        f"{config.seq}), batch {config.batch}, AdamW step, "
        f"{jax.devices()[0].device_kind}")

  print("every divisor compiled (reference):")
  print("| N | rows/micro-batch | estimate MiB | compile s |")
  print("|---|---|---|---|")
  full_s = 0.0
  for n in [d for d in range(1, config.batch + 1) if config.batch % d == 0]:
    start = time.perf_counter()
    plan = jaxaccum.plan_step(make_step, *args, batch_size=config.batch,
                              memory_budget=2**50, candidates=[n])
    seconds = time.perf_counter() - start
    full_s += seconds
    print(f"| {n} | {config.batch // n} | {plan.estimates[n] / MIB:.1f} | {seconds:.1f} |")
  print(f"all 6 compiled: {full_s:.1f} s")

  budget = int(budget_mib * MIB)
  start = time.perf_counter()
  plan = jaxaccum.plan_step(make_step, *args, batch_size=config.batch, memory_budget=budget)
  seconds = time.perf_counter() - start
  compiled = ", ".join(f"N={n}: {b / MIB:.1f} MiB" for n, b in plan.estimates.items())
  print(f"plan_step(memory_budget={budget_mib:g} MiB) -> num_microbatches="
        f"{plan.num_microbatches}, microbatch_size={plan.microbatch_size}; compiled "
        f"{len(plan.estimates)} candidates ({compiled}) in {seconds:.1f} s")


def noise_scale() -> None:
  print("== noise scale")
  d, noise = 8, 1.0
  w_star = jnp.arange(d, dtype=jnp.float32) / d
  w = w_star + jnp.full((d,), 1 / np.sqrt(d), jnp.float32)  # |G|^2 = 1, B_simple = 17

  def loss(w, batch):
    x, y = batch
    return 0.5 * jnp.mean(jnp.square(x @ w - y))

  def batch(key):
    kx, ke = jax.random.split(key)
    x = jax.random.normal(kx, (256, d))
    return x, x @ w_star + noise * jax.random.normal(ke, (256,))

  accumulated = jaxaccum.value_and_grad(loss, num_microbatches=16, with_stats=True)
  smoother = jaxaccum.noise_scale_ema(decay=0.99)

  @jax.jit
  def run(keys):
    def step(state, key):
      _, stats = accumulated(w, batch(key))
      b_simple, state = smoother.update(state, stats)
      return state, (stats.noise_scale, b_simple)

    return jax.lax.scan(step, smoother.init(), keys)

  _, (one_step, smoothed) = run(jax.random.split(jax.random.key(0), 1000))
  one_step, smoothed = np.asarray(one_step), np.asarray(smoothed)
  print(f"linear regression, analytic B_simple = {d + 1 + d * noise**2}: one step "
        f"(B=256, N=16): median {np.median(one_step):.1f}, 10-90% range "
        f"{np.percentile(one_step, 10):.1f} to {np.percentile(one_step, 90):.1f}; "
        f"noise_scale_ema(0.99) after 100 / 1000 steps: {smoothed[99]:.1f} / "
        f"{smoothed[-1]:.1f}")

  config = gpt.CONFIGS["tiny"]
  tx = gpt.optimizer()
  params = gpt.init_params(config)
  opt_state = tx.init(params)
  accumulated = jaxaccum.value_and_grad(gpt.make_loss(config), num_microbatches=8,
                                        with_stats=True)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch):
    (value, grads), stats = accumulated(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, (value, stats)

  state = smoother.init()
  update = jax.jit(smoother.update)
  line = []
  for i in range(60):
    params, opt_state, (value, stats) = step(params, opt_state,
                                             gpt.make_batch(config, seed=100 + i))
    b_simple, state = update(state, stats)
    if i % 10 == 9:
      line.append(f"step {i + 1}: loss {float(value):.3f}, B_simple "
                  f"{float(stats.noise_scale):.0f} (one step) / {float(b_simple):.0f} (EMA)")
  print("tiny GPT, B=32, N=8, AdamW 3e-4:\n  " + "\n  ".join(line))


def skip_nonfinite() -> None:
  print("== skip_nonfinite")
  config = gpt.CONFIGS["tiny"]
  loss, n = gpt.make_loss(config), 8
  params, batch = gpt.init_params(config), gpt.make_batch(config)

  def poisoned_loss(params, batch):
    # Micro-batch 3 (rows 3, 11, 19, 27) gets a NaN loss and NaN gradients.
    return loss(params, batch) * jnp.where(batch["row"][0] == 3, jnp.nan, 1.0)

  rows = dict(batch, row=jnp.arange(config.batch))
  skip = jax.jit(jaxaccum.value_and_grad(poisoned_loss, num_microbatches=n,
                                         skip_nonfinite=True, with_stats=True))
  (value, grads), stats = skip(params, rows)
  good = np.setdiff1d(np.arange(config.batch), np.arange(3, config.batch, n))
  ref_value, ref_grads = jax.jit(jax.value_and_grad(loss))(
      params, jax.tree.map(lambda a: a[good], batch))
  diff = sum(float(jnp.sum(jnp.square(g - r)))
             for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
  err = np.sqrt(diff / sum(float(jnp.sum(jnp.square(r))) for r in jax.tree.leaves(ref_grads)))
  print(f"tiny GPT, B=32, N=8, micro-batch 3 NaN: num_skipped={int(stats.num_skipped)}, "
        f"loss {float(value):.6f} vs {float(ref_value):.6f} (7 good micro-batches), "
        f"relative gradient error {err:.1e}")

  # Interleaved, so that a load change on the machine hits both alike.
  fns = {flag: jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=n, skip_nonfinite=flag))
         for flag in (False, True)}
  times = {flag: [] for flag in fns}
  for flag, fn in fns.items():
    jax.block_until_ready(fn(params, batch))
  for _ in range(30):
    for flag, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(params, batch))
      times[flag].append(time.perf_counter() - start)
  for flag, ts in times.items():
    print(f"skip_nonfinite={flag}: median {1e3 * statistics.median(ts):.1f} ms per "
          f"accumulated gradient (30 runs, interleaved)")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget-mib", type=float, default=32.0)
  args = parser.parse_args(argv)
  planner(args.budget_mib)
  noise_scale()
  skip_nonfinite()


if __name__ == "__main__":
  main()
