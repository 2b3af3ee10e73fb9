"""Multi-device code in one place: where the cross-device reduction happens.

The loop talks to devices only through a :class:`Parallel` strategy:
``run`` wraps the whole accumulation, ``prepare`` readies the differentiated
arguments, ``carry`` gives a contribution the loop carry's type, ``reduce`` is
the one cross-device reduction after the loop, ``num_devices`` counts the
devices it adds up, and ``rng_salt`` tells devices' random streams apart.

Inside ``shard_map`` (with ``check_vma=True``) JAX tracks which values differ
across devices. Differentiating with respect to parameters that are the same
on every device makes JAX insert a ``psum`` into every micro-step's backward
pass. Casting the parameters (and the loop carry) to device-varying first
keeps every micro-step's gradient local, so the only all-reduce is the one
``reduce`` emits after the loop. Under ``jax.pmap`` nothing is tracked and
the casts are no-ops.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

PyTree = Any
Axes = tuple[Hashable, ...]


def axis_spec(axes: Axes) -> Hashable | Axes:
  """The PartitionSpec entry (and collective axis name) for ``axes``."""
  return axes if len(axes) > 1 else axes[0]


def _varying_axes(x: jax.Array) -> frozenset:
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))


def to_varying(tree: PyTree, axes: Axes) -> PyTree:
  """Marks every leaf as device-varying over ``axes`` (where it is not yet)."""
  if not axes:
    return tree

  def cast(x):
    missing = tuple(a for a in axes if a not in _varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def fold_in_device(key: jax.Array, salt: jax.Array) -> jax.Array:
  """``jax.random.fold_in`` of ``salt`` into an array of keys of any shape."""
  # A raw uint32 key is an array of shape (..., 2), a typed key a scalar.
  raw = not jax.numpy.issubdtype(key.dtype, jax.dtypes.prng_key)
  flat = key.reshape((-1, key.shape[-1]) if raw else (-1,))
  return jax.vmap(lambda k: jax.random.fold_in(k, salt))(flat).reshape(key.shape)


class Local:
  """One device: nothing to reduce."""

  def run(self, loop: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return loop(args, kwargs)

  def prepare(self, tree: PyTree) -> PyTree:
    return tree

  def carry(self, tree: PyTree) -> PyTree:
    return tree

  def reduce(self, tree: PyTree) -> PyTree:
    return tree

  def num_devices(self) -> int:
    return 1

  def rng_salt(self) -> jax.Array | None:
    return None


@dataclasses.dataclass(frozen=True)
class Named(Local):
  """Inside ``jax.pmap`` / ``jax.shard_map``: one ``psum`` over ``axes``."""

  axes: Axes
  salted: bool = False

  def prepare(self, tree: PyTree) -> PyTree:
    try:
      self.num_devices()
    except NameError as e:
      raise ValueError(
          f"axis_name={axis_spec(self.axes)!r} is not an axis of an enclosing "
          "jax.pmap or jax.shard_map; call the function inside one that binds it, "
          "or, for a jax.jit step over a sharded batch, use data_axis= instead"
      ) from e
    return to_varying(tree, self.axes)

  def carry(self, tree: PyTree) -> PyTree:
    return to_varying(tree, self.axes)

  def reduce(self, tree: PyTree) -> PyTree:
    return lax.psum(tree, self.axes)

  def num_devices(self) -> int:
    return math.prod(lax.axis_size(a) for a in self.axes)

  def rng_salt(self) -> jax.Array | None:
    return lax.axis_index(axis_spec(self.axes)) if self.salted else None


@dataclasses.dataclass(frozen=True)
class DataAxis(Named):
  """A ``jax.jit`` step over a batch sharded along ``axes`` of ``mesh``.

  Runs the loop in a ``jax.shard_map`` over ``axes`` (other arguments
  replicated), with the single reduction of :class:`Named`. The loop returns
  ``(replicated, scattered)``: the reduced results, and the per-example aux
  rows that stay sharded along ``axes`` like the batch.
  """

  mesh: Any = None
  batch_argnums: tuple[int, ...] = ()
  batch_argnames: tuple[str, ...] = ()

  def run(self, loop: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    mesh = resolve_mesh(self.axes, self.mesh)
    batch_spec = PartitionSpec(axis_spec(self.axes))
    specs = tuple(batch_spec if i in self.batch_argnums else PartitionSpec()
                  for i in range(len(args)))
    kw_specs = {k: batch_spec if k in self.batch_argnames else PartitionSpec()
                for k in kwargs}
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(types[a] == jax.sharding.AxisType.Explicit for a in self.axes):
      # Explicit-sharding meshes do not reshard shard_map inputs implicitly.
      to = ((lambda spec: NamedSharding(mesh, spec))
            if isinstance(mesh, jax.sharding.Mesh) else (lambda spec: spec))
      args, kwargs = jax.tree.map(
          lambda spec, a: jax.sharding.reshard(a, to(spec)), (specs, kw_specs),
          (args, kwargs), is_leaf=lambda x: isinstance(x, PartitionSpec))

    return jax.shard_map(
        loop, mesh=mesh, in_specs=(specs, kw_specs),
        out_specs=(PartitionSpec(), batch_spec),
        axis_names=frozenset(self.axes))(args, kwargs)


def resolve_mesh(axes: Axes, mesh: Any) -> Any:
  """``mesh`` (or the ambient mesh), checked to have ``axes``."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(
        f"data_axis={axis_spec(axes)!r} names axes {missing} that the mesh does "
        f"not have (mesh axes: {mesh.axis_names}); pass mesh= or set one with "
        "jax.set_mesh")
  return mesh


def data_devices(axes: Axes, mesh: Any) -> int:
  """The number of devices along ``axes`` of ``mesh`` (1 without axes)."""
  if not axes:
    return 1
  mesh = resolve_mesh(axes, mesh)
  return int(np.prod([mesh.shape[a] for a in axes]))


def for_options(options: Any) -> Local:
  """The strategy for an accumulated function's options."""
  if options.data_axis:
    return DataAxis(options.data_axis, salted=True, mesh=options.mesh,
                    batch_argnums=options.batch_argnums,
                    batch_argnames=options.batch_argnames)
  if options.axis_name:
    return Named(options.axis_name)
  return Local()


def salt_keys(keys: PyTree, axes: Axes) -> PyTree:
  """Folds the device's index along ``axes`` into every PRNG key of ``keys``."""
  salt = lax.axis_index(axis_spec(axes))
  return jax.tree.map(lambda k: fold_in_device(k, salt), keys)
