"""Validating a batch and splitting it into strided micro-batches.

Micro-batch ``i`` of ``N`` holds rows ``i, i + N, i + 2N, ...`` of the batch.
A strided split keeps a data-parallel sharding of the leading axis in place:
with the batch sharded in contiguous blocks over ``D`` devices and ``B / N``
divisible by ``D``, every device holds ``B / (N D)`` rows of every micro-batch,
so no row moves. Contiguous slices would put each micro-batch on ``D / N``
devices and make XLA gather the batch (see the scale-out notes in the README).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any


def resolve_num_microbatches(batch_size: int, options: Any) -> int:
  """Returns N for a batch of ``batch_size`` rows, or raises ValueError."""
  where = (f"the batch arguments (batch_argnums={options.batch_argnums}, "
           f"batch_argnames={options.batch_argnames})")
  if batch_size == 0:
    raise ValueError(f"{where} have leading size 0: there are no rows to split")
  if options.microbatch_size is not None:
    microbatch_size = options.microbatch_size
    if batch_size % microbatch_size:
      raise ValueError(
          f"batch leading size {batch_size} is not divisible by {microbatch_size=}; "
          f"{where} must have a multiple of it as their leading size")
    return batch_size // microbatch_size
  num_microbatches = options.num_microbatches
  if batch_size % num_microbatches:
    raise ValueError(
        f"batch leading size {batch_size} is not divisible by {num_microbatches=}; "
        f"{where} must have a multiple of it as their leading size")
  return num_microbatches


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


def unstride(stacked: jax.Array) -> jax.Array:
  """Per-micro-batch rows ``(N, B // N, ...)`` back in the batch's order ``(B, ...)``."""
  return jnp.swapaxes(stacked, 0, 1).reshape(-1, *stacked.shape[2:])
