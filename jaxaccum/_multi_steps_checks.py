"""Validation of ``multi_steps``'s options and of each ``update`` call's inputs.

A value ``multi_steps`` cannot honour is a ``TypeError`` (wrong type) or a
``ValueError`` (wrong value) naming the option, the value and the fix, where
it is known when tracing; traced values are handled by ``_multi_steps``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxaccum import _sharded

Updates = Any


def check_inner(inner: Any) -> None:
  if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
    hint = " (call it: optax.adam(1e-3), not optax.adam)" if callable(inner) else ""
    raise TypeError(f"inner={inner!r} is not an optax.GradientTransformation{hint}")


def check_skip_fn(should_skip_update_fn: Any) -> None:
  if should_skip_update_fn is not None and not callable(should_skip_update_fn):
    raise TypeError(f"{should_skip_update_fn=} is not callable; pass a function "
                    "(updates, gradient_step, params) -> (skip, skip_state), or None")


def check_bool(**option: Any) -> None:
  (name, value), = option.items()
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name}={value!r} must be True or False")


def schedule_of(every_k_schedule: Any) -> Callable[[jax.Array], Any]:
  """``every_k_schedule`` as a function of ``gradient_step``, validated."""
  name = f"every_k_schedule={every_k_schedule!r}"
  if isinstance(every_k_schedule, (bool, np.bool_)):
    raise TypeError(f"{name} is a bool; pass an integer >= 1 or a function of the step")
  if isinstance(every_k_schedule, (np.ndarray, jax.Array)) and not callable(every_k_schedule):
    if every_k_schedule.shape != () or not jnp.issubdtype(every_k_schedule.dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer >= 1 or a function of the step")
    every_k_schedule = int(every_k_schedule)
  if isinstance(every_k_schedule, numbers.Integral):
    if every_k_schedule < 1:
      raise ValueError(f"{name} must be an integer >= 1 (calls per optimizer step)")
    k = int(every_k_schedule)
    return lambda step: k
  if isinstance(every_k_schedule, numbers.Real):
    raise TypeError(f"{name} is not an integer; pass an int >= 1, e.g. "
                    "every_k_schedule=4, or a function of the step")
  if not callable(every_k_schedule):
    raise TypeError(f"{name} must be an integer >= 1 or a function of the step")
  return every_k_schedule


def every_k(schedule: Callable[[jax.Array], Any], gradient_step: jax.Array) -> jax.Array:
  """The schedule's ``k`` as int32; a static value below 1 is an error."""
  k = schedule(gradient_step)
  k_arr = k if isinstance(k, jax.core.Tracer) else np.asarray(k)
  if not jnp.issubdtype(k_arr.dtype, jnp.integer):
    raise TypeError(f"every_k_schedule returned {k!r} of dtype {k_arr.dtype}; it must "
                    "return an integer (e.g. jnp.where(step < 10, 1, 4), not 4.0)")
  if k_arr.shape != ():
    raise ValueError(f"every_k_schedule returned shape {k_arr.shape}; it must return "
                     "a scalar")
  if isinstance(k_arr, np.ndarray) and int(k_arr) < 1:
    raise ValueError(f"every_k_schedule returned {int(k_arr)}; it must return an "
                     "integer >= 1 (calls per optimizer step)")
  return jnp.asarray(k_arr).astype(jnp.int32)


def checked_skip(skip: Any, axes: tuple[Hashable, ...]) -> jax.Array:
  skip = jnp.asarray(skip)
  if (skip.dtype, skip.shape) != (jnp.bool_, ()):
    raise ValueError(
        "should_skip_update_fn must return a boolean scalar, got dtype "
        f"{skip.dtype} and shape {skip.shape}")
  if axes:
    # Devices must agree, or only some would enter the cycle's all-reduce:
    # a call skipped on any device is skipped on all of them.
    skip = lax.pmax(_sharded.to_varying(skip.astype(jnp.int32), axes), axes) > 0
  return skip


def check_structure(updates: Updates, acc_grads: Any) -> None:
  got, want = jax.tree.structure(updates), jax.tree.structure(acc_grads)
  if got != want:
    raise ValueError(
        "multi_steps: the gradients do not have the structure of the parameters "
        f"the state was initialized with: got {got}, expected {want}; pass "
        "gradients of the same pytree as the params given to init")


def check_axes_bound(axis_name: Any, axes: tuple[Hashable, ...]) -> None:
  for a in axes:
    try:
      lax.axis_size(a)
    except NameError:
      raise ValueError(
          f"{axis_name=} is not bound here: multi_steps(axis_name=...) is for "
          "updates called inside jax.pmap or jax.shard_map over that axis; under "
          "plain jax.jit over sharded arrays, leave axis_name=None") from None
