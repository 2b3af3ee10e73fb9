"""Data parallelism over sharded parameters: one gradient reduction per call.

Two strategies, chosen by the type of the data axes (see ``docs/sharded.md``):

- :class:`ExplicitData` (Explicit axes): plain ``jit``. Parameters are cast to
  ``reduced`` over the data axes, so each micro-batch's gradient is
  ``unreduced`` (a per-device partial sum); the loop carry stays unreduced and
  one ``reshard`` into the parameters' sharding after the loop is the
  reduction. The loss sees no manual axis.
- :class:`ShardMapData` (Auto axes): a ``shard_map`` manual over the data axes
  only; gradients of device-varying parameters stay local and one ``psum``
  (``psum_scatter`` for a parameter sharded over a data axis) follows the
  loop. Other mesh axes stay automatic, so nothing is gathered along them.

A parameter sharded over a data axis (FSDP) is gathered for the loss either
once before the loop (``fsdp_gather="once"``) or in every micro-batch, its
gradient then reduce-scattered in every micro-batch into a sharded carry
(``"per_microbatch"``). With several data axes (HSDP: replica x shard) only
the axes a parameter is sharded over are reduced per micro-batch; the others
are reduced once after the loop.

Both strategies offer, besides the loop's ``Parallel`` protocol, ``microbatch``
(the differentiated arguments as one micro-batch's loss sees them) and
``zeros`` (the carry's zeros for the gradient sums).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

PyTree = Any
FSDP_GATHER = ("once", "per_microbatch")


def _names(entry) -> tuple:
  """Mesh axis names of one entry of a ``PartitionSpec``."""
  if entry is None or entry is P.UNCONSTRAINED:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def sharded_over(spec: P, axes: tuple[Hashable, ...]) -> frozenset:
  """The axes of ``axes`` that ``spec`` shards an array dimension over."""
  return frozenset(a for entry in spec for a in _names(entry) if a in axes)


def without(spec: P, axes: tuple[Hashable, ...], ndim: int, **types) -> P:
  """``spec`` with ``axes`` removed from its dimensions, padded to ``ndim``."""
  entries = []
  for entry in tuple(spec) + (None,) * (ndim - len(spec)):
    kept = tuple(a for a in _names(entry) if a not in axes)
    entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return P(*entries, **{k: frozenset(v) for k, v in types.items() if v})


def spec_of(x: jax.Array) -> P:
  """The ``PartitionSpec`` in ``x``'s type (all ``None`` on Auto axes)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  return P() if spec is None else spec


class ExplicitData:
  """Plain ``jit`` over Explicit data axes, with reduced / unreduced types.

  ``specs`` are the differentiated leaves' partition specs (from their types).
  The reduction after the loop is a ``reshard``: an all-reduce, or for a leaf
  sharded over a data axis an all-reduce + slice on XLA:CPU (a reduce-scatter
  where the backend forms one).
  """

  def __init__(self, axes: tuple[Hashable, ...], fsdp_gather: str, specs: PyTree):
    self.axes = axes
    self.per_microbatch = fsdp_gather == "per_microbatch"
    self.specs = specs

  def run(self, loop: Callable[[tuple, dict], Any], args: tuple, kwargs: dict):
    return loop(args, kwargs)

  def _leaf(self, fn: Callable[..., Any], tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x, s: fn(x, s, sharded_over(s, self.axes)), tree, self.specs)

  def prepare(self, diff_args: tuple) -> tuple:
    """Reduced over the data axes: gathered now unless gathered per micro-batch."""
    def cast(x, spec, sharded):
      if self.per_microbatch:
        rest = set(self.axes) - sharded
        return jax.sharding.reshard(x, P(*spec, reduced=rest)) if rest else x
      return jax.sharding.reshard(x, without(spec, self.axes, x.ndim, reduced=self.axes))
    return self._leaf(cast, diff_args)

  def microbatch(self, diff_args: tuple, micro: PyTree) -> tuple:
    """The arguments one micro-batch differentiates: gathered here per micro-batch."""
    if not self.per_microbatch:
      return diff_args
    # The barrier ties the gather to the micro-batch: XLA would hoist a gather
    # of loop-invariant parameters out of the loop (and keep them gathered).
    diff_args, _ = lax.optimization_barrier((diff_args, micro))
    return self._leaf(lambda x, s, _: jax.sharding.reshard(
        x, without(s, self.axes, x.ndim, reduced=self.axes)), diff_args)

  def _carry_spec(self, x, spec, sharded) -> P:
    if self.per_microbatch:
      return P(*spec, unreduced=set(self.axes) - sharded)
    return without(spec, self.axes, x.ndim, unreduced=self.axes)

  def carry(self, grads: PyTree) -> PyTree:
    """A micro-batch's gradients as the carry holds them (reduce-scattered per micro-batch)."""
    if not self.per_microbatch:
      return grads
    return self._leaf(lambda g, s, sh: jax.sharding.reshard(g, self._carry_spec(g, s, sh)), grads)

  def zeros(self, grads_like: PyTree, dtype_of: Callable[[Any], Any]) -> PyTree:
    return self._leaf(lambda g, s, sh: jnp.zeros(
        g.shape, dtype_of(g.dtype), out_sharding=self._carry_spec(g, s, sh)), grads_like)

  def reduce(self, grad_sums: PyTree) -> PyTree:
    """The one reduction: reshard into the parameters' sharding."""
    return self._leaf(lambda g, s, _: jax.sharding.reshard(g, without(s, (), g.ndim)), grad_sums)

  def reduce_other(self, tree: PyTree) -> PyTree:
    return tree  # the loss reduced its value itself: it is replicated

  def num_devices(self) -> int:
    return 1  # the sums are over the global micro-batch already

  def rng_salt(self) -> None:
    return None  # the loss sees the global batch, as on one device


class ShardMapData:
  """A ``shard_map`` manual over the data axes; other axes stay automatic.

  ``specs`` give, per differentiated leaf, the data axes its dimensions are
  sharded over (``P("data", None)`` for FSDP, ``P()`` for replicated).
  """

  def __init__(self, mesh, axes: tuple[Hashable, ...], fsdp_gather: str, specs: PyTree):
    self.mesh = mesh
    self.axes = axes
    self.per_microbatch = fsdp_gather == "per_microbatch"
    self.specs = jax.tree.map(lambda s: _only(s, axes), specs)

  def run(self, loop, args: tuple, kwargs: dict, *, batch_argnums: tuple[int, ...],
          diff_argnums: tuple[int, ...],
          result_specs: Callable[[PyTree], Any] = lambda grad_specs: (P(), grad_specs)):
    batch_spec = P(self.axes if len(self.axes) > 1 else self.axes[0])
    # ``self.specs`` matches the differentiated arguments as ``argnums`` gives
    # them: the argument itself for one position, a tuple for several.
    per_arg = (self.specs,) if len(diff_argnums) == 1 else tuple(self.specs)
    specs = tuple(batch_spec if i in batch_argnums
                  else per_arg[diff_argnums.index(i)] if i in diff_argnums else P()
                  for i in range(len(args)))
    grad_specs = self.specs
    return jax.shard_map(lambda *a: loop(a, kwargs), mesh=self.mesh, in_specs=specs,
                         out_specs=result_specs(grad_specs),
                         axis_names=frozenset(self.axes))(*args)

  def _leaf(self, fn, tree):
    return jax.tree.map(lambda x, s: fn(x, s), tree, self.specs)

  def _gather(self, x, spec):
    for dim, entry in enumerate(spec):
      for axis in reversed(_names(entry)):
        x = lax.all_gather(x, axis, axis=dim, tiled=True)
    return _varying(x, self.axes)

  def prepare(self, diff_args: tuple) -> tuple:
    if self.per_microbatch:
      return jax.tree.map(lambda x: x, diff_args)
    return self._leaf(self._gather, diff_args)

  def microbatch(self, diff_args: tuple, micro: PyTree) -> tuple:
    if not self.per_microbatch:
      return diff_args
    diff_args, _ = lax.optimization_barrier((diff_args, micro))
    return self._leaf(self._gather, diff_args)

  def _scatter(self, g, spec):
    for dim, entry in enumerate(spec):
      for axis in _names(entry):
        g = lax.psum_scatter(g, axis, scatter_dimension=dim, tiled=True)
    return g

  def carry(self, grads: PyTree) -> PyTree:
    if not self.per_microbatch:
      return _varying(grads, self.axes)
    return _varying(self._leaf(self._scatter, grads), self.axes)

  def zeros(self, grads_like: PyTree, dtype_of) -> PyTree:
    def zero(g, spec):
      shape = list(g.shape)
      if self.per_microbatch:
        for dim, entry in enumerate(spec):
          shape[dim] //= int(np.prod([self.mesh.shape[a] for a in _names(entry)]))
      return _varying(jnp.zeros(shape, dtype_of(g.dtype)), self.axes)
    return self._leaf(zero, grads_like)

  def reduce(self, grad_sums: PyTree) -> PyTree:
    """``psum`` over the data axes a leaf is not (yet) scattered over."""
    def one(g, spec):
      if not self.per_microbatch:
        g = self._scatter(g, spec)
      rest = tuple(a for a in self.axes if a not in sharded_over(spec, self.axes))
      return lax.psum(g, rest) if rest else g
    return self._leaf(one, grad_sums)

  def reduce_other(self, tree: PyTree) -> PyTree:
    return lax.psum(tree, self.axes)

  def num_devices(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in self.axes]))

  def rng_salt(self) -> jax.Array:
    return lax.axis_index(self.axes if len(self.axes) > 1 else self.axes[0])


def _only(spec: P, axes: tuple[Hashable, ...]) -> P:
  """``spec`` keeping only ``axes`` (the manual axes of the ``shard_map``)."""
  entries = []
  for entry in spec:
    kept = tuple(a for a in _names(entry) if a in axes)
    entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def _varying(tree: PyTree, axes: tuple[Hashable, ...]) -> PyTree:
  def cast(x):
    aval = jax.typeof(x)
    have = frozenset(getattr(getattr(aval, "mat", None), "varying", ()) or
                     getattr(aval, "vma", ()))
    missing = tuple(a for a in axes if a not in have)
    return lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(cast, tree)
