"""``data_axis``: plain ``jit`` over sharded arrays, one gradient reduction per call.

:class:`DataAxis` picks one of two strategies at trace time (see
``docs/sharded.md``):

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

Both follow the loop's strategy protocol (:class:`jaxaccum._parallel.Strategy`).
With ``defer_reduction`` the gradients are not reduced at all: the
``shard_map`` returns each device's partial sums as a
:class:`jaxaccum.DeferredGrads` for ``multi_steps(data_axis=...)``.
``specs`` hold, per differentiated argument, a pytree of ``PartitionSpec``
matching it; ``grad_specs`` the same nested as the gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxaccum import _compat
from jaxaccum._deferred import DeferredGrads

PyTree = Any
Axes = tuple[Hashable, ...]


def axis_spec(axes: Axes) -> Hashable | Axes:
  """The PartitionSpec entry (and collective axis name) for ``axes``."""
  return axes if len(axes) > 1 else axes[0]


def is_spec(x: Any) -> bool:
  """Whether ``x`` is a ``PartitionSpec`` (a leaf of a specs pytree)."""
  return isinstance(x, P)


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


def _entry(names: tuple) -> Any:
  return None if not names else names[0] if len(names) == 1 else names


def sharded_over(spec: P, axes: Axes) -> frozenset:
  """The axes of ``axes`` that ``spec`` shards an array dimension over."""
  return frozenset(a for entry in spec for a in entry_axes(entry) if a in axes)


def without(spec: P, axes: Axes, ndim: int, **types) -> P:
  """``spec`` with ``axes`` removed from its dimensions, padded to ``ndim``;
  ``types`` (``reduced=`` / ``unreduced=``) replace its reduced / unreduced sets."""
  entries = [_entry(tuple(a for a in entry_axes(e) if a not in axes))
             for e in tuple(spec) + (None,) * (ndim - len(spec))]
  return P(*entries, **{k: frozenset(v) for k, v in types.items() if v})


def only(spec: P, axes: Axes) -> P:
  """``spec`` keeping only ``axes`` (the manual axes of a ``shard_map``)."""
  entries = [_entry(tuple(a for a in entry_axes(e) if a in axes)) for e in spec]
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def spec_of(x: Any) -> P:
  """The ``PartitionSpec`` in ``x``'s type (all ``None`` on Auto axes)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  return P() if spec is None else spec


def _map(fn: Callable[..., Any], tree: PyTree, specs: PyTree) -> PyTree:
  return jax.tree.map(lambda s, x: fn(x, s), specs, tree, is_leaf=is_spec)


@dataclasses.dataclass(frozen=True)
class DataAxis:
  """A ``jax.jit`` step over a batch sharded along ``axes`` of a mesh.

  Picks the strategy at trace time, from the mesh's axis types and the
  differentiated arguments' shardings: on Explicit data axes
  :class:`ExplicitData` (plain ``jit``), unless the loss or the options
  cannot take reduced parameters; otherwise :class:`ShardMapData`. Trying
  the first costs one more trace of the loss where it fails.
  """

  axes: Axes
  options: Any
  plan: Any

  def run(self, loop: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    o = self.options
    mesh = resolve_mesh(self.axes, o.mesh)
    diff = tuple(args[i] for i in o.argnums)
    explicit = explicit_axes(mesh, self.axes)
    specs = _specs(o, diff, explicit, mesh)
    first_error = None
    if explicit and _compat.has_reduced_specs() and not (
        o.with_stats or o.skip_nonfinite or o.defer_reduction):
      # Norms and finiteness checks of unreduced gradients are rejected, and
      # so is an elementwise op between a reduced parameter and a
      # data-sharded array (a bias add): such losses run under shard_map, as
      # everything does where this jax cannot defer a reduction this way.
      try:
        return loop(ExplicitData(self.axes, o.fsdp_gather, specs, o.argnums_is_int),
                    args, kwargs)
      except Exception as e:  # noqa: BLE001 -- any rejection falls back
        first_error = e
    positions = {"argnums": o.argnums, "batch_argnums": self.plan.positions,
                 "batch_argnames": self.plan.names, "in_axes": self.plan.axes,
                 "aux_reduction": o.aux_reduction}
    strategy = ShardMapData(mesh, self.axes, o.fsdp_gather, specs, o.argnums_is_int,
                            positions, o.defer_reduction)
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


def _specs(options: Any, diff: tuple, explicit: bool, mesh: Any) -> tuple:
  """Per differentiated argument, a pytree of PartitionSpecs matching it."""
  if explicit or options.param_specs is None:
    # On Auto axes a sharding is invisible inside jit: replicated over data.
    return jax.tree.map(spec_of if explicit else (lambda _: P()), diff)
  given = (options.param_specs,) if options.argnums_is_int else tuple(options.param_specs)
  try:
    specs = tuple(prefix_specs(g, d) for g, d in zip(given, diff, strict=True))
  except ValueError as e:
    raise ValueError(
        f"param_specs={options.param_specs!r} must be a pytree prefix of the "
        f"differentiated arguments (argnums={options.argnums}) of structure "
        f"{jax.tree.structure(diff if not options.argnums_is_int else diff[0])}") from e
  jax.tree.map(lambda s, x: _check_spec(s, x, mesh), specs, diff, is_leaf=is_spec)
  return specs


def _check_spec(spec: P, x: Any, mesh: Any) -> None:
  """A ``param_specs`` entry must fit its parameter and name the mesh's axes."""
  unknown = [a for entry in spec for a in entry_axes(entry) if a not in mesh.axis_names]
  if unknown:
    raise ValueError(
        f"param_specs entry {spec} names mesh axes {unknown} that the mesh does not "
        f"have (mesh axes: {mesh.axis_names}); use the mesh's axis names")
  if len(spec) > np.ndim(x):
    raise ValueError(
        f"param_specs entry {spec} has {len(spec)} entries for a parameter of shape "
        f"{np.shape(x)}; give at most one entry per dimension")


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


class _Strategy:
  """What both strategies share: the specs and the FSDP mode."""

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
    return jax.tree.map(_zeros, shapes)

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
               argnums_is_int: bool, positions: dict, defer: bool = False):
    specs = jax.tree.map(lambda s: only(s, axes), specs, is_leaf=is_spec)
    super().__init__(axes, fsdp_gather, specs, argnums_is_int)
    self.mesh = mesh
    self.positions = positions
    self.defer = defer

  def run(self, loop: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    batch = P(axis_spec(self.axes))
    in_specs = self._in_specs(args, kwargs)
    args, kwargs = _to_specs(self.mesh, self.axes, in_specs, (args, kwargs))
    # Per-example ("concat") aux rows stay sharded like the batch; the rest
    # is reduced, the same on every device.
    aux_specs = jax.tree.map(lambda kind: batch if kind == "concat" else P(),
                             self.positions["aux_reduction"])
    grad_specs = batch if self.defer else self.grad_specs
    kind = []  # the loop's output type, rebuilt from the tuple shard_map returns

    def body(args, kwargs):
      out = loop(self, args, kwargs)
      kind.append(type(out))
      return tuple(out)

    out = jax.shard_map(body, mesh=self.mesh, in_specs=in_specs,
                        out_specs=(P(), aux_specs, P(), grad_specs, P()),
                        axis_names=frozenset(self.axes))(args, kwargs)
    return kind[0](*out)

  def _in_specs(self, args: tuple, kwargs: dict) -> tuple:
    """Batch leaves sharded over the data axes along their batch axis,
    differentiated ones by their specs, the rest replicated over the data axes."""
    p = self.positions
    axes = dict(zip(tuple(p["batch_argnums"]) + tuple(p["batch_argnames"]), p["in_axes"]))

    def batch(key, tree):
      return jax.tree.map(lambda x: P(*[None] * (axes[key] % np.ndim(x)),
                                      axis_spec(self.axes)), tree)

    argnums = p["argnums"]
    return (tuple(batch(i, a) if i in axes else self.specs[argnums.index(i)]
                  if i in argnums else P() for i, a in enumerate(args)),
            {k: batch(k, v) if k in axes else P() for k, v in kwargs.items()})

  def _gather(self, x: jax.Array, spec: P) -> jax.Array:
    for dim, entry in enumerate(spec):
      for axis in reversed(entry_axes(entry)):
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
      for axis in entry_axes(entry):
        g = lax.psum_scatter(g, axis, scatter_dimension=dim, tiled=True)
    return g

  def gradients(self, grads: PyTree) -> PyTree:
    if self.per_microbatch:
      grads = _map(self._scatter, grads, self.grad_specs)
    return to_varying(grads, self.axes)

  def zeros(self, shapes: PyTree) -> PyTree:
    return to_varying(jax.tree.map(_zeros, shapes), self.axes)

  def reduce(self, others: PyTree, grads: PyTree) -> tuple[PyTree, PyTree]:
    """Scatter each gradient over the data axes it is sharded over (unless
    done per micro-batch), then one ``psum`` over the others for all leaves
    that share them; with ``defer``, only the rest is reduced."""
    if self.defer:
      return lax.psum(others, self.axes), grads
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
    return lax.axis_index(axis_spec(self.axes))

  def result(self, grads: PyTree) -> PyTree:
    """With ``defer``: this device's partial sums, a leading axis added for
    the devices (what ``out_specs`` stacks them along)."""
    if not self.defer:
      return grads
    return DeferredGrads(jax.tree.map(lambda g: g[None], grads), self.axes)


def _zeros(s: jax.ShapeDtypeStruct) -> jax.Array:
  """Zeros of type ``s``, in its sharding (Explicit axes are part of the type)."""
  sharding = getattr(s, "sharding", None)
  return jnp.zeros(s.shape, s.dtype,
                   out_sharding=None if sharding is None else sharding.spec)


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
    merged = [_entry(entry_axes(k) + entry_axes(s)) for k, s in
              zip(tuple(kept), tuple(spec) + (None,) * (np.ndim(x) - len(spec)))]
    return jax.sharding.reshard(x, to(P(*merged)))

  return jax.tree.map(lambda spec, sub: jax.tree.map(lambda x: one(spec, x), sub),
                      specs, tree, is_leaf=is_spec)


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
