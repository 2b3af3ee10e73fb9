"""Multi-device code in one place: where the cross-device reduction happens.

The loop talks to devices only through a strategy (:class:`Local` and its
kin): ``run`` wraps the whole accumulation and hands the loop the strategy
that runs it, ``prepare`` readies the differentiated arguments (a tuple, one
per ``argnums``) and ``microbatch`` what one micro-batch differentiates,
``carry`` gives a contribution the loop carry's type and ``gradients`` a
micro-batch's gradient sum, ``zeros`` starts the carry, ``reduce`` is the
one cross-device reduction after the loop (the gradient sums apart from the
rest), ``num_devices`` counts the devices it adds up, and ``rng_salt`` tells
devices' random streams apart. ``data_axis`` strategies for sharded
parameters live in :mod:`jaxaccum._sharded`.

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
from jax.sharding import PartitionSpec

from jaxaccum import _compat, _sharded
from jaxaccum._sharded import to_varying

PyTree = Any
Axes = tuple[Hashable, ...]


def axis_spec(axes: Axes) -> Hashable | Axes:
  """The PartitionSpec entry (and collective axis name) for ``axes``."""
  return axes if len(axes) > 1 else axes[0]


def fold_in_device(key: jax.Array, salt: jax.Array) -> jax.Array:
  """``jax.random.fold_in`` of ``salt`` into an array of keys of any shape."""
  # A raw uint32 key is an array of shape (..., 2), a typed key a scalar.
  raw = not jax.numpy.issubdtype(key.dtype, jax.dtypes.prng_key)
  flat = key.reshape((-1, key.shape[-1]) if raw else (-1,))
  return jax.vmap(lambda k: jax.random.fold_in(k, salt))(flat).reshape(key.shape)


class Local:
  """One device: nothing to reduce."""

  def run(self, loop: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return loop(self, args, kwargs)

  def prepare(self, diff: tuple) -> tuple:
    return diff

  def microbatch(self, diff: tuple, micro: PyTree) -> tuple:
    return diff

  def carry(self, tree: PyTree) -> PyTree:
    return tree

  def gradients(self, grads: PyTree) -> PyTree:
    return self.carry(grads)

  def zeros(self, shapes: PyTree) -> PyTree:
    return self.carry(jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), shapes))

  def reduce(self, others: PyTree, grads: PyTree) -> tuple[PyTree, PyTree]:
    return self._reduce((others, grads))

  def _reduce(self, tree: PyTree) -> PyTree:
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

  def _reduce(self, tree: PyTree) -> PyTree:
    return lax.psum(tree, self.axes)

  def num_devices(self) -> int:
    return math.prod(lax.axis_size(a) for a in self.axes)

  def rng_salt(self) -> jax.Array | None:
    return lax.axis_index(axis_spec(self.axes)) if self.salted else None


@dataclasses.dataclass(frozen=True)
class DataAxis(Local):
  """A ``jax.jit`` step over a batch sharded along ``axes`` of a mesh.

  Picks the strategy of :mod:`jaxaccum._sharded` at trace time, from the
  mesh's axis types and the differentiated arguments' shardings: on Explicit
  data axes :class:`~jaxaccum._sharded.ExplicitData` (plain ``jit``), unless
  the loss or the options cannot take reduced parameters; otherwise
  :class:`~jaxaccum._sharded.ShardMapData`. The loop returns ``(outputs,
  scattered)``: the reduced results, and the per-example aux rows that stay
  sharded along ``axes`` like the batch.
  """

  axes: Axes = ()
  options: Any = None

  def run(self, loop: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    o = self.options
    mesh = resolve_mesh(self.axes, o.mesh)
    diff = tuple(args[i] for i in o.argnums)
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    explicit = all(types[a] == jax.sharding.AxisType.Explicit for a in self.axes)
    specs = _specs(o, diff, explicit)
    first_error = None
    if explicit and _compat.has_reduced_specs() and not (o.with_stats or o.skip_nonfinite):
      # Norms and finiteness checks of unreduced gradients are rejected, and
      # so is an elementwise op between a reduced parameter and a
      # data-sharded array (a bias add): such losses run under shard_map, as
      # everything does where this jax cannot defer a reduction this way.
      try:
        return loop(_sharded.ExplicitData(self.axes, o.fsdp_gather, specs, o.argnums_is_int),
                    args, kwargs)
      except Exception as e:  # noqa: BLE001 -- any rejection falls back
        first_error = e
    positions = {"argnums": o.argnums, "batch_argnums": o.batch_argnums,
                 "batch_argnames": o.batch_argnames}
    strategy = _sharded.ShardMapData(mesh, self.axes, o.fsdp_gather, specs,
                                     o.argnums_is_int, positions)
    try:
      return strategy.run(loop, args, kwargs)
    except Exception as e:
      if first_error is not None:
        e.add_note("With reduced parameters under plain jit (Explicit data axes) "
                   f"it failed first with: {type(first_error).__name__}: {first_error}")
      elif explicit and not _compat.has_reduced_specs():
        e.add_note("This jax cannot defer a reduction with reduced / unreduced "
                   "sharding (jax 0.8 on can), so the loss ran under shard_map, where "
                   "the data axes are Manual: a loss that names them needs a newer jax")
      raise


def _specs(options: Any, diff: tuple, explicit: bool) -> tuple:
  """Per differentiated argument, a pytree of PartitionSpecs matching it."""
  is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
  if explicit or options.param_specs is None:
    # On Auto axes a sharding is invisible inside jit: replicated over data.
    return jax.tree.map(_sharded.spec_of if explicit else (lambda _: PartitionSpec()), diff)
  given = (options.param_specs,) if options.argnums_is_int else tuple(options.param_specs)
  try:
    return tuple(jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), g, d,
                              is_leaf=is_spec) for g, d in zip(given, diff, strict=True))
  except ValueError as e:
    raise ValueError(
        f"param_specs={options.param_specs!r} must be a pytree prefix of the "
        f"differentiated arguments (argnums={options.argnums}) of structure "
        f"{jax.tree.structure(diff if not options.argnums_is_int else diff[0])}") from e


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
    return DataAxis(axes=options.data_axis, options=options)
  if options.axis_name:
    return Named(options.axis_name)
  return Local()


def salt_keys(keys: PyTree, axes: Axes) -> PyTree:
  """Folds the device's index along ``axes`` into every PRNG key of ``keys``."""
  try:
    salt = lax.axis_index(axis_spec(axes))
  except NameError:
    return keys  # plain jit on Explicit axes: the loss sees the global batch
  return jax.tree.map(lambda k: fold_in_device(k, salt), keys)
