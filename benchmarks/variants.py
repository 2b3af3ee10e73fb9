"""The training-step variants the benchmark compares, one optimizer step each.

Every variant turns ``(params, opt_state)`` and one global batch of ``B``
rows into the next ``(params, opt_state)`` with AdamW, and donates the
parameters and optimizer state to the step so they are updated in place. A
variant is a list of jitted programs (compiled once, timed together) and a
``step`` that runs one optimizer step with the compiled programs.

Variants (``N`` = number of micro-batches, ``B / N`` rows each):

* ``full``: ``jax.value_and_grad`` on the whole batch, then the update.
* ``full_remat``: the same with ``nn.remat`` around every block.
* ``jaxaccum``: ``jaxaccum.value_and_grad(num_microbatches=N)`` in the step.
* ``scan``: a hand-written ``lax.scan`` summing the micro-batch gradients
  (the reference for what an accumulation loop costs).
* ``optax_microbatch``: ``optax.microbatching.microbatch`` with ``MEAN``.
* ``jaxaccum_multi_steps``: ``jaxaccum.multi_steps(adamw, N)``, ``N`` jit calls.
* ``optax_multisteps``: ``optax.MultiSteps(adamw, N)``, ``N`` jit calls.
* ``python_loop``: ``N`` jitted gradient calls adding into a donated
  accumulator, then one jitted update.
* ``pass``: one bare gradient pass on ``B / N`` rows (no update), and
  ``update``: the optimizer update alone. These give the floor
  ``N x pass(B / N) + update``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

import jaxaccum
from benchmarks import gpt

PyTree = Any

STEP_VARIANTS = ("full", "full_remat", "jaxaccum", "scan", "optax_microbatch",
                 "jaxaccum_multi_steps", "optax_multisteps", "python_loop")
ACCUMULATING = STEP_VARIANTS[2:]


class Program(NamedTuple):
  """One jitted function of a variant and the arguments to compile it for.

  Attributes:
    name: label in the results.
    fn: the ``jax.jit``-wrapped function.
    args: example arguments (arrays or ``jax.ShapeDtypeStruct``).
  """

  name: str
  fn: Callable[..., Any]
  args: tuple


class Variant(NamedTuple):
  """A benchmarked way to run one optimizer step.

  Attributes:
    programs: the jitted functions, compiled before timing.
    state: the initial state passed to ``step``.
    step: ``step(compiled, state) -> (state, loss)``; ``compiled`` maps each
      program's name to its compiled executable. One call is one optimizer
      step (``N`` calls of the programs for the across-step variants).
    resident: every buffer that stays alive between steps (state and batch),
      for the memory estimate.
  """

  programs: list[Program]
  state: PyTree
  step: Callable[[dict, PyTree], tuple[PyTree, jax.Array]]
  resident: Callable[[PyTree], PyTree]


def _split(batch: PyTree, n: int) -> list[PyTree]:
  """``n`` contiguous micro-batches, as a data loader would deliver them."""
  rows = jax.tree.leaves(batch)[0].shape[0] // n
  return [jax.tree.map(lambda x, i=i: x[i * rows:(i + 1) * rows], batch) for i in range(n)]


def _apply(tx, grads, opt_state, params):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _scan_value_and_grad(loss, n):
  """Plain ``lax.scan`` accumulation: the mean of ``n`` micro-batch gradients."""
  vg = jax.value_and_grad(loss)

  def fn(params, batch):
    micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

    def body(acc, mb):
      return jax.tree.map(jnp.add, acc, vg(params, mb)), None

    zeros = (jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (value, grads), _ = lax.scan(body, zeros, micro)
    scale = lambda x: x / jnp.asarray(n, x.dtype)
    return scale(value), jax.tree.map(scale, grads)

  return fn


def _train_step(vg, tx):
  """Jitted ``(params, opt_state, batch) -> (params, opt_state, value)``, donating the state."""

  def step_fn(params, opt_state, batch):
    value, grads = vg(params, batch)
    params, opt_state = _apply(tx, grads, opt_state, params)
    return params, opt_state, value

  return jax.jit(step_fn, donate_argnums=(0, 1))


def _in_step(vg, params, opt_state, batch, tx) -> Variant:
  """A variant whose whole step is one jitted call."""
  fn = _train_step(vg, tx)

  def step(compiled, state):
    params, opt_state = state
    params, opt_state, value = compiled["step"](params, opt_state, batch)
    return (params, opt_state), value

  return Variant([Program("step", fn, (params, opt_state, batch))],
                 (params, opt_state), step, lambda state: (state, batch))


def _across_steps(loss, tx, params, batch, n) -> Variant:
  """``n`` jit calls, one micro-batch each, of grad + a multi-step transform."""
  micro = _split(batch, n)
  fn = _train_step(jax.value_and_grad(loss), tx)
  opt_state = tx.init(params)

  def step(compiled, state):
    params, opt_state = state
    total = jnp.zeros([], jnp.float32)
    for mb in micro:
      params, opt_state, value = compiled["step"](params, opt_state, mb)
      total = total + value
    return (params, opt_state), total / n

  return Variant([Program("step", fn, (params, opt_state, micro[0]))],
                 (params, opt_state), step, lambda state: (state, micro))


def _python_loop(loss, tx, params, batch, n) -> Variant:
  """``n`` jitted gradient calls into a donated accumulator, one jitted update."""
  micro = _split(batch, n)
  vg = jax.value_and_grad(loss)

  def accumulate(acc, params, mb):
    value, grads = vg(params, mb)
    return jax.tree.map(jnp.add, acc, (value, grads))

  def update(params, opt_state, acc):
    value, grads = jax.tree.map(lambda x: x / jnp.asarray(n, x.dtype), acc)
    params, opt_state = _apply(tx, grads, opt_state, params)
    # Hands the accumulator's buffers back, zeroed, for the next step.
    return params, opt_state, jax.tree.map(jnp.zeros_like, acc), value

  acc = (jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, params))
  opt_state = tx.init(params)
  acc_fn = jax.jit(accumulate, donate_argnums=0)
  update_fn = jax.jit(update, donate_argnums=(0, 1, 2))

  def step(compiled, state):
    params, opt_state, acc = state
    for mb in micro:
      acc = compiled["accumulate"](acc, params, mb)
    params, opt_state, acc, value = compiled["update"](params, opt_state, acc)
    return (params, opt_state, acc), value

  return Variant([Program("accumulate", acc_fn, (acc, params, micro[0])),
                  Program("update", update_fn, (params, opt_state, acc))],
                 (params, opt_state, acc), step, lambda state: (state, micro))


def build(name: str, config: gpt.Config, n: int) -> Variant:
  """The variant ``name`` at ``n`` micro-batches for ``config``.

  Raises:
    ValueError: an unknown ``name``, or ``config.batch`` not divisible by ``n``.
  """
  if config.batch % n:
    raise ValueError(f"batch {config.batch} is not divisible by {n=}")
  params = gpt.init_params(config)
  batch = gpt.make_batch(config)
  tx = gpt.optimizer()
  loss = gpt.make_loss(config, remat=name == "full_remat")
  if name in ("full", "full_remat"):
    return _in_step(jax.value_and_grad(loss), params, tx.init(params), batch, tx)
  if name == "jaxaccum":
    vg = jaxaccum.value_and_grad(loss, num_microbatches=n)
    return _in_step(vg, params, tx.init(params), batch, tx)
  if name == "scan":
    return _in_step(_scan_value_and_grad(loss, n), params, tx.init(params), batch, tx)
  if name == "optax_microbatch":
    vg = optax.microbatching.microbatch(
        jax.value_and_grad(loss), argnums=1, microbatch_size=config.batch // n,
        accumulator=optax.microbatching.AccumulationType.MEAN)
    return _in_step(vg, params, tx.init(params), batch, tx)
  if name == "jaxaccum_multi_steps":
    return _across_steps(loss, jaxaccum.multi_steps(tx, n), params, batch, n)
  if name == "optax_multisteps":
    return _across_steps(loss, optax.MultiSteps(tx, n).gradient_transformation(),
                         params, batch, n)
  if name == "python_loop":
    return _python_loop(loss, tx, params, batch, n)
  if name == "pass":
    micro = _split(batch, n)[0]
    fn = jax.jit(jax.value_and_grad(loss))

    def step(compiled, state):
      value, grads = compiled["pass"](state, micro)
      del grads
      return state, value

    return Variant([Program("pass", fn, (params, micro))], params, step,
                   lambda state: (state, micro))
  if name == "update":
    fn = jax.jit(lambda p, s, g: _apply(tx, g, s, p), donate_argnums=(0, 1))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

    def step(compiled, state):
      params, opt_state = compiled["update"](*state, grads)
      return (params, opt_state), jnp.zeros([], jnp.float32)

    opt_state = tx.init(params)
    return Variant([Program("update", fn, (params, opt_state, grads))],
                   (params, opt_state), step, lambda state: (state, grads))
  raise ValueError(f"unknown variant {name=}; known: {STEP_VARIANTS + ('pass', 'update')}")

