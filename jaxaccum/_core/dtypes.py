"""Dtype and weight rules shared by the in-step loop and ``multi_steps``.

Sums are kept at least as wide as float32 (or ``accumulator_dtype``), a
micro-batch (or call) of weight zero adds exactly nothing, even a NaN, and a
weight the library cannot honour (NaN or negative) makes the result NaN
rather than a plausible wrong number.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def wide(dtype: Any) -> jnp.dtype:
  """A float dtype of at least 32 bits to sum values of ``dtype`` in."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.inexact) and dtype.itemsize >= 4:
    return dtype
  return jnp.dtype(jnp.float32)


def is_float(x: Any) -> bool:
  """Whether ``x`` holds floating or complex values."""
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def accumulator_for(accumulator_dtype: Any, dtype: Any) -> jnp.dtype:
  """The dtype to sum gradients of ``dtype`` in: at least ``accumulator_dtype``.

  Wider floats and complex gradients keep their own precision (and their
  imaginary part); ``None`` keeps ``dtype``.
  """
  dtype = jnp.dtype(dtype)
  if accumulator_dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
    return dtype
  acc = jnp.dtype(accumulator_dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return dtype if dtype.itemsize >= 2 * acc.itemsize else jnp.dtype(jnp.complex128)
  return dtype if dtype.itemsize >= acc.itemsize else acc


def check_static_weight(weight: Any) -> None:
  """A static ``weight`` (a Python or NumPy number) that is NaN, infinite or
  negative is a ValueError; a traced one is left to :func:`checked_weight`
  (the cycle becomes NaN)."""
  if isinstance(weight, (numbers.Real, np.ndarray, np.generic)) and not isinstance(
      weight, (bool, np.bool_)):
    value = np.asarray(weight, np.float64)
    if value.shape == () and not (np.isfinite(value) and value >= 0):
      raise ValueError(f"weight={weight!r} must be a number >= 0 and finite (a NaN, "
                       "infinite or negative weight has no weighted mean); pass "
                       "weight=0.0 to leave a call out")


def checked_weight(w: jax.typing.ArrayLike, what: str) -> jax.Array:
  """A scalar weight in a wide float dtype; NaN where it is NaN or negative.

  Args:
    w: the weight.
    what: how to name the weight's source in the error.

  Raises:
    ValueError: ``w`` is not a scalar.
  """
  w = jnp.asarray(w)
  if w.shape != ():
    raise ValueError(f"{what} must be a scalar, got shape {w.shape}")
  w = w.astype(wide(w.dtype)) if is_float(w) else w.astype(jnp.float32)
  return jnp.where(w >= 0, w, jnp.full_like(w, np.nan))


def scale_by_weight(x: jax.Array, w: jax.Array | None, dtype: Any) -> jax.Array:
  """``w * x`` in ``dtype``, exactly zero where ``w == 0`` (even if x is NaN).

  A NaN weight (see :func:`checked_weight`) gives NaN.
  """
  x = jnp.asarray(x).astype(dtype)
  if w is None:
    return x
  return jnp.where(w == 0, jnp.zeros_like(x), w.astype(dtype) * x)


def ratio(total: jax.Array, weight: jax.Array) -> jax.Array:
  """``total / weight``; zero where the weight is zero, NaN where it is NaN."""
  zero = weight == 0
  safe = jnp.where(zero, jnp.ones_like(weight), weight).astype(total.dtype)
  return jnp.where(zero, jnp.zeros_like(total), total / safe)
