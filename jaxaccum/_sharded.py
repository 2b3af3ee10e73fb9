"""Data parallelism over sharded parameters: one gradient reduction per call.

Two strategies for ``data_axis``, chosen by :class:`jaxaccum._parallel.DataAxis`
(see ``docs/sharded.md``):

- :class:`ExplicitData` (Explicit data axes): plain ``jit``. Parameters are
  cast to ``reduced`` over the data axes, so each micro-batch's gradient is
  ``unreduced`` (a per-device partial sum); the loop carry stays unreduced and
  one ``reshard`` into the parameters' sharding after the loop is the
  reduction. The loss sees no manual axis.
- :class:`ShardMapData`: a ``shard_map`` manual over the data axes only;
  gradients of device-varying parameters stay local and one ``psum``
  (``psum_scatter`` for a parameter sharded over a data axis) follows the
  loop. Other mesh axes stay automatic, so nothing is gathered along them.

A parameter sharded over a data axis (FSDP) is gathered for the loss either
once before the loop (``fsdp_gather="once"``) or in every micro-batch, its
gradient then reduce-scattered in every micro-batch into a sharded carry
(``"per_microbatch"``). With several data axes (HSDP: replica x shard) only
the axes a parameter is sharded over are reduced per micro-batch; the others
are reduced once after the loop.

Both follow the loop's strategy protocol (:class:`jaxaccum._parallel.Local`).
``specs`` hold, per differentiated argument, a pytree of ``PartitionSpec``
matching it; ``grad_specs`` the same nested as the gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

PyTree = Any
Axes = tuple[Hashable, ...]
FSDP_GATHER = ("once", "per_microbatch")


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def _names(entry) -> tuple:
  """Mesh axis names of one entry of a ``PartitionSpec``."""
  if entry is None or entry is P.UNCONSTRAINED:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entry(names: tuple) -> Any:
  return None if not names else names[0] if len(names) == 1 else names


def sharded_over(spec: P, axes: Axes) -> frozenset:
  """The axes of ``axes`` that ``spec`` shards an array dimension over."""
  return frozenset(a for entry in spec for a in _names(entry) if a in axes)


def without(spec: P, axes: Axes, ndim: int, **types) -> P:
  """``spec`` with ``axes`` removed from its dimensions, padded to ``ndim``;
  ``types`` (``reduced=`` / ``unreduced=``) replace its reduced / unreduced sets."""
  entries = [_entry(tuple(a for a in _names(e) if a not in axes))
             for e in tuple(spec) + (None,) * (ndim - len(spec))]
  return P(*entries, **{k: frozenset(v) for k, v in types.items() if v})


def only(spec: P, axes: Axes) -> P:
  """``spec`` keeping only ``axes`` (the manual axes of a ``shard_map``)."""
  entries = [_entry(tuple(a for a in _names(e) if a in axes)) for e in spec]
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def spec_of(x: Any) -> P:
  """The ``PartitionSpec`` in ``x``'s type (all ``None`` on Auto axes)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  return P() if spec is None else spec


def _map(fn: Callable[..., Any], tree: PyTree, specs: PyTree) -> PyTree:
  return jax.tree.map(lambda s, x: fn(x, s), specs, tree, is_leaf=_is_spec)


class _Strategy:
  """What both strategies share: the specs and the FSDP mode."""

  def __init__(self, axes: Axes, fsdp_gather: str, specs: tuple, argnums_is_int: bool):
    self.axes = axes
    self.per_microbatch = fsdp_gather == "per_microbatch"
    self.specs = specs
    self.grad_specs = specs[0] if argnums_is_int else specs

  def microbatch(self, diff: tuple, micro: PyTree) -> tuple:
    """The differentiated arguments one micro-batch sees: gathered here in
    ``"per_microbatch"`` mode."""
    if not self.per_microbatch:
      return diff
    # The barrier ties the gather to the micro-batch: XLA would hoist a gather
    # of loop-invariant parameters out of the loop (and keep them gathered).
    diff, _ = lax.optimization_barrier((diff, micro))
    return _map(self._gather, diff, self.specs)


class ExplicitData(_Strategy):
  """Plain ``jit`` over Explicit data axes, with reduced / unreduced types.

  The reduction after the loop is a ``reshard``: an all-reduce, or for a leaf
  sharded over a data axis an all-reduce + slice on XLA:CPU (a reduce-scatter
  where the backend forms one).
  """

  def run(self, loop: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return loop(self, args, kwargs)

  def _gather(self, x: jax.Array, spec: P) -> jax.Array:
    return jax.sharding.reshard(x, without(spec, self.axes, x.ndim, reduced=self.axes))

  def prepare(self, diff: tuple) -> tuple:
    """Reduced over the data axes: gathered now unless gathered per micro-batch."""
    def cast(x, spec):
      if not self.per_microbatch:
        return self._gather(x, spec)
      rest = set(self.axes) - sharded_over(spec, self.axes)
      return jax.sharding.reshard(x, P(*spec, reduced=rest)) if rest else x
    return _map(cast, diff, self.specs)

  def carry(self, tree: PyTree) -> PyTree:
    return tree

  def gradients(self, grads: PyTree) -> PyTree:
    """In ``"per_microbatch"`` mode: reduced into the parameters' sharding
    over the data axes they are sharded over."""
    if not self.per_microbatch:
      return grads
    def scatter(g, spec):
      rest = set(self.axes) - sharded_over(spec, self.axes)
      return jax.sharding.reshard(g, P(*spec, unreduced=rest))
    return _map(scatter, grads, self.grad_specs)

  def zeros(self, shapes: PyTree) -> PyTree:
    """Zeros of the carry's types (unreduced where the gradients are)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, out_sharding=(
        s.sharding.spec if s.sharding is not None else None)), shapes)

  def reduce(self, others: PyTree, grads: PyTree) -> tuple[PyTree, PyTree]:
    """The one reduction: a reshard into the parameters' sharding. The loss
    reduced its value (and aux, states) itself: they are global already."""
    return others, _map(lambda g, s: jax.sharding.reshard(g, without(s, (), g.ndim)),
                        grads, self.grad_specs)

  def num_devices(self) -> int:
    return 1  # the sums are over the global micro-batch already

  def rng_salt(self) -> None:
    return None  # the loss sees the global batch, as on one device


class ShardMapData(_Strategy):
  """A ``shard_map`` manual over the data axes; other axes stay automatic.

  ``specs`` keep only the data axes (``P("data", None)`` for FSDP, ``P()``
  for replicated); the batch arguments are sharded over all data axes.
  """

  def __init__(self, mesh, axes: Axes, fsdp_gather: str, specs: tuple,
               argnums_is_int: bool, positions: dict):
    specs = jax.tree.map(lambda s: only(s, axes), specs, is_leaf=_is_spec)
    super().__init__(axes, fsdp_gather, specs, argnums_is_int)
    self.mesh = mesh
    self.positions = positions

  def run(self, loop: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    batch = P(self.axes if len(self.axes) > 1 else self.axes[0])
    argnums, batch_argnums, batch_argnames = (self.positions[k] for k in (
        "argnums", "batch_argnums", "batch_argnames"))
    in_specs = (tuple(batch if i in batch_argnums else self.specs[argnums.index(i)]
                      if i in argnums else P() for i in range(len(args))),
                {k: batch if k in batch_argnames else P() for k in kwargs})
    args, kwargs = _to_specs(self.mesh, self.axes, in_specs, (args, kwargs))
    kind = []

    def body(args, kwargs):
      out, scattered = loop(self, args, kwargs)
      kind.append(type(out))
      return tuple(out), scattered

    out_specs = ((P(), P(), P(), self.grad_specs, P()), batch)
    out, scattered = jax.shard_map(body, mesh=self.mesh, in_specs=in_specs,
                                   out_specs=out_specs,
                                   axis_names=frozenset(self.axes))(args, kwargs)
    return kind[0](*out), scattered

  def _gather(self, x: jax.Array, spec: P) -> jax.Array:
    for dim, entry in enumerate(spec):
      for axis in reversed(_names(entry)):
        x = lax.all_gather(x, axis, axis=dim, tiled=True)
    return to_varying(x, self.axes)

  def prepare(self, diff: tuple) -> tuple:
    if self.per_microbatch:
      return to_varying(diff, self.axes)
    return _map(self._gather, diff, self.specs)

  def carry(self, tree: PyTree) -> PyTree:
    return to_varying(tree, self.axes)

  def _scatter(self, g: jax.Array, spec: P) -> jax.Array:
    for dim, entry in enumerate(spec):
      for axis in _names(entry):
        g = lax.psum_scatter(g, axis, scatter_dimension=dim, tiled=True)
    return g

  def gradients(self, grads: PyTree) -> PyTree:
    if self.per_microbatch:
      grads = _map(self._scatter, grads, self.grad_specs)
    return to_varying(grads, self.axes)

  def zeros(self, shapes: PyTree) -> PyTree:
    return to_varying(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), self.axes)

  def reduce(self, others: PyTree, grads: PyTree) -> tuple[PyTree, PyTree]:
    """Scatter each gradient over the data axes it is sharded over (unless
    done per micro-batch), then one ``psum`` over the others for all leaves
    that share them."""
    if not self.per_microbatch:
      grads = _map(self._scatter, grads, self.grad_specs)
    rest = _map(lambda g, s: tuple(a for a in self.axes if a not in sharded_over(s, self.axes)),
                grads, self.grad_specs)
    flat, treedef = jax.tree.flatten(grads)
    rests = treedef.flatten_up_to(rest)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rests):
      groups.setdefault(r, []).append(i)
    everything = groups.pop(self.axes, [])
    others, summed = lax.psum((others, [flat[i] for i in everything]), self.axes)
    for i, g in zip(everything, summed):
      flat[i] = g
    for r, idx in groups.items():
      for i, g in zip(idx, lax.psum([flat[i] for i in idx], r) if r else [flat[i] for i in idx]):
        flat[i] = g
    return others, treedef.unflatten(flat)

  def num_devices(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in self.axes]))

  def rng_salt(self) -> jax.Array:
    return lax.axis_index(self.axes if len(self.axes) > 1 else self.axes[0])


def _to_specs(mesh, axes: Axes, specs: PyTree, tree: PyTree) -> PyTree:
  """On Explicit data axes, reshards each argument whose data-axis sharding
  differs from its ``shard_map`` input spec (keeping its other axes)."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if not any(types[a] == jax.sharding.AxisType.Explicit for a in axes):
    return tree
  to = ((lambda spec: NamedSharding(mesh, spec))
        if isinstance(mesh, jax.sharding.Mesh) else (lambda spec: spec))

  def one(spec, x):
    have = spec_of(x)
    if only(have, axes) == spec:
      return x
    kept = without(have, axes, np.ndim(x))
    merged = [_entry(_names(k) + _names(s)) for k, s in
              zip(tuple(kept), tuple(spec) + (None,) * (np.ndim(x) - len(spec)))]
    return jax.sharding.reshard(x, to(P(*merged)))

  return jax.tree.map(lambda spec, sub: jax.tree.map(lambda x: one(spec, x), sub),
                      specs, tree, is_leaf=_is_spec)


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
