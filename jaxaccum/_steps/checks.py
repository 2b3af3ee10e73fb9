"""What ``multi_steps`` checks when ``update`` traces: the schedule's value,
the skip decision, the gradients' structure and form, the weight.

What is known when tracing is an error naming the option and the fix; a
traced value that cannot be honoured makes the cycle's updates NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxaccum._core import dtypes
from jaxaccum._devices import specs
from jaxaccum._devices.deferred import DeferredGrads, check_untransformed, filtered_partials
from jaxaccum._steps.config import Config


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
    skip = lax.pmax(specs.to_varying(skip.astype(jnp.int32), axes), axes) > 0
  return skip


def check_structure(updates: Any, acc_grads: Any) -> None:
  got, want = jax.tree.structure(updates), jax.tree.structure(acc_grads)
  if got != want:
    raise ValueError(
        "multi_steps: the gradients do not have the structure of the parameters "
        f"the state was initialized with: got {got}, expected {want}; pass "
        "gradients of the same pytree as the params given to init")


def incoming(cfg: Config, updates: Any, acc_grads: Any) -> Any:
  """The call's gradients, in the accumulator's form."""
  if isinstance(updates, DeferredGrads) and cfg.data is None:
    raise TypeError(
        f"multi_steps got DeferredGrads (not yet reduced over {updates.axes}) but was "
        f"built without data_axis; pass multi_steps(..., data_axis={updates.axes!r}) "
        "to reduce them once a cycle, or drop defer_reduction=True")
  if cfg.data is None and filtered_partials(updates, acc_grads):
    raise TypeError(
        "multi_steps got a pytree holding DeferredGrads' partials (as nnx.Optimizer "
        "filters them) but was built without data_axis; pass multi_steps(..., "
        "data_axis=...) to reduce them once a cycle, or drop defer_reduction=True")
  if cfg.data is not None:
    check_untransformed(updates, acc_grads)
  check_structure(updates.partials if isinstance(updates, DeferredGrads) else updates,
                  acc_grads)
  return updates if cfg.data is None else cfg.data.partials(updates, acc_grads)


def checked_weight(weight: Any) -> jax.Array:
  """``weight`` as float32; a static NaN, infinite or negative one is an error, a traced
  one becomes NaN (see ``multi_steps``)."""
  dtypes.check_static_weight(weight)
  return dtypes.checked_weight(weight, "weight").astype(jnp.float32)

