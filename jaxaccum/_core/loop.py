"""The micro-batch loop: one trace of the micro-step, one ``lax.scan``, one reduction.

Read top-down, one call is: :func:`accumulate` hands the loop to the
multi-device strategy (:mod:`jaxaccum._devices.parallel`), which runs :func:`_run`
on one device or on each: the micro-step (:mod:`jaxaccum._core.microbatch`) is
traced once, its output's shapes pick the reducers (:mod:`jaxaccum._core.reducers`)
and their zeros, the scan sums what each micro-batch contributes, the
strategy reduces every sum across devices at once, and the reducers'
``finalize`` form the :class:`Outputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from jaxaccum._core import dtypes as _dtypes
from jaxaccum._core import microbatch as _microbatch
from jaxaccum._core import stats as _stats
from jaxaccum._core.microbatch import Micro, Plan
from jaxaccum._core.options import Options
from jaxaccum._core.reducers import Accumulator, Totals
from jaxaccum._devices import data_axis, parallel, specs
from jaxaccum._devices.data_strategies import BatchLayout

PyTree = Any


class Outputs(NamedTuple):
  """Everything one accumulated call computes, before it is nested for the user.

  Attributes:
    value: the (mean or summed) loss.
    aux: the reduced auxiliary output (``()`` without ``has_aux``).
    states: the final value of each state argument, in ``state_argnums`` order.
    grads: the accumulated gradients, in the differentiated leaves' dtypes
      (a :class:`jaxaccum.DeferredGrads` with ``defer_reduction``).
    stats: an :class:`jaxaccum.AccumulationStats`, or ``None``.
  """

  value: jax.Array
  aux: PyTree
  states: tuple
  grads: PyTree
  stats: Any


def accumulate(options: Options, plan: Plan, grad_fn: Callable[..., Any], args: tuple,
               kwargs: dict) -> Outputs:
  """Runs the loop under the call's multi-device strategy and returns the
  :class:`Outputs`."""
  strategy = _strategy(options, plan)
  real = options.num_real_microbatches
  if not isinstance(real, jax.Array):
    return strategy.run(lambda strategy, args, kwargs: _run(
        options, plan, grad_fn, strategy, args, kwargs, real), args, kwargs)

  def loop(strategy, args, kwargs):
    *args, traced_real = args
    return _run(options, plan, grad_fn, strategy, tuple(args), kwargs, traced_real)

  # An array count travels as one more (replicated) argument: a shard_map over
  # Explicit axes may not close over it.
  return strategy.run(loop, args + (real,), kwargs)


def _strategy(options: Options, plan: Plan) -> parallel.Strategy:
  """The multi-device strategy of one call."""
  if options.data is not None:
    layout = BatchLayout(options.argnums, plan.positions, plan.names, plan.axes,
                         options.aux_reduction)
    return data_axis.DataStrategy(options.data, options, layout)
  if options.axis_name:
    return parallel.Named(options.axis_name)
  return parallel.Local()


def _run(options: Options, plan: Plan, grad_fn: Callable[..., Any],
         strategy: parallel.Strategy, args: tuple, kwargs: dict, real: Any) -> Outputs:
  """The loop on one device (or on each device of ``strategy``); ``real``:
  ``num_real_microbatches``."""
  batch = _microbatch.batch_of(plan, args, kwargs)
  args = list(args)
  for i, diff in zip(options.argnums, strategy.prepare(tuple(args[i] for i in options.argnums))):
    args[i] = diff
  salt = strategy.rng_salt()
  keys = {i: args[i] if salt is None else parallel.fold_in_device(args[i], salt)
          for i in options.rng_argnums}
  step = _microbatch.make_step(options, plan, grad_fn, tuple(args), kwargs, keys,
                               strategy.microbatch)
  policies = dict(zip(options.state_argnums, options.state_policies))
  seq_init = strategy.carry(tuple(args[p] for p in options.state_argnums
                                  if policies[p] == "sequential"))
  mean_inputs = {p: args[p] for p in options.state_argnums if policies[p] == "mean"}
  rows = _microbatch.batch_size(batch, plan.axes) // plan.n  # per micro-batch and device
  with jax.named_scope("jaxaccum/microbatch"):
    if plan.n == 1:
      like, seq_states = step(jnp.zeros([], jnp.int32), batch, seq_init)
      acc = Accumulator.build(options, like, rows, mean_inputs)
      sums, stacked = _contribution(acc, strategy, like)
      stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], stacked)
    else:
      strided = _microbatch.stride(batch, plan)
      traced, like, seq_like = _trace_once(step, strided, plan, seq_init)
      acc = Accumulator.build(options, like, rows, mean_inputs)
      sums, seq_states, stacked = _scan(
          lambda m: _contribution(acc, strategy, m), strategy, traced,
          strided, plan, specs.varying_like(seq_init, seq_like), like, real)
  with jax.named_scope("jaxaccum/reduce"):
    return _reduce(options, acc, strategy, plan.n, (sums, seq_states, stacked), real)


def _contribution(acc: Accumulator, strategy: parallel.Strategy, m: Micro):
  """What micro-batch ``m`` adds to the sums, and its stacked aux leaves."""
  sums = acc.contribute(m)
  sums = sums._replace(grads=strategy.gradients(sums.grads))
  return strategy.carry(sums), acc.stack(m)


def _trace_once(step: Callable[..., Any], strided: _microbatch.Batch, plan: Plan,
                seq_init: tuple) -> tuple[Callable[..., Any], Micro, tuple]:
  """``step`` traced once (the only trace of the user's loss), as a function the
  scan body calls without tracing ``step`` again, and the types of its outputs."""
  zero = jnp.zeros([], jnp.int32)
  micro = _microbatch.microbatch(strided, plan, zero)
  if jax.sharding.get_abstract_mesh().empty:
    # jit's cache holds the trace: the scan body binds one call of it.
    traced = jax.jit(step)
    like, seq_like = jax.eval_shape(traced, zero, micro, seq_init)
    return traced, like, seq_like
  # Under a mesh a jitted call may miss that cache (and a partly manual
  # shard_map rejects it): the body evaluates the traced jaxpr instead.
  closed, shapes = jax.make_jaxpr(step, return_shape=True)(zero, micro, seq_init)
  out_tree = jax.tree.structure(shapes)
  evaluate = jex_core.jaxpr_as_fun(closed)

  def traced_jaxpr(index, micro, seq_states):
    return out_tree.unflatten(evaluate(*jax.tree.leaves((index, micro, seq_states))))

  like, seq_like = out_tree.unflatten(closed.out_avals)
  return traced_jaxpr, like, seq_like


def _scan(contribution: Callable[[Micro], Any], strategy: parallel.Strategy,
          traced: Callable[..., Any], strided: _microbatch.Batch, plan: Plan,
          seq_init: tuple, like: Micro, real: Any):
  """The sums over micro-batches ``0 .. N - 1`` (those below ``real`` only)."""
  sum_shapes, stack_shapes = jax.eval_shape(contribution, like)
  zeros = specs.varying_like(strategy.zeros(sum_shapes), sum_shapes)

  def compute(sums, seq_states, index):
    m, seq_states = traced(index, _microbatch.microbatch(strided, plan, index), seq_states)
    new, stacked = contribution(m)
    return (jax.tree.map(jnp.add, sums, new), seq_states), stacked

  def skip(sums, seq_states, index):
    del index
    return (sums, seq_states), jax.tree.map(
        lambda s: specs.varying_like(jnp.zeros(s.shape, s.dtype), s), stack_shapes)

  def body(carry, index):
    if real is None:
      return compute(*carry, index)
    # Micro-batches past num_real_microbatches are not computed at all.
    return lax.cond(index < real, compute, skip, *carry, index)

  (sums, seq_states), stacked = lax.scan(body, (zeros, seq_init),
                                         jnp.arange(plan.n, dtype=jnp.int32))
  return sums, seq_states, stacked


def _reduce(options: Options, acc: Accumulator, strategy: parallel.Strategy, n: int,
            loop_out: tuple, real: Any) -> Outputs:
  """The one cross-device reduction, then the accumulator's ``finalize``
  (``n``: the micro-batches per device, ``real`` those computed)."""
  sums, seq_states, stacked = loop_out
  kinds = acc.kinds
  concat = {i: _microbatch.unstride(stacked.pop(i)) for i in list(stacked)
            if kinds[i] == "concat"}
  (others, seq_states, stacked), grads = strategy.reduce(
      (sums._replace(grads=None), seq_states, stacked), sums.grads)
  sums = others._replace(grads=grads)
  devices = strategy.num_devices()
  count = n if real is None else real
  totals = Totals(sums, count * devices, devices, acc.like, _single(n, strategy))
  done, states = acc.finalize(totals, seq_states)
  summed = done.aux or {}
  aux = [summed[i] if i in summed else concat[i] if i in concat
         else _device_mean(stacked[i], devices) for i in range(len(kinds))]
  stats = _make_stats(totals, count, acc.rows) if options.with_stats else None
  outputs = Outputs(done.value, jax.tree.structure(acc.like.aux).unflatten(aux), states,
                    strategy.result(done.grads), stats)
  if real is None or isinstance(real, int):
    return outputs
  # A traced count the loop cannot honour leaves no plausible number behind.
  valid = jnp.logical_and(real >= 1, real <= n)
  return jax.tree.map(lambda x: jnp.where(valid, x, jnp.full_like(x, np.nan))
                      if _dtypes.is_float(x) else x, outputs)


def _single(n: int, strategy: parallel.Strategy) -> bool:
  """One micro-batch on one device, outside any ``shard_map``: only then is the
  micro-batch's own output (device-varying inside a ``shard_map``, even over a
  1-device axis) the result."""
  return n * strategy.num_devices() == 1 and not strategy.manual


def _device_mean(x: jax.Array, devices: int) -> jax.Array:
  """A stacked aux summed over devices, as their mean (floating leaves keep
  their dtype; integer and boolean ones become float32)."""
  if devices == 1:
    return x
  wide = _dtypes.wide(x.dtype)
  mean = x.astype(wide) / jnp.asarray(devices, wide)
  return mean.astype(x.dtype) if _dtypes.is_float(x) else mean


def _make_stats(totals: Totals, n: Any, rows: int) -> _stats.AccumulationStats:
  """The noise-scale statistics from the reduced sums (``rows``: of a micro-batch
  on one device)."""
  sums, devices = totals.sums, totals.devices
  counts = sums.counts
  small_sq = _dtypes.ratio(sums.sq_norm, counts.sampled)
  big_sq = _stats.sq_norm(jax.tree.map(totals.mean, sums.grads))
  b_small = jnp.asarray(rows, jnp.int32)
  b_big = b_small.astype(jnp.float32) * counts.sampled
  g2, trace, scale = _stats.noise_estimates(small_sq, big_sq, b_small, b_big)
  return _stats.AccumulationStats(
      microbatch_sq_norm=small_sq, grad_sq_norm=big_sq, sq_norm_estimate=g2,
      trace_estimate=trace, noise_scale=scale, microbatch_size=b_small,
      num_microbatches=jnp.asarray(n, jnp.int32),
      effective_batch_size=b_small * jnp.asarray(n, jnp.int32) * devices,
      num_skipped=counts.skipped.astype(jnp.int32))
