"""fp16 loss scaling over micro-batches: ``jaxaccum.linen``'s ``DynamicScale`` helpers.

One finiteness decision and one scale adjustment per accumulation cycle
(see :mod:`jaxaccum.linen`, which exports these). Imported by
``jaxaccum.linen`` only, after it checked that flax is installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.training.dynamic_scale import DynamicScale, DynamicScaleResult

from jaxaccum._core.accumulate import value_and_grad as _value_and_grad


def update_dynamic_scale(dynamic_scale: DynamicScale, finite: jax.typing.ArrayLike
                         ) -> DynamicScale:
  """One adjustment of a ``DynamicScale``, by the rule of its ``value_and_grad``.

  Grows the scale by ``growth_factor`` after ``growth_interval`` finite
  decisions in a row, lowers it by ``backoff_factor`` (not below
  ``minimum_scale``) after a non-finite one.

  Args:
    dynamic_scale: the current ``flax.training.dynamic_scale.DynamicScale``.
    finite: whether the gradients of this decision were finite.

  Returns:
    The adjusted ``DynamicScale``.

  Example:

    >>> from flax.training.dynamic_scale import DynamicScale
    >>> import jaxaccum.linen
    >>> float(jaxaccum.linen.update_dynamic_scale(DynamicScale(), False).scale)
    32768.0
  """
  ds = dynamic_scale
  finite = jnp.asarray(finite, jnp.bool_)
  grow = ds.fin_steps == ds.growth_interval
  fin_scale = jnp.where(
      grow & finite,
      jnp.minimum(ds.scale * ds.growth_factor, jnp.finfo(jnp.float32).max), ds.scale)
  inf_scale = ds.scale * ds.backoff_factor
  if ds.minimum_scale is not None:
    inf_scale = jnp.maximum(inf_scale, ds.minimum_scale)
  new_scale = jnp.where(finite, fin_scale, inf_scale)
  new_fin_steps = jnp.where(grow | ~finite, 0, ds.fin_steps + 1)
  return ds.replace(fin_steps=new_fin_steps, scale=new_scale)


def all_finite(tree: Any) -> jax.Array:
  finite = jnp.array(True)
  for leaf in jax.tree.leaves(tree):
    finite &= jnp.all(jnp.isfinite(leaf))
  return finite


def check_dynamic_scale(dynamic_scale: Any) -> None:
  if not isinstance(dynamic_scale, DynamicScale):
    raise TypeError(f"dynamic_scale={dynamic_scale!r} is not a "
                    "flax.training.dynamic_scale.DynamicScale")


_FACTOR = "_jaxaccum_loss_scale"  # the keyword scaled_value_and_grad passes the scale by


def scaled_value_and_grad(
    dynamic_scale: DynamicScale,
    fun: Callable[..., Any],
    *,
    num_microbatches: int = 1,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    **options: Any,
) -> Callable[..., tuple[Any, Any]]:
  """Value and float32 gradients of ``fun`` computed with the loss scaled.

  The loss is multiplied by ``dynamic_scale.scale`` (divided by
  ``num_microbatches`` with the default ``reduction="mean"``, so each
  micro-batch's backward pass holds values of the size the full batch's would)
  and the gradients are divided by the same factor, in float32. Nothing is
  decided here: the gradients may hold infinities or NaN and the scale is left
  as it is. Across steps, give them to :func:`apply_scaled_gradients`, which
  decides once per cycle; in one step, :func:`dynamic_scale_value_and_grad`
  decides after the micro-batches.

  Args:
    dynamic_scale: a ``flax.training.dynamic_scale.DynamicScale``.
    fun: the loss, as for :func:`jaxaccum.value_and_grad`.
    num_microbatches: micro-batches in this call (``1``: no loop).
    argnums: as for :func:`jax.value_and_grad`.
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    **options: further options of :func:`jaxaccum.value_and_grad`
      (``batch_argnums``, ``weight_fn``, ``axis_name``, ...; not
      ``microbatch_size``: the scale is divided by ``num_microbatches``).

  Returns:
    A function with the arguments of ``fun`` returning ``(value, grads)`` (or
    ``((value, aux), grads)``), unscaled.

  Example:

    >>> import jax.numpy as jnp, jaxaccum.linen
    >>> from flax.training.dynamic_scale import DynamicScale
    >>> loss = lambda w, x: jnp.mean((x * w) ** 2)
    >>> fn = jaxaccum.linen.scaled_value_and_grad(DynamicScale(), loss, num_microbatches=2)
    >>> value, grads = fn(jnp.float32(3.0), jnp.arange(4.0))
    >>> float(value), float(grads)
    (31.5, 21.0)
  """
  check_dynamic_scale(dynamic_scale)
  if "microbatch_size" in options:
    raise TypeError("scaled_value_and_grad takes num_microbatches, not microbatch_size "
                    "(the loss scale is divided by the number of micro-batches)")

  # The factor goes by a keyword of its own, and scaled has fun's signature,
  # so that a batch passed by keyword is found by name and the factor is never
  # taken for the batch.
  @functools.wraps(fun)
  def scaled(*args, **kwargs):
    factor = kwargs.pop(_FACTOR)
    out = fun(*args, **kwargs)
    loss, aux = out if has_aux else (out, None)
    # The scale multiplies the loss as DynamicScale.value_and_grad does: a
    # weakly typed scale keeps the loss dtype, a float32 one promotes it.
    with jax.numpy_dtype_promotion("standard"):
      loss = factor * loss
    return (loss, aux) if has_aux else loss

  vg = _value_and_grad(scaled, num_microbatches=num_microbatches, argnums=argnums,
                       has_aux=has_aux, **options)
  per_microbatch = options.get("reduction", "mean") == "mean"

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    factor = dynamic_scale.scale / num_microbatches if per_microbatch else dynamic_scale.scale
    out, grads = vg(*args, **kwargs, **{_FACTOR: factor})
    with jax.numpy_dtype_promotion("standard"):
      value = (out[0] if has_aux else out) / factor
      grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32) / factor, grads)
    return ((value, out[1]) if has_aux else value), grads

  return wrapped


def dynamic_scale_value_and_grad(
    dynamic_scale: DynamicScale,
    fun: Callable[..., Any],
    *,
    num_microbatches: int,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    **options: Any,
) -> Callable[..., DynamicScaleResult]:
  """``DynamicScale.value_and_grad`` over micro-batches: one decision per step.

  Computes :func:`scaled_value_and_grad` over ``num_microbatches``
  micro-batches, then, once, checks that the accumulated gradients are finite
  and adjusts the scale (:func:`update_dynamic_scale`): an overflow in any
  micro-batch makes the step non-finite and lowers the scale once. The result
  is what ``dynamic_scale.value_and_grad(fun, argnums, has_aux)`` returns on
  the whole batch; apply it as Flax's examples do (keep the old parameters
  and optimizer state where ``is_fin`` is false).

  Args:
    dynamic_scale: a ``flax.training.dynamic_scale.DynamicScale``.
    fun: the loss, as for :func:`jaxaccum.value_and_grad`.
    num_microbatches: the number of micro-batches.
    argnums: as for :func:`jax.value_and_grad`.
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    **options: further options of :func:`jaxaccum.value_and_grad`
      (``axis_name`` averages the gradients across devices, as
      ``DynamicScale.value_and_grad``'s does).

  Returns:
    A function with the arguments of ``fun`` returning a
    ``DynamicScaleResult(dynamic_scale, finite, aux, grad)``.

  Example:

    >>> import jax.numpy as jnp, jaxaccum.linen
    >>> from flax.training.dynamic_scale import DynamicScale
    >>> loss = lambda w, x: jnp.mean((x * w) ** 2)
    >>> fn = jaxaccum.linen.dynamic_scale_value_and_grad(DynamicScale(), loss, num_microbatches=2)
    >>> ds, is_fin, value, grads = fn(jnp.float32(3.0), jnp.arange(4.0))
    >>> bool(is_fin), float(grads), int(ds.fin_steps)
    (True, 21.0, 1)
  """
  vg = scaled_value_and_grad(dynamic_scale, fun, num_microbatches=num_microbatches,
                             argnums=argnums, has_aux=has_aux, **options)

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    value, grads = vg(*args, **kwargs)
    finite = all_finite(grads)
    return DynamicScaleResult(update_dynamic_scale(dynamic_scale, finite), finite, value, grads)

  return wrapped
