"""The loop's view of devices: the strategy protocol, one device, and ``axis_name``.

The loop talks to devices only through a :class:`Strategy`. :class:`Local`
(one device) and :class:`Named` (``axis_name``, inside ``jax.pmap`` /
``jax.shard_map``) live here; the ``data_axis`` strategies for plain
``jax.jit`` over sharded arrays (:class:`~jaxaccum._devices.data_axis.DataStrategy` and the
two it picks from) live in :mod:`jaxaccum._devices.data_strategies`.

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
from typing import Any, Protocol

import jax
from jax import lax

from jaxaccum._devices.specs import axis_spec, to_varying

PyTree = Any
Axes = tuple[Hashable, ...]


class Strategy(Protocol):
  """How the loop runs on devices and where it reduces across them.

  Attributes:
    manual: whether the loop runs in a manual region (``pmap``,
      ``shard_map``), where its values are device-varying.
  """

  manual: bool

  def run(self, loop: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Runs ``loop(strategy, args, kwargs)`` (in a ``shard_map``, say)."""

  def prepare(self, diff: tuple) -> tuple:
    """Readies the differentiated arguments (one per ``argnums``) for the loop."""

  def microbatch(self, diff: tuple, micro: PyTree) -> tuple:
    """The differentiated arguments as micro-batch ``micro`` sees them."""

  def carry(self, tree: PyTree) -> PyTree:
    """``tree`` given the loop carry's type."""

  def gradients(self, grads: PyTree) -> PyTree:
    """One micro-batch's gradient sums, as the carry holds them."""

  def zeros(self, shapes: PyTree) -> PyTree:
    """The carry's zeros."""

  def reduce(self, others: PyTree, grads: PyTree) -> tuple[PyTree, PyTree]:
    """The one cross-device reduction after the loop (gradients apart)."""

  def result(self, grads: PyTree) -> PyTree:
    """The finalized gradients as the call returns them."""

  def num_devices(self) -> int:
    """The devices whose sums ``reduce`` adds up."""

  def rng_salt(self) -> jax.Array | None:
    """What tells devices' random streams apart (``None``: nothing)."""


def fold_in_device(key: jax.Array, salt: jax.Array) -> jax.Array:
  """``jax.random.fold_in`` of ``salt`` into an array of keys of any shape."""
  # A raw uint32 key is an array of shape (..., 2), a typed key a scalar.
  raw = not jax.numpy.issubdtype(key.dtype, jax.dtypes.prng_key)
  flat = key.reshape((-1, key.shape[-1]) if raw else (-1,))
  return jax.vmap(lambda k: jax.random.fold_in(k, salt))(flat).reshape(key.shape)


class Local:
  """One device: nothing to reduce (a :class:`Strategy`)."""

  manual = False

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

  def result(self, grads: PyTree) -> PyTree:
    return grads

  def num_devices(self) -> int:
    return 1

  def rng_salt(self) -> jax.Array | None:
    return None


@dataclasses.dataclass(frozen=True)
class Named(Local):
  """Inside ``jax.pmap`` / ``jax.shard_map``: one ``psum`` over ``axes``."""

  axes: Axes
  manual = True

  def prepare(self, tree: PyTree) -> PyTree:
    check_bound(self.axes)
    return to_varying(tree, self.axes)

  def carry(self, tree: PyTree) -> PyTree:
    return to_varying(tree, self.axes)

  def _reduce(self, tree: PyTree) -> PyTree:
    return lax.psum(tree, self.axes)

  def num_devices(self) -> int:
    return math.prod(lax.axis_size(a) for a in self.axes)


def check_bound(axes: Axes) -> None:
  """``axis_name``'s axes must be bound by an enclosing ``pmap`` / ``shard_map``."""
  for a in axes:
    try:
      lax.axis_size(a)
    except NameError:
      raise ValueError(
          f"axis_name={axis_spec(axes)!r} is not bound here: it is not an axis of an "
          "enclosing jax.pmap or jax.shard_map; call this inside one that binds it, "
          "or, for a jax.jit step over a sharded batch, use data_axis= instead"
      ) from None


def salt_keys(keys: PyTree, axes: Axes) -> PyTree:
  """Folds the device's index along ``axes`` into every PRNG key of ``keys``."""
  try:
    salt = lax.axis_index(axis_spec(axes))
  except NameError:
    return keys  # plain jit on Explicit axes: the loss sees the global batch
  return jax.tree.map(lambda k: fold_in_device(k, salt), keys)
