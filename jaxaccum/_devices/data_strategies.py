"""``data_axis``: plain ``jit`` over sharded arrays, one gradient reduction per call.

The two strategies :class:`~jaxaccum._devices.data_axis.DataStrategy` picks
from at trace time (see ``docs/sharded.md``):

- :class:`ExplicitData` (Explicit data axes): plain ``jit``. Parameters are
  cast to ``reduced`` over the data axes, so each micro-batch's gradient is
  ``unreduced`` (a per-device partial sum); the loop carry stays unreduced and
  one ``reshard`` into the parameters' sharding after the loop is the
  reduction. The loss sees no manual axis.
- :class:`ShardMapData`: a ``shard_map`` manual over the data axes only;
  gradients of device-varying parameters stay local and one ``psum``
  (``psum_scatter`` for a parameter sharded over a data axis) follows the
  loop. Other mesh axes are not manual, and nothing is gathered along them:
  Explicit ones cross the ``shard_map`` boundary as Auto axes and are
  Explicit again for the loss, and a collective over the data axes of a
  parameter also sharded over other axes runs manual over those too.

A parameter sharded over a data axis (FSDP) is gathered for the loss either
once before the loop (``fsdp_gather="once"``) or in every micro-batch, its
gradient then reduce-scattered in every micro-batch into a sharded carry
(``"per_microbatch"``). With several data axes (HSDP: replica x shard) only
the axes a parameter is sharded over are reduced per micro-batch; the others
are reduced once after the loop.

Both follow the loop's strategy protocol (:class:`jaxaccum._devices.parallel.Strategy`).
With ``defer_reduction`` the gradients are not reduced at all: the
``shard_map`` returns each device's partial sums as a
:class:`jaxaccum.DeferredGrads` for ``multi_steps(data_axis=...)``.
``specs`` hold, per differentiated argument, a pytree of ``PartitionSpec``
matching it; ``grad_specs`` the same nested as the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxaccum import _compat
from jaxaccum._devices.deferred import DeferredGrads
from jaxaccum._devices.specs import (Axes, PyTree, axis_spec, entry_axes, entry_of,
                                     explicit_names, is_spec, map_specs, only, prefix_specs,
                                     sharded_over, spec_of, to_varying, without, zeros_of_type)

class BatchLayout(NamedTuple):
  """Where one call's arguments are, as the ``shard_map`` specs need them.

  Attributes:
    argnums: the differentiated positional arguments.
    positions: the positional arguments that hold the batch.
    names: the keyword arguments that hold the batch.
    axes: the batch axis of each, ``positions`` then ``names``.
    aux_reduction: the aux reduction (a name or a pytree of them).
  """

  argnums: tuple[int, ...]
  positions: tuple[int, ...]
  names: tuple[str, ...]
  axes: tuple[int, ...]
  aux_reduction: Any


class _Strategy:
  """What both strategies share: the specs and the FSDP mode."""

  manual = False

  def __init__(self, axes: Axes, fsdp_gather: str, specs: tuple, argnums_is_int: bool):
    self.axes = axes
    self.per_microbatch = fsdp_gather == "per_microbatch"
    self.specs = specs
    self.grad_specs = specs[0] if argnums_is_int else specs

  def result(self, grads: PyTree) -> PyTree:
    return grads

  def microbatch(self, diff: tuple, micro: PyTree) -> tuple:
    """The differentiated arguments one micro-batch sees: gathered here in
    ``"per_microbatch"`` mode."""
    if not self.per_microbatch:
      return diff
    # The barrier ties the gather to the micro-batch: XLA would hoist a gather
    # of loop-invariant parameters out of the loop (and keep them gathered).
    diff, _ = lax.optimization_barrier((diff, micro))
    return map_specs(self._gather, diff, self.specs)


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
    return map_specs(cast, diff, self.specs)

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
    return map_specs(scatter, grads, self.grad_specs)

  def zeros(self, shapes: PyTree) -> PyTree:
    """Zeros of the carry's types (unreduced where the gradients are)."""
    return jax.tree.map(zeros_of_type, shapes)

  def reduce(self, others: PyTree, grads: PyTree) -> tuple[PyTree, PyTree]:
    """The one reduction: a reshard into the parameters' sharding. The loss
    reduced its value (and aux, states) itself: they are global already."""
    return others, map_specs(lambda g, s: jax.sharding.reshard(g, without(s, (), g.ndim)),
                        grads, self.grad_specs)

  def num_devices(self) -> int:
    return 1  # the sums are over the global micro-batch already

  def rng_salt(self) -> None:
    return None  # the loss sees the global batch, as on one device


class ShardMapData(_Strategy):
  """A ``shard_map`` manual over the data axes; other axes are not manual.

  ``specs`` are the parameters' whole specs; the ``shard_map``'s in and out
  specs keep only their data axes (``P("data", None)`` for FSDP, ``P()``
  for replicated), and the batch arguments are sharded over all data axes.
  """

  manual = True

  def __init__(self, mesh, axes: Axes, fsdp_gather: str, specs: tuple,
               argnums_is_int: bool, batch: BatchLayout, defer: bool = False):
    super().__init__(axes, fsdp_gather, specs, argnums_is_int)
    self.mesh = mesh
    self.batch = batch
    self.defer = defer

  def run(self, loop: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    batch = P(axis_spec(self.axes))
    in_specs = self._in_specs(args, kwargs)
    (args, kwargs), merge = _arrays_only((args, kwargs))
    args, kwargs = _to_specs(self.mesh, self.axes, in_specs, (args, kwargs))
    # Per-example ("concat") aux rows stay sharded like the batch; the rest
    # is reduced, the same on every device.
    aux_specs = jax.tree.map(lambda kind: batch if kind == "concat" else P(),
                             self.batch.aux_reduction)
    grad_specs = batch if self.defer else self._data_only(self.grad_specs)
    out_specs = (P(), aux_specs, P(), grad_specs, P())
    kind = []  # the loop's output type, rebuilt from the tuple shard_map returns

    def body(args, kwargs):
      out = loop(self, *merge((args, kwargs)))
      kind.append(type(out))
      return tuple(out)

    others = _explicit_others(self.mesh, self.axes)
    if others and _compat.use_abstract_mesh is not None:
      out = _others_kept(self.mesh, self.axes, others, body, in_specs, out_specs,
                         (args, kwargs))
    else:
      out = jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                          axis_names=frozenset(self.axes))(args, kwargs)
    return kind[0](*out)

  def _data_only(self, specs: PyTree) -> PyTree:
    return jax.tree.map(lambda s: only(s, self.axes), specs, is_leaf=is_spec)

  def _in_specs(self, args: tuple, kwargs: dict) -> tuple:
    """Batch leaves sharded over the data axes along their batch axis,
    differentiated ones by their specs, the rest replicated over the data axes."""
    layout = self.batch
    axes = dict(zip(layout.positions + layout.names, layout.axes))

    def batch(key, tree):
      return jax.tree.map(lambda x: P(*[None] * (axes[key] % np.ndim(x)),
                                      axis_spec(self.axes)), tree)

    argnums = layout.argnums
    return (tuple(batch(i, a) if i in axes else self._data_only(self.specs[argnums.index(i)])
                  if i in argnums else P() for i, a in enumerate(args)),
            {k: batch(k, v) if k in axes else P() for k, v in kwargs.items()})

  def _local(self, collective: Callable[[jax.Array], jax.Array], x: jax.Array,
             spec: P) -> jax.Array:
    """``collective(x)`` (over data axes), manual over the other axes ``spec``
    names too: in a partly manual computation XLA all-gathers a collective's
    operand over the automatic axes, and jax (0.8 to 0.10.2) cannot lower a
    ``psum_scatter`` of an array sharded over an Explicit one: the collective
    must see local blocks only."""
    if not sharded_over(spec, self.axes):
      return x
    other = frozenset(a for entry in spec for a in entry_axes(entry)) - set(self.axes)
    if not other:
      return collective(x)
    blocks = without(spec, self.axes, x.ndim)
    return jax.shard_map(collective, in_specs=blocks, out_specs=blocks, axis_names=other)(x)

  def _gather(self, x: jax.Array, spec: P) -> jax.Array:
    def gather(x):
      for dim, entry in enumerate(spec):
        for axis in reversed(entry_axes(entry)):
          if axis in self.axes:
            x = lax.all_gather(x, axis, axis=dim, tiled=True)
      return x
    return to_varying(self._local(gather, x, spec), self.axes)

  def prepare(self, diff: tuple) -> tuple:
    if self.per_microbatch:
      return to_varying(diff, self.axes)
    return map_specs(self._gather, diff, self.specs)

  def carry(self, tree: PyTree) -> PyTree:
    return to_varying(tree, self.axes)

  def _scatter(self, g: jax.Array, spec: P) -> jax.Array:
    def scatter(g):
      for dim, entry in enumerate(spec):
        for axis in entry_axes(entry):
          if axis in self.axes:
            g = lax.psum_scatter(g, axis, scatter_dimension=dim, tiled=True)
      return g
    return self._local(scatter, g, spec)

  def gradients(self, grads: PyTree) -> PyTree:
    if self.per_microbatch:
      grads = map_specs(self._scatter, grads, self.grad_specs)
    return to_varying(grads, self.axes)

  def zeros(self, shapes: PyTree) -> PyTree:
    return to_varying(jax.tree.map(zeros_of_type, shapes), self.axes)

  def reduce(self, others: PyTree, grads: PyTree) -> tuple[PyTree, PyTree]:
    """Scatter each gradient over the data axes it is sharded over (unless
    done per micro-batch), then one ``psum`` over the others for all leaves
    that share them; with ``defer``, only the rest is reduced."""
    if self.defer:
      return lax.psum(others, self.axes), grads
    if not self.per_microbatch:
      grads = map_specs(self._scatter, grads, self.grad_specs)
    rest = map_specs(
        lambda g, s: tuple(a for a in self.axes if a not in sharded_over(s, self.axes)),
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
    return lax.axis_index(axis_spec(self.axes))

  def result(self, grads: PyTree) -> PyTree:
    """With ``defer``: this device's partial sums, a leading axis added for
    the devices (what ``out_specs`` stacks them along)."""
    if not self.defer:
      return grads
    return DeferredGrads(jax.tree.map(lambda g: g[None], grads), self.axes)


def _explicit_others(mesh: Any, axes: Axes) -> tuple:
  """The Explicit axes of ``mesh`` other than ``axes``."""
  return tuple(a for a in explicit_names(mesh) if a not in axes)


def _merged(outer: P, inner: P, ndim: int) -> P:
  """Per dimension, the axes of ``inner`` (not manual) then those of ``outer``."""
  pad = lambda spec: tuple(spec) + (None,) * (ndim - len(spec))  # noqa: E731
  return P(*[entry_of(entry_axes(i) + entry_axes(o)) for o, i in zip(pad(outer), pad(inner))])


def _others_kept(mesh: Any, axes: Axes, others: tuple, body: Callable[..., Any],
                 in_specs: PyTree, out_specs: PyTree, tree: tuple) -> Any:
  """``shard_map(body)`` manual over ``axes``, the Explicit axes ``others``
  kept as the arguments and outputs are sharded over them.

  jax 0.10.1 and 0.10.2's ``shard_map`` take an Explicit axis it leaves automatic as
  replicated at its boundary (it all-gathers every array sharded over it, in
  and out), where an Auto axis is left open. So the boundary sees ``others``
  as Auto axes, and ``body`` runs with them Explicit again, each argument in
  its own sharding over them: the loss sees the types it sees outside.
  """
  kept = jax.tree.map(lambda x: without(spec_of(x), axes, np.ndim(x)), tree)
  inner = []  # the outputs' specs over ``others``, read where they are Explicit

  def explicit_body(*tree):
    def typed(*tree):
      out = body(*tree)
      inner.append(jax.tree.map(spec_of, out))
      return out
    return jax.sharding.explicit_axes(typed, axes=others, in_sharding=kept)(*tree)

  # Under the mesh (given as mesh=, maybe without jax.set_mesh), specs name its axes.
  abstract = getattr(mesh, "abstract_mesh", mesh)
  auto = abstract.update_axis_types({a: jax.sharding.AxisType.Auto for a in others})
  with _compat.use_abstract_mesh(abstract):
    with _compat.use_abstract_mesh(auto):
      tree = jax.tree.map(lambda x: jax.sharding.reshard(x, only(spec_of(x), axes)), tree)
      out = jax.shard_map(explicit_body, in_specs=in_specs, out_specs=out_specs,
                          axis_names=frozenset(axes))(*tree)
    outer = prefix_specs(out_specs, out)
    return jax.tree.map(lambda o, i, x: jax.sharding.reshard(x, _merged(o, i, np.ndim(x))),
                        outer, inner[0], out, is_leaf=is_spec)


def _to_specs(mesh, axes: Axes, specs: PyTree, tree: PyTree) -> PyTree:
  """On Explicit data axes, reshards each argument whose data-axis sharding
  differs from its ``shard_map`` input spec (keeping its other axes)."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if not any(types[a] == jax.sharding.AxisType.Explicit for a in axes):
    return tree
  to = ((lambda spec: NamedSharding(mesh, spec))
        if isinstance(mesh, jax.sharding.Mesh) else (lambda spec: spec))

  def one(x, spec):
    have = spec_of(x)
    if only(have, axes) == spec:
      return x
    return jax.sharding.reshard(x, to(_merged(spec, without(have, axes, np.ndim(x)),
                                              np.ndim(x))))

  return map_specs(one, tree, prefix_specs(specs, tree))


def _arrays_only(tree: PyTree) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
  """``tree`` with its non-array leaves (a string keyword, a Python bool the
  loss branches on) left out, and the function that puts them back: they are
  closed over, as ``jit`` keeps them static, not made traced inputs of the
  ``shard_map``."""
  leaves, treedef = jax.tree.flatten(tree)
  static = {i: x for i, x in enumerate(leaves)
            if not isinstance(x, (jax.Array, np.ndarray, np.generic))}

  def merge(arrays: PyTree) -> PyTree:
    flat = treedef.flatten_up_to(arrays)
    return treedef.unflatten([static.get(i, x) for i, x in enumerate(flat)])

  return treedef.unflatten([None if i in static else x for i, x in enumerate(leaves)]), merge
