"""Cross-device reduction: device-local accumulation, one reduction per cycle.

Inside ``shard_map`` (with ``check_vma=True``) JAX tracks which values differ
across devices. Differentiating with respect to parameters that are the same on
every device makes JAX insert a ``psum`` into every micro-step's backward pass.
Casting the parameters (and the loop carry) to device-varying first keeps every
micro-step's gradient local, so the only all-reduce is the one this module
emits after the loop. Under ``jax.pmap`` nothing is tracked and the casts are
no-ops.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
from jax import lax

from jaxaccum import _compat

PyTree = Any
AxisName = Hashable | Sequence[Hashable] | None


def axes_of(axis_name: AxisName) -> tuple[Hashable, ...]:
  """``axis_name`` as a tuple of mesh axis names (empty for ``None``)."""
  if axis_name is None:
    return ()
  if isinstance(axis_name, (tuple, list)):
    return tuple(axis_name)
  return (axis_name,)


def _varying_axes(x: jax.Array) -> frozenset:
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))


def to_varying(tree: PyTree, axes: tuple[Hashable, ...]) -> PyTree:
  """Marks every leaf as device-varying over ``axes`` (where it is not yet)."""
  if not axes:
    return tree

  def cast(x):
    missing = tuple(a for a in axes if a not in _varying_axes(x))
    return _compat.pcast_to_varying(x, missing) if missing else x

  return jax.tree.map(cast, tree)


def psum(tree: PyTree, axes: tuple[Hashable, ...]) -> PyTree:
  """One ``psum`` of a whole pytree over ``axes`` (identity without axes)."""
  return lax.psum(tree, axes) if axes else tree


def pmean(tree: PyTree, axes: tuple[Hashable, ...]) -> PyTree:
  """One ``pmean`` of a whole pytree over ``axes`` (identity without axes)."""
  return lax.pmean(tree, axes) if axes else tree


def axis_size(axes: tuple[Hashable, ...]) -> int:
  """Number of devices taking part in a reduction over ``axes``."""
  size = 1
  for a in axes:
    size *= lax.axis_size(a)
  return size
