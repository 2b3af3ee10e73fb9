"""Validating a batch and splitting it into strided micro-batches.

Micro-batch ``i`` of ``N`` holds rows ``i, i + N, i + 2N, ...`` of the batch.
A strided split keeps a data-parallel sharding of the leading axis in place:
with the batch sharded in contiguous blocks over ``D`` devices and ``B / N``
divisible by ``D``, every device holds ``B / (N D)`` rows of every micro-batch,
so no row moves. Contiguous slices would put each micro-batch on ``D / N``
devices and make XLA gather the batch (see the scale-out notes in the README).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax import lax

PyTree = Any


def normalize_argnums(name: str, argnums: int | Sequence[int]) -> tuple[int, ...]:
  """Returns ``argnums`` as a tuple of non-negative ints, or raises ValueError."""
  nums = (argnums,) if isinstance(argnums, (int, np.integer)) else tuple(argnums)
  for n in nums:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
      raise ValueError(f"{name} must be non-negative ints, got {name}={argnums!r}")
  if len(set(nums)) != len(nums):
    raise ValueError(f"{name} has repeated entries: {name}={argnums!r}")
  return tuple(int(n) for n in nums)


def resolve_num_microbatches(
    batch_size: int, num_microbatches: int | None, microbatch_size: int | None
) -> int:
  """Returns N for a batch of ``batch_size`` rows, or raises ValueError."""
  if microbatch_size is not None:
    if batch_size % microbatch_size:
      raise ValueError(
          f"batch leading size {batch_size} is not divisible by "
          f"{microbatch_size=}"
      )
    return batch_size // microbatch_size
  if batch_size % num_microbatches:
    raise ValueError(
        f"batch leading size {batch_size} is not divisible by "
        f"{num_microbatches=}"
    )
  return num_microbatches


def check_counts(num_microbatches: int | None, microbatch_size: int | None) -> None:
  """Validates the two mutually exclusive size options."""
  if (num_microbatches is None) == (microbatch_size is None):
    raise ValueError(
        "exactly one of num_microbatches and microbatch_size must be given, got "
        f"{num_microbatches=} and {microbatch_size=}"
    )
  for name, value in (("num_microbatches", num_microbatches),
                      ("microbatch_size", microbatch_size)):
    if value is None:
      continue
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise ValueError(f"{name} must be an int, got {name}={value!r}")
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {name}={value}")


def batch_size(batch: PyTree) -> int:
  """Returns the leading size shared by every array leaf of ``batch``.

  Raises:
    TypeError: a leaf is not an array (a Python scalar or list, say).
    ValueError: the batch has no leaves, a leaf is a scalar, or the leaves'
      leading sizes differ.
  """
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError("the batch arguments hold no arrays to split")
  sizes = {}
  for path, leaf in leaves:
    where = "batch" + jax.tree_util.keystr(path)
    if not isinstance(leaf, (jax.Array, np.ndarray)):
      raise TypeError(
          f"batch leaf {where} is a {type(leaf).__name__}, not an array; "
          "pass jax or numpy arrays with a leading batch axis"
      )
    if leaf.ndim == 0:
      raise ValueError(f"batch leaf {where} is a scalar; it needs a leading batch axis")
    sizes[where] = leaf.shape[0]
  if len(set(sizes.values())) > 1:
    listed = ", ".join(f"{k}: {v}" for k, v in sizes.items())
    raise ValueError(f"batch leaves have different leading sizes ({listed})")
  return next(iter(sizes.values()))


def stride(batch: PyTree, num_microbatches: int) -> PyTree:
  """Reshapes every leaf from ``(B, ...)`` to ``(B // N, N, ...)``."""
  return jax.tree.map(
      lambda x: x.reshape(x.shape[0] // num_microbatches, num_microbatches,
                          *x.shape[1:]),
      batch,
  )


def microbatch(strided: PyTree, i: jax.Array) -> PyTree:
  """Micro-batch ``i`` of a batch reshaped by :func:`stride`."""
  return jax.tree.map(
      lambda x: lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False), strided
  )
