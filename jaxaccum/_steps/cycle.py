"""``multi_steps(data_axis=...)``: one gradient reduction per cycle under ``jit``.

The accumulator has the form of :class:`jaxaccum.DeferredGrads`'s
``partials``: per parameter an array of shape ``(D, *param.shape)`` (``D``
devices along the data axes) sharded over the data axes on its leading
dimension, each device's running sum in its own row. Adding a call's partial
sums to it is elementwise between arrays of one sharding: no collective.
Ordinary (already reduced) gradients are added exactly too: each device puts
its block of the gradient at the block's position in its row, on one device
per block (a ``shard_map`` with no collective), so the rows still sum to the
cycle's total.

The cycle's last call reduces the rows in a ``shard_map`` manual over the data
axes and the other axes the parameters are sharded over (so tensor-parallel
dimensions are never gathered: each device reduces its own blocks): a
``psum_scatter`` over the data axes a parameter is sharded over
(FSDP: the sum lands in the parameter's shards), a ``psum`` over the others.
:mod:`jaxaccum._steps.multi_steps` calls this inside the ``lax.cond`` branch that
ends the cycle, whose operands are ordinary sharded arrays (never
``unreduced`` ones, which would make XLA reduce outside the conditional on
every call), and runs the inner optimizer there under ordinary sharding, on
the global gradient, so global norms stay global.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxaccum._devices.data_axis import DataAxis
from jaxaccum._devices import specs as _specs
from jaxaccum._devices.deferred import DeferredGrads

PyTree = Any
Axes = tuple[Hashable, ...]


class DataCycle:
  """The accumulator of one ``multi_steps(data_axis=...)``: its form, its
  placement and its one reduction a cycle.

  The mesh (``None``: the ambient mesh of ``jax.set_mesh``) and the
  parameter specs of ``data`` are read when ``init`` / ``update`` trace.
  """

  def __init__(self, data: DataAxis):
    self.data = data
    self.axes = data.axes

  def mesh(self) -> Any:
    """The mesh, checked to have the data axes."""
    return self.data.resolve_mesh("multi_steps")

  def devices(self) -> int:
    """The devices along the data axes."""
    return self.data.devices("multi_steps")

  def explicit(self, mesh: Any) -> bool:
    return self.data.explicit(mesh)

  def specs(self, tree: PyTree, mesh: Any) -> PyTree:
    """Per leaf of ``tree`` (parameters or gradients), its ``PartitionSpec``."""
    return self.data.specs(tree, mesh, self.data.param_specs)

  def partial_spec(self, spec: P, ndim: int) -> P:
    """The accumulator's spec for a parameter of ``spec``: data axes on a new
    leading dimension, the parameter's other axes kept."""
    return P(_specs.axis_spec(self.axes), *_specs.without(spec, self.axes, ndim))

  def place(self, x: jax.Array, mesh: Any, spec: P) -> jax.Array:
    """``x`` (inside or outside ``jit``) with sharding ``spec`` on ``mesh``."""
    if self.explicit(mesh):
      return jax.sharding.reshard(x, NamedSharding(mesh, spec))
    return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  def zeros(self, params: PyTree, dtype_of: Any) -> PyTree:
    """The empty accumulator for ``params``."""
    mesh = self.mesh()
    d = self.devices()
    return jax.tree.map(
        lambda p, s: self.place(jnp.zeros((d, *jnp.shape(p)), dtype_of(jnp.result_type(p))),
                                mesh, self.partial_spec(s, jnp.ndim(p))),
        params, self.specs(params, mesh))

  def partials(self, grads: Any, acc: PyTree) -> PyTree:
    """A call's gradients in the accumulator's form (no collective)."""
    if isinstance(grads, DeferredGrads):
      if tuple(grads.axes) != self.axes:
        raise ValueError(
            f"gradients deferred over axes {tuple(grads.axes)} given to "
            f"multi_steps(data_axis={_specs.axis_spec(self.axes)!r}); pass the same data_axis "
            "to value_and_grad and multi_steps")
      got = [jnp.shape(g) for g in jax.tree.leaves(grads.partials)]
      want = [a.shape for a in jax.tree.leaves(acc)]
      if got != want:
        raise ValueError(
            f"DeferredGrads of shapes {got} given to a multi_steps whose accumulator has "
            f"shapes {want} (one row per device along data_axis="
            f"{_specs.axis_spec(self.axes)!r}); use the same mesh for value_and_grad "
            "and multi_steps")
      return grads.partials
    mesh = self.mesh()
    specs = self.specs(grads, mesh)
    manual = self.manual(mesh, specs)
    specs = self._only(specs, manual)
    placed = jax.shard_map(lambda g: jax.tree.map(self._placed, g, specs), mesh=mesh,
                           in_specs=(specs,), out_specs=self._rows(grads, specs),
                           axis_names=manual)(grads)
    return jax.tree.map(lambda p, a: p.astype(a.dtype), placed, acc)

  def manual(self, mesh: Any, specs: PyTree) -> frozenset:
    """The axes the ``shard_map`` s are manual over: the data axes, and the
    others too, all the work being local to them: on Explicit axes all of
    them (a ``shard_map`` leaving an Explicit axis automatic gathers the
    arrays sharded over it), on Auto axes those ``specs`` name (XLA gathers
    the operand of a collective over the automatic axes)."""
    if not self.explicit(mesh):
      named = {a for s in jax.tree.leaves(specs, is_leaf=_specs.is_spec)
               for e in s for a in _specs.entry_axes(e)}
      return frozenset(self.axes) | named
    return frozenset(self.axes) | frozenset(_specs.explicit_names(mesh))

  def _only(self, specs: PyTree, manual: frozenset) -> PyTree:
    return jax.tree.map(lambda s: _specs.only(s, tuple(manual)), specs, is_leaf=_specs.is_spec)

  def _rows(self, tree: PyTree, specs: PyTree) -> PyTree:
    """The accumulator's specs over the manual axes, for ``tree``'s leaves of ``specs``."""
    return jax.tree.map(lambda x, s: self.partial_spec(s, jnp.ndim(x)), tree, specs)

  def _placed(self, block: jax.Array, spec: P) -> jax.Array:
    """This device's block of a reduced gradient at its place in a zero row,
    on one device per block (index 0 along the data axes it is not split over)."""
    entries = tuple(spec) + (None,) * (block.ndim - len(spec))
    full, offsets = [], []
    for n, names in zip(block.shape, map(self._data_names, entries)):
      full.append(n * math.prod(lax.axis_size(a) for a in names))
      offsets.append(lax.axis_index(_specs.axis_spec(names)) * n if names
                     else jnp.zeros([], jnp.int32))
    row = lax.dynamic_update_slice(jnp.zeros(full, block.dtype), block, offsets)
    for a in self.axes:
      if a not in _specs.sharded_over(spec, self.axes):
        row = jnp.where(lax.axis_index(a) == 0, row, jnp.zeros_like(row))
    return _specs.to_varying(row, self.axes)[None]

  def reduce(self, acc: PyTree, params: PyTree | None) -> PyTree:
    """The sum of the rows, in the parameters' sharding over the data axes
    (replicated over them where it is not known: no ``params`` on Explicit
    axes, no ``param_specs`` on Auto axes)."""
    mesh = self.mesh()
    if params is None and self.explicit(mesh):
      # The parameters' non-data sharding is the accumulator's.
      specs = jax.tree.map(lambda a: P(*_specs.spec_of(a)[1:]), acc)
    else:
      specs = self.specs(acc if params is None else params, mesh)
    manual = self.manual(mesh, specs)
    specs = self._only(specs, manual)
    in_specs = jax.tree.map(lambda a, s: self.partial_spec(s, a.ndim - 1), acc, specs)

    def body(acc):
      return jax.tree.map(lambda a, s: self._reduce_rows(a[0], s), acc, specs)

    return jax.shard_map(body, mesh=mesh, in_specs=(in_specs,), out_specs=specs,
                         axis_names=manual)(acc)

  def _data_names(self, entry: Any) -> tuple:
    return tuple(a for a in _specs.entry_axes(entry) if a in self.axes)

  def _reduce_rows(self, row: jax.Array, spec: P) -> jax.Array:
    for dim, entry in enumerate(spec):
      for axis in self._data_names(entry):
        row = lax.psum_scatter(row, axis, scatter_dimension=dim, tiled=True)
    rest = tuple(a for a in self.axes if a not in _specs.sharded_over(spec, self.axes))
    return lax.psum(row, rest) if rest else row
