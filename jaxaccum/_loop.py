"""The micro-batch loop: zeros, one ``lax.scan``, one reduction, finalize.

Data flow: the :class:`~jaxaccum._options.Options` fix what is accumulated;
the micro-step (:mod:`jaxaccum._microstep`) differentiates ``fun`` on one
micro-batch and weighs it; each reducer (:mod:`jaxaccum._reducers`) adds its
quantity to a running sum in the scan carry; after the loop the
:mod:`jaxaccum._parallel` strategy reduces every sum across devices at once,
and the reducers' ``finalize`` form the :class:`Outputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxaccum import _dtypes, _microstep, _parallel, _reducers, _split, _stats
from jaxaccum._options import Options

PyTree = Any


class Outputs(NamedTuple):
  """Everything one accumulated call computes, before it is nested for the user.

  Attributes:
    value: the (mean or summed) loss.
    aux: the reduced auxiliary output (``()`` without ``has_aux``).
    states: the final value of each state argument, in ``state_argnums`` order.
    grads: the accumulated gradients, in the differentiated leaves' dtypes.
    stats: an :class:`jaxaccum.AccumulationStats`, or ``None``.
  """

  value: jax.Array
  aux: PyTree
  states: tuple
  grads: PyTree
  stats: Any


def num_microbatches(options: Options, args: tuple, kwargs: dict, devices: int = 1) -> int:
  """``N`` for the batch of this call (validated against ``devices`` too)."""
  batch = _microstep.batch_of(options, args, kwargs)
  size = _split.batch_size(batch)
  n = _split.resolve_num_microbatches(size, options)
  if size % (n * devices):
    raise ValueError(
        f"batch leading size {size} cannot be split into num_microbatches={n} on "
        f"each of the {devices} devices of data_axis={_parallel.axis_spec(options.data_axis)!r}: "
        f"it must be divisible by {n * devices}")
  return n


def accumulate(options: Options, grad_fn: Callable[..., Any], parallel: Any,
               args: tuple, kwargs: dict) -> Outputs:
  """Runs the loop under ``parallel`` and returns the :class:`Outputs`."""
  n = num_microbatches(options, args, kwargs, _devices_of(options))
  layout = {}
  replicated, scattered = parallel.run(
      lambda p, a, k: _run(options, grad_fn, p, a, k, n, layout), args, kwargs)
  aux = layout["aux_treedef"].unflatten(
      [scattered[i] if i in scattered else leaf for i, leaf in enumerate(replicated.aux)])
  return replicated._replace(aux=aux)


def _devices_of(options: Options) -> int:
  return _parallel.data_devices(options.data_axis, options.mesh)


def _run(options: Options, grad_fn: Callable[..., Any], parallel: Any, args: tuple,
         kwargs: dict, n: int, layout: dict) -> tuple[Outputs, dict]:
  """The loop on one device (or on each device of ``parallel``)."""
  batch = _microstep.batch_of(options, args, kwargs)
  args = list(args)
  for i, diff in zip(options.argnums, parallel.prepare(tuple(args[i] for i in options.argnums))):
    args[i] = diff
  salt = parallel.rng_salt()
  keys = {i: args[i] if salt is None else _parallel.fold_in_device(args[i], salt)
          for i in options.rng_argnums}
  step = _microstep.make(options, grad_fn, tuple(args), kwargs, keys, parallel.microbatch)
  policies = dict(zip(options.state_argnums, options.state_policies))
  seq_init = parallel.carry(tuple(args[p] for p in options.state_argnums
                                  if policies[p] == "sequential"))
  mean_inputs = {p: args[p] for p in options.state_argnums if policies[p] == "mean"}
  strided = _split.stride(batch, n)
  shapes, _ = jax.eval_shape(step, 0, _split.microbatch(strided, 0), seq_init)
  kinds = _aux_kinds(options, shapes.aux, _split.batch_size(batch) // n)
  reducers = _reducers.build(options, kinds, mean_inputs)
  stacked_at = tuple(i for i, k in enumerate(kinds) if k in ("stack", "concat"))

  def contribute(index, micro, seq_states):
    m, seq_states = step(index, micro, seq_states)
    sums = {name: r.contribute(m) for name, r in reducers.items()}
    sums["grads"] = parallel.gradients(sums["grads"])
    aux = jax.tree.leaves(m.aux)
    return parallel.carry((sums, seq_states)), {i: aux[i] for i in stacked_at}, m

  with jax.named_scope("jaxaccum/microbatch"):
    if n == 1:
      (sums, seq_states), stacked, like = contribute(0, batch, seq_init)
      stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], stacked)
    else:
      (sums, seq_states), stacked, like = _scan(contribute, parallel.zeros, strided,
                                                seq_init, n)
  with jax.named_scope("jaxaccum/reduce"):
    concat = {i: _split.unstride(stacked.pop(i)) for i in stacked_at if kinds[i] == "concat"}
    grads = sums.pop("grads")
    (sums, seq_states, stacked), grads = parallel.reduce((sums, seq_states, stacked), grads)
    sums["grads"] = grads
    devices = parallel.num_devices()
    totals = _reducers.Totals(sums, n * devices, devices, like, n * devices == 1)
    done = {name: r.finalize(sums[name], totals) for name, r in reducers.items()}
    layout["aux_treedef"] = jax.tree.structure(shapes.aux)
    aux = [done["aux"][i] if i in done.get("aux", {}) else _device_mean(stacked[i], devices)
           if i in stacked else None for i in range(len(kinds))]
    states = _states(options, seq_states, done.get("mean_states", {}), devices)
    stats = (_make_stats(totals, n, _split.batch_size(batch))
             if options.with_stats else None)
    return Outputs(done["value"], aux, states, done["grads"], stats), concat


def _scan(contribute: Callable[..., Any], zeros_of: Callable[[PyTree], PyTree],
          strided: PyTree, seq_init: tuple, n: int):
  """``contribute`` over micro-batches ``0 .. n - 1``, summing its sums."""

  def body(state, index):
    sums, seq_states = state
    (new, seq_states), stacked, _ = contribute(index, _split.microbatch(strided, index),
                                               seq_states)
    return (jax.tree.map(jnp.add, sums, new), seq_states), stacked

  (sums, _), _, like = jax.eval_shape(
      lambda: contribute(0, _split.microbatch(strided, 0), seq_init))
  zeros = zeros_of(sums)
  (sums, seq_states), stacked = lax.scan(body, (zeros, seq_init),
                                         jnp.arange(n, dtype=jnp.int32))
  return (sums, seq_states), stacked, like


def _aux_kinds(options: Options, aux: PyTree, rows: int) -> tuple[str, ...]:
  """Each aux leaf's reduction, from ``aux_reduction`` (a name or a prefix pytree)."""
  spec = options.aux_reduction
  if isinstance(spec, str):
    kinds = [spec] * len(jax.tree.leaves(aux))
  else:
    try:
      kinds = jax.tree.leaves(jax.tree.map(
          lambda kind, sub: jax.tree.map(lambda _: kind, sub), spec, aux))
    except (ValueError, TypeError) as e:
      raise ValueError(
          f"aux_reduction={spec!r} must be a reduction name or a pytree prefix of "
          f"fun's aux, whose structure is {jax.tree.structure(aux)}") from e
  for (path, leaf), kind in zip(jax.tree_util.tree_leaves_with_path(aux), kinds):
    if kind == "concat" and (not leaf.shape or leaf.shape[0] != rows):
      raise ValueError(
          f"aux_reduction='concat' needs per-example aux leaves with a leading axis of "
          f"the micro-batch's {rows} rows; aux{jax.tree_util.keystr(path)} has shape "
          f"{leaf.shape} (use 'mean', 'sum' or 'stack' for it)")
  return tuple(kinds)


def _device_mean(x: jax.Array, devices: int) -> jax.Array:
  """A stacked aux summed over devices, as their mean (floating leaves keep
  their dtype; integer and boolean ones become float32)."""
  if devices == 1:
    return x
  wide = _dtypes.wide(x.dtype)
  mean = x.astype(wide) / jnp.asarray(devices, wide)
  return mean.astype(x.dtype) if _dtypes.is_float(x) else mean


def _states(options: Options, seq_states: tuple, means: dict, devices: int) -> tuple:
  """The final states in ``state_argnums`` order (sequential ones averaged over devices)."""
  seq = iter(seq_states)
  out = []
  for p in options.state_argnums:
    if p in means:
      out.append(means[p])
      continue
    state = next(seq)
    if devices > 1:
      state = jax.tree.map(lambda s: s / jnp.asarray(devices, s.dtype)
                           if _dtypes.is_float(s) else s // devices, state)
    out.append(state)
  return tuple(out)


def _make_stats(totals: _reducers.Totals, n: int, size: int) -> _stats.AccumulationStats:
  """The noise-scale statistics from the reduced sums."""
  sums, devices = totals.sums, totals.devices
  counts = sums["counts"]
  small_sq = _dtypes.ratio(sums["sq_norm"], counts["sampled"])
  big_sq = _stats.sq_norm(jax.tree.map(totals.mean, sums["grads"]))
  b_small = jnp.asarray(size // n, jnp.int32)
  b_big = b_small.astype(jnp.float32) * counts["sampled"]
  g2, trace, scale = _stats.noise_estimates(small_sq, big_sq, b_small, b_big)
  return _stats.AccumulationStats(
      microbatch_sq_norm=small_sq, grad_sq_norm=big_sq, sq_norm_estimate=g2,
      trace_estimate=trace, noise_scale=scale, microbatch_size=b_small,
      num_microbatches=jnp.asarray(n, jnp.int32),
      effective_batch_size=jnp.asarray(size * devices, jnp.int32),
      num_skipped=counts["skipped"].astype(jnp.int32))
