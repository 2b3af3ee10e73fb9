"""One micro-batch: build its call, differentiate ``fun``, weigh the result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxaccum import _dtypes
from jaxaccum._options import Options

PyTree = Any


class Micro(NamedTuple):
  """What one micro-batch gives the reducers.

  Attributes:
    value: the loss.
    grads: its gradients.
    aux: its auxiliary output (``()`` without ``has_aux``).
    states: the new value of each state argument, in ``state_argnums`` order.
    weight: its weight in the sums (``None``: unweighted): ``weight_fn``'s
      result (NaN if negative or NaN), zero if ``skip_nonfinite`` left it out.
    kept: 1.0, or 0.0 if ``skip_nonfinite`` left it out.
    sampled: 1.0 if it is a gradient sample of the statistics: kept, with a
      positive weight.
    skipped: 1.0 if ``skip_nonfinite`` left out a micro-batch of positive
      weight.
  """

  value: jax.Array
  grads: PyTree
  aux: PyTree
  states: tuple
  weight: jax.Array | None
  kept: jax.Array
  sampled: jax.Array
  skipped: jax.Array


class Batch(NamedTuple):
  """The batch arguments of one call: positional ones and keyword ones."""

  args: tuple
  kwargs: dict


def batch_of(options: Options, args: tuple, kwargs: dict) -> Batch:
  """The arguments that ``batch_argnums`` / ``batch_argnames`` name."""
  missing = [k for k in options.batch_argnames if k not in kwargs]
  if missing:
    raise ValueError(
        f"batch_argnames={options.batch_argnames} names keyword arguments {missing} "
        f"that the call does not pass (it passes {sorted(kwargs)})")
  return Batch(tuple(args[i] for i in options.batch_argnums),
               {k: kwargs[k] for k in options.batch_argnames})


def make(options: Options, grad_fn: Callable[..., Any], args: tuple, kwargs: dict,
         keys: dict[int, jax.Array],
         microbatch: Callable[[tuple, Batch], tuple] = lambda diff, micro: diff,
         ) -> Callable[..., tuple[Micro, tuple]]:
  """The micro-step: ``step(index, micro_batch, seq_states) -> (Micro, seq_states)``.

  ``seq_states`` are the values of the ``"sequential"`` state arguments that
  the micro-batch sees; ``keys`` the PRNG keys to fold ``index`` into;
  ``microbatch(diff_args, micro_batch)`` gives the differentiated arguments
  as this micro-batch sees them (gathered per micro-batch, say).
  """
  policies = dict(zip(options.state_argnums, options.state_policies))
  seq_pos = tuple(p for p in options.state_argnums if policies[p] == "sequential")

  def step(index: jax.Array, micro: Batch, seq_states: tuple) -> tuple[Micro, tuple]:
    call = list(args)
    for pos, part in zip(options.batch_argnums, micro.args):
      call[pos] = part
    for pos, key in keys.items():
      call[pos] = jax.random.fold_in(key, index)
    for pos, state in zip(seq_pos, seq_states):
      call[pos] = state
    diff = microbatch(tuple(call[i] for i in options.argnums), micro)
    for pos, arg in zip(options.argnums, diff):
      call[pos] = arg
    out, grads = grad_fn(*call, **{**kwargs, **micro.kwargs})
    value, aux, states = unpack(options, out)
    weight, kept, weighed = _weigh(options, micro, value, grads)
    new_seq = tuple(_keep_if(kept, states[options.state_argnums.index(p)], old)
                    for p, old in zip(seq_pos, seq_states))
    sampled = kept * weighed
    return Micro(value, grads, aux, states, weight, kept, sampled, weighed - sampled), new_seq

  return step


def _weigh(options: Options, micro: Batch, value: jax.Array, grads: PyTree):
  """The micro-batch's weight, whether it is kept, whether its weight is positive."""
  one = jnp.ones([], jnp.float32)
  weight = None
  if options.weight_fn is not None:
    weight = _dtypes.checked_weight(options.weight_fn(*micro.args, **micro.kwargs),
                                    "weight_fn's result")
  # A micro-batch of weight zero (all padding) is no gradient sample, and even
  # with a 0 / 0 loss it is not counted as skipped.
  weighed = one if weight is None else (weight != 0).astype(jnp.float32)
  if not options.skip_nonfinite:
    return weight, one, weighed
  finite = jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((value, grads))]))
  if weight is None:
    return jnp.where(finite, one, 0), finite.astype(jnp.float32), weighed
  # A NaN weight (NaN or negative from weight_fn) stays NaN even when skipped.
  weight = jnp.where(jnp.logical_or(finite, jnp.isnan(weight)), weight, 0)
  return weight, finite.astype(jnp.float32), weighed


def _keep_if(kept: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """A skipped micro-batch leaves the sequential state as it found it."""
  return jax.tree.map(lambda n, o: jnp.where(kept > 0, n, o), new, old)


def unpack(options: Options, out: Any) -> tuple[jax.Array, PyTree, tuple]:
  """Splits ``fun``'s output into value, aux and the new states (a tuple)."""
  if not options.state_argnums:
    value, aux = out if options.has_aux else (out, ())
    return value, aux, ()
  # fun's output was checked to be a pair when the function was built.
  value, rest = out
  aux, states = rest if options.has_aux else ((), rest)
  states = tuple(states) if options.state_is_tuple else (states,)
  if len(states) != len(options.state_argnums):
    raise ValueError(
        f"fun returned {len(states)} new states for "
        f"state_argnums={options.state_argnums}")
  return value, aux, states
