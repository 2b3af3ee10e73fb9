"""A restored ``multi_steps`` state whose accumulator has another device count.

With ``data_axis`` the accumulator holds one row per device along the data
axes (each leaf of shape ``(D, *param.shape)``); without it, a leaf has the
parameter's shape. A state saved under one form and restored (with
``flax.serialization`` or orbax) into a transformation of another form, or
with another ``D``, has accumulator shapes ``init`` would not give. What must
survive is the cycle's sum, and that is the sum of the rows: so the rows are
summed and the sum is placed as ordinary gradients are placed. Shapes are
static, so this is decided when ``update`` traces; an accumulator of any other
shape is a ``ValueError`` naming ``data_axis``, never a broadcast.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxaccum._devices.deferred import DeferredGrads
from jaxaccum._steps.config import Config


def converted(cfg: Config, updates: Any, acc_grads: Any) -> Any:
  """``acc_grads`` in the form of the transformation of ``cfg``.

  Args:
    cfg: the options of one ``multi_steps``.
    updates: the call's gradients (ordinary or :class:`DeferredGrads`), which
      give the parameters' shapes.
    acc_grads: the state's accumulator.

  Returns:
    ``acc_grads`` itself where its shapes are this transformation's, else
    the same sum in this transformation's form.
  """
  grads = updates.partials if isinstance(updates, DeferredGrads) else updates
  if jax.tree.structure(grads) != jax.tree.structure(acc_grads):
    return acc_grads  # a structure error follows
  shapes = [jnp.shape(g)[1:] if isinstance(updates, DeferredGrads) else jnp.shape(g)
            for g in jax.tree.leaves(grads)]
  rows = () if cfg.data is None else (cfg.data.devices(),)
  leaves = jax.tree.leaves(acc_grads)
  if all(jnp.shape(a) == rows + s for a, s in zip(leaves, shapes)):
    return acc_grads
  if cfg.axis_name:
    raise ValueError(
        "multi_steps(axis_name=...) got a state whose accumulator has shapes "
        f"{[jnp.shape(a) for a in leaves]} for gradients of shapes {shapes}: a state "
        "saved with data_axis (one row per device) or of other parameters. Under "
        "axis_name each device keeps its own sum, which a restored row sum cannot be "
        "split into; restore it into multi_steps(data_axis=...) or into one without "
        "either, or start the cycle again from ms.init(params)")
  sums = [_total(a, s, rows, cfg) for a, s in zip(leaves, shapes)]
  total = jax.tree.structure(acc_grads).unflatten(sums)
  return total if cfg.data is None else cfg.data.partials(total, total)


def _total(acc: Any, shape: tuple, rows: tuple, cfg: Config) -> jax.Array:
  """The sum one restored accumulator leaf holds, for a parameter of ``shape``."""
  acc = jnp.asarray(acc)
  if acc.shape == shape:
    return acc  # saved without data_axis: the sum itself
  if acc.ndim == len(shape) + 1 and acc.shape[1:] == shape:
    return jnp.sum(acc, axis=0, dtype=acc.dtype)  # saved with data_axis: one row a device
  form = "without data_axis" if cfg.data is None else (
      f"with data_axis={cfg.data.axes!r} on {rows[0]} devices")
  raise ValueError(
      f"multi_steps: the state's accumulator has a leaf of shape {acc.shape} for a "
      f"parameter of shape {shape}; a state saved with or without data_axis, on any "
      f"number of devices, is converted to this transformation's form ({form}: shape "
      f"{rows + shape}), but this one fits neither; restore a state of the same "
      "parameters, or start the cycle again from ms.init(params)")
