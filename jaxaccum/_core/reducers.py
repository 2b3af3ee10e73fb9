"""One reducer per accumulated quantity: ``contribute`` and ``finalize``.

Like optax's ``microbatching.Accumulator``, each quantity the loop
accumulates is one small piece: ``contribute(micro)`` is what a micro-batch
adds to its running sum (the zeros come from its shape), and
``finalize(total, totals)`` turns the sum, reduced across devices, into the
result. :class:`Accumulator` holds the reducers the options turn on, built
once from the first micro-batch's shapes: the loop adds up its
``contribute`` (a :class:`Sums`) and, after the one cross-device reduction,
calls its ``finalize``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum._core import dtypes as _dtypes
from jaxaccum._core import stats
from jaxaccum._core.microbatch import Micro
from jaxaccum._core.options import Options

PyTree = Any


class Sums(NamedTuple):
  """What the loop sums, one field per quantity (``None`` where it is off).

  Attributes:
    aux: the ``"mean"`` and ``"sum"`` aux leaves, by leaf index.
    counts: :class:`Counts` (states, skipping, statistics).
    grads: the (weighted) gradients.
    mean_states: the states of the ``"mean"`` policy.
    sq_norm: the micro-batch gradients' squared norms (statistics).
    value: the (weighted) loss.
    weight: the weights (``weight_fn`` or ``skip_nonfinite``).
  """

  # In this order, the carry's leaves keep the order XLA has been measured on.
  aux: Any = None
  counts: Any = None
  grads: Any = None
  mean_states: Any = None
  sq_norm: Any = None
  value: Any = None
  weight: Any = None


class Counts(NamedTuple):
  """Micro-batches kept, sampled (kept, of positive weight) and skipped.

  Attributes:
    kept: kept micro-batches.
    sampled: gradient samples of the statistics (``None`` if unused).
    skipped: micro-batches of positive weight left out (``None`` if unused).
  """

  kept: Any
  sampled: Any = None
  skipped: Any = None


class Totals(NamedTuple):
  """What every reducer's ``finalize`` may read.

  Attributes:
    sums: the reduced :class:`Sums`.
    count: micro-batches summed over all devices, ``N * D`` (``n * D`` with
      ``num_real_microbatches=n``).
    devices: devices whose sums were added, ``D``.
    like: the first micro-batch's :class:`Micro` (its shapes and dtypes;
      with ``count == 1`` its actual values).
    single: whether there was one micro-batch on one device.
  """

  sums: Sums
  count: Any
  devices: int
  like: Micro
  single: bool

  def mean(self, total: jax.Array) -> jax.Array:
    """``total`` over the weights' sum (else ``N * D``); zero for zero weight."""
    weight = self.sums.weight
    if weight is None and isinstance(self.count, int):
      # A static count is never zero: a plain division, as a hand-written loop.
      return total / jnp.asarray(self.count, total.dtype)
    weight = self.count if weight is None else weight
    return _dtypes.ratio(total, jnp.asarray(weight).astype(total.dtype))

  def as_given(self, x: jax.Array) -> jax.Array:
    """The single micro-batch's own ``x`` as a weighted mean: ``w * x / w`` can
    differ from ``x`` in the last bit, so ``x`` itself (zero for zero weight,
    NaN for a NaN weight)."""
    w = self.sums.weight
    return jnp.where(jnp.isnan(w), jnp.full_like(x, np.nan),
                     jnp.where(w != 0, x, jnp.zeros_like(x)))

  def nan_if_all_skipped(self, x: jax.Array) -> jax.Array:
    """NaN where ``skip_nonfinite`` left out every weighted micro-batch."""
    counts = self.sums.counts
    if self.sums.weight is None or counts is None or counts.skipped is None:
      return x
    none_kept = jnp.logical_and(self.sums.weight == 0, counts.skipped > 0)
    return jnp.where(none_kept, jnp.full_like(x, np.nan), x)


class Reducer(NamedTuple):
  """One accumulated quantity.

  Attributes:
    contribute: ``micro -> pytree`` summed over micro-batches.
    finalize: ``(total, totals) -> result`` after the cross-device reduction.
  """

  contribute: Callable[[Micro], PyTree]
  finalize: Callable[[PyTree, Totals], Any]


def _finish(options: Options, total: jax.Array, like: jax.Array, totals: Totals,
            dtype: Any = None):
  """The value or a gradient leaf from its reduced sum, in ``dtype`` (else
  ``like``'s)."""
  dtype = like.dtype if dtype is None else dtype
  if options.reduction == "sum":
    out = total.astype(dtype)
  elif totals.single and options.weighted:
    out = totals.as_given(like)
  else:
    out = totals.mean(total).astype(dtype)
  return totals.nan_if_all_skipped(out)


def value(options: Options) -> Reducer:

  def finalize(total, totals):
    return _finish(options, total, totals.like.value, totals)

  return Reducer(
      lambda m: _dtypes.scale_by_weight(m.value, m.weight, _dtypes.wide(m.value.dtype)),
      finalize)


def grads(options: Options) -> Reducer:

  def contribute(m):
    return jax.tree.map(lambda g: _dtypes.scale_by_weight(
        g, m.weight, _dtypes.accumulator_for(options.accumulator_dtype, g.dtype)), m.grads)

  def finalize(total, totals):
    # Deferred partial sums stay in the accumulator dtype until reduced.
    return jax.tree.map(lambda s, g: _finish(
        options, s, g, totals, s.dtype if options.defer_reduction else None), total,
        totals.like.grads)

  return Reducer(contribute, finalize)


def weight() -> Reducer:
  return Reducer(lambda m: m.weight, lambda total, totals: total)


def counts(options: Options) -> Reducer:
  """Kept, sampled and skipped micro-batches (for states, skipping, statistics)."""

  def contribute(m):
    if options.skip_nonfinite or options.with_stats:
      return Counts(m.kept, m.sampled, m.skipped)
    return Counts(m.kept)

  return Reducer(contribute, lambda total, totals: total)


def aux(kinds: tuple[str, ...]) -> Reducer:
  """The ``"mean"`` and ``"sum"`` leaves of aux, by leaf index (``kinds[i]``
  is leaf ``i``'s reduction)."""
  summed = [i for i, kind in enumerate(kinds) if kind in ("mean", "sum")]

  def contribute(m):
    leaves = jax.tree.leaves(m.aux)
    return {i: _aux_term(kinds[i], jnp.asarray(leaves[i]), m.weight) for i in summed}

  def finalize(total, totals):
    like = jax.tree.leaves(totals.like.aux)

    def mean(i, s):
      # Floating leaves keep their dtype; integer and boolean ones become float32.
      out = totals.mean(s)
      dtype = jnp.dtype(getattr(like[i], "dtype", None) or jnp.asarray(like[i]).dtype)
      floating = jnp.issubdtype(dtype, jnp.inexact)
      return totals.nan_if_all_skipped(out.astype(dtype) if floating else out)

    return {i: mean(i, s) if kinds[i] == "mean" else s for i, s in total.items()}

  return Reducer(contribute, finalize)


def _aux_term(kind: str, a: jax.Array, w: jax.Array | None) -> jax.Array:
  if kind == "mean":
    return _dtypes.scale_by_weight(a, w, _dtypes.wide(a.dtype))
  a = a.astype(jnp.int32) if a.dtype == jnp.bool_ else a
  # A micro-batch of weight zero (or skipped) adds nothing, not its NaN.
  return a if w is None else jnp.where(w != 0, a, jnp.zeros_like(a))


def mean_states(options: Options, inputs: dict[int, PyTree]) -> Reducer:
  """States of the ``"mean"`` policy: the mean of the kept micro-batches' states."""
  positions = tuple(inputs)

  def contribute(m):
    def term(s):
      s = jnp.asarray(s)
      s = s.astype(_dtypes.wide(s.dtype)) if _dtypes.is_float(s) else s
      return jnp.where(m.kept > 0, s, jnp.zeros_like(s))
    return tuple(jax.tree.map(term, m.states[options.state_argnums.index(p)])
                 for p in positions)

  def finalize(total, totals):
    kept = totals.sums.counts.kept
    return {p: jax.tree.map(lambda s, x: _state_mean(s, kept, x), t, inputs[p])
            for p, t in zip(positions, total)}

  return Reducer(contribute, finalize)


def _state_mean(total: jax.Array, count: jax.Array, fallback: jax.Array) -> jax.Array:
  """Mean of summed states (integers: floor), ``fallback`` if none was kept."""
  fallback = jnp.asarray(fallback)
  safe = jnp.maximum(count, 1).astype(total.dtype)
  mean = total / safe if _dtypes.is_float(total) else total // safe
  return jnp.where(count > 0, mean.astype(fallback.dtype), fallback)


def sq_norm() -> Reducer:
  """Squared norms of the sampled micro-batch gradients (statistics)."""
  return Reducer(lambda m: jnp.where(m.sampled > 0, stats.sq_norm(m.grads), 0),
                 lambda total, totals: total)


def aux_kinds(spec: Any, aux: PyTree, rows: int) -> tuple[str, ...]:
  """Each aux leaf's reduction, from ``aux_reduction`` (a name or a prefix pytree);
  ``rows``: the micro-batch's rows, which a ``"concat"`` leaf must lead with."""
  if isinstance(spec, str):
    kinds = [spec] * len(jax.tree.leaves(aux))
  else:
    try:
      kinds = jax.tree.leaves(jax.tree.map(
          lambda kind, sub: jax.tree.map(lambda _: kind, sub), spec, aux))
    except (ValueError, TypeError) as e:
      raise ValueError(
          f"aux_reduction={spec!r} must be a reduction name or a pytree prefix of "
          f"fun's aux, whose structure is {jax.tree.structure(aux)}") from e
  for (path, leaf), kind in zip(jax.tree_util.tree_leaves_with_path(aux), kinds):
    if kind == "concat" and (not leaf.shape or leaf.shape[0] != rows):
      raise ValueError(
          f"aux_reduction='concat' needs per-example aux leaves with a leading axis of "
          f"the micro-batch's {rows} rows; aux{jax.tree_util.keystr(path)} has shape "
          f"{leaf.shape} (use 'mean', 'sum' or 'stack' for it)")
  return tuple(kinds)


class Accumulator(NamedTuple):
  """The reducers of one accumulated function, as one object.

  Attributes:
    reducers: a :class:`Sums` of :class:`Reducer` (``None`` where off).
    kinds: each aux leaf's reduction.
    like: the first micro-batch's :class:`Micro` (shapes and dtypes).
    rows: the rows of a micro-batch on one device.
    state_argnums: the state arguments, in order.
  """

  reducers: Sums
  kinds: tuple[str, ...]
  like: Micro
  rows: int
  state_argnums: tuple[int, ...]

  @classmethod
  def build(cls, options: Options, like: Micro, rows: int,
            mean_inputs: dict[int, PyTree]) -> Accumulator:
    """The reducers these options turn on, for micro-batches like ``like``."""
    kinds = aux_kinds(options.aux_reduction, like.aux, rows)
    on = lambda flag, make: make() if flag else None  # noqa: E731
    reducers = Sums(
        value=value(options), grads=grads(options),
        weight=on(options.weighted, weight),
        counts=on(options.skip_nonfinite or options.with_stats or mean_inputs,
                  lambda: counts(options)),
        aux=on(any(k in ("mean", "sum") for k in kinds), lambda: aux(kinds)),
        mean_states=on(mean_inputs, lambda: mean_states(options, mean_inputs)),
        sq_norm=on(options.with_stats, sq_norm))
    return cls(reducers, kinds, like, rows, options.state_argnums)

  def contribute(self, m: Micro) -> Sums:
    """What micro-batch ``m`` adds to the sums."""
    return Sums(*(None if r is None else r.contribute(m) for r in self.reducers))

  def stack(self, m: Micro) -> dict[int, Any]:
    """The aux leaves of micro-batch ``m`` that are stacked, not summed."""
    aux = jax.tree.leaves(m.aux)
    return {i: aux[i] for i, k in enumerate(self.kinds) if k in ("stack", "concat")}

  def finalize(self, totals: Totals, seq_states: tuple) -> tuple[Sums, tuple]:
    """Every reduced sum as its result, and the final states in
    ``state_argnums`` order (``seq_states``: the ``"sequential"`` ones, summed
    over devices)."""
    done = Sums(*(None if r is None else r.finalize(t, totals)
                  for r, t in zip(self.reducers, totals.sums)))
    means, seq = done.mean_states or {}, iter(seq_states)
    states = tuple(means[p] if p in means else _state_over_devices(next(seq), totals.devices)
                   for p in self.state_argnums)
    return done, states


def _state_over_devices(state: PyTree, devices: int) -> PyTree:
  """A sequential state summed over devices, as their mean (integers: floor)."""
  if devices == 1:
    return state
  return jax.tree.map(lambda s: s / jnp.asarray(devices, s.dtype)
                      if _dtypes.is_float(s) else s // devices, state)
