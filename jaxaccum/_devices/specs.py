"""PartitionSpec and device-varying helpers, shared by every multi-device module.

``specs`` pytrees hold, per leaf, a ``PartitionSpec``; these helpers read,
trim and combine them, and mark values device-varying inside ``shard_map``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxaccum import _compat

PyTree = Any
Axes = tuple[Hashable, ...]

def axis_spec(axes: Axes) -> Hashable | Axes:
  """The PartitionSpec entry (and collective axis name) for ``axes``."""
  return axes if len(axes) > 1 else axes[0]


def is_spec(x: Any) -> bool:
  """Whether ``x`` is a ``PartitionSpec`` (a leaf of a specs pytree)."""
  return isinstance(x, P)


def explicit_names(mesh: Any) -> tuple:
  """The names of ``mesh``'s Explicit axes."""
  return tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
               if t == jax.sharding.AxisType.Explicit)


def explicit_axes(mesh: Any, axes: Axes) -> bool:
  """Whether every one of ``axes`` is an Explicit axis of ``mesh``."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  return all(types[a] == jax.sharding.AxisType.Explicit for a in axes)


def prefix_specs(prefix: Any, tree: PyTree) -> PyTree:
  """Per leaf of ``tree``, the ``PartitionSpec`` that the pytree prefix
  ``prefix`` gives it; a ValueError where ``prefix`` is no prefix of ``tree``."""
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), prefix, tree,
                      is_leaf=is_spec)


def entry_axes(entry: Any) -> tuple:
  """Mesh axis names of one entry of a ``PartitionSpec``."""
  if entry is None or entry is P.UNCONSTRAINED:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def entry_of(names: tuple) -> Any:
  return None if not names else names[0] if len(names) == 1 else names


def sharded_over(spec: P, axes: Axes) -> frozenset:
  """The axes of ``axes`` that ``spec`` shards an array dimension over."""
  return frozenset(a for entry in spec for a in entry_axes(entry) if a in axes)


def without(spec: P, axes: Axes, ndim: int, **types) -> P:
  """``spec`` with ``axes`` removed from its dimensions, padded to ``ndim``;
  ``types`` (``reduced=`` / ``unreduced=``) replace its reduced / unreduced sets."""
  entries = [entry_of(tuple(a for a in entry_axes(e) if a not in axes))
             for e in tuple(spec) + (None,) * (ndim - len(spec))]
  return P(*entries, **{k: frozenset(v) for k, v in types.items() if v})


def only(spec: P, axes: Axes) -> P:
  """``spec`` keeping only ``axes`` (the manual axes of a ``shard_map``)."""
  entries = [entry_of(tuple(a for a in entry_axes(e) if a in axes)) for e in spec]
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def spec_of(x: Any) -> P:
  """The ``PartitionSpec`` in ``x``'s type (all ``None`` on Auto axes)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  return P() if spec is None else spec


def map_specs(fn: Callable[..., Any], tree: PyTree, specs: PyTree) -> PyTree:
  return jax.tree.map(lambda s, x: fn(x, s), specs, tree, is_leaf=is_spec)



def zeros_of_type(s: jax.ShapeDtypeStruct) -> jax.Array:
  """Zeros of type ``s``, in its sharding (Explicit axes are part of the type)."""
  sharding = getattr(s, "sharding", None)
  return jnp.zeros(s.shape, s.dtype,
                   out_sharding=None if sharding is None else sharding.spec)


def varying_axes(aval: Any) -> frozenset:
  """The axes a type (an aval or a ``ShapeDtypeStruct``) varies over, in
  any of the spellings of the supported jax versions."""
  for path in (("vma",), ("manual_axis_type", "varying"), ("mat", "varying")):
    value = aval
    for name in path:
      value = getattr(value, name, None)
    if value is not None:
      return frozenset(value)
  return frozenset()


def to_varying(tree: PyTree, axes: Axes) -> PyTree:
  """Marks every leaf as device-varying over ``axes`` (where it is not yet)."""
  if not axes:
    return tree

  def cast(x):
    missing = tuple(a for a in axes if a not in varying_axes(jax.typeof(x)))
    return _compat.pcast_to_varying(x, missing) if missing else x

  return jax.tree.map(cast, tree)


def varying_like(tree: PyTree, shapes: PyTree) -> PyTree:
  """``tree`` cast device-varying where the types ``shapes`` are (inside a
  user's ``shard_map`` over device-varying parameters, a loop carry or both
  branches of a ``lax.cond`` must have their types)."""
  return jax.tree.map(lambda x, s: to_varying(x, tuple(varying_axes(s))), tree, shapes)
