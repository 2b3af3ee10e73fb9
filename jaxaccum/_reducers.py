"""One reducer per accumulated quantity: ``contribute`` and ``finalize``.

Like optax's ``microbatching.Accumulator``, each quantity the loop
accumulates is one small piece: ``contribute(micro)`` is what a micro-batch
adds to its running sum (the zeros come from its shape), and
``finalize(total, totals)`` turns the sum, reduced across devices, into the
result. ``stack(micro)`` gives what the loop stacks instead of summing
(per-micro-batch and per-example aux). The loop builds only the reducers the
options turn on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum import _dtypes, _stats
from jaxaccum._microstep import Micro
from jaxaccum._options import Options

PyTree = Any


class Totals(NamedTuple):
  """What every reducer's ``finalize`` may read.

  Attributes:
    sums: every reducer's reduced sum, by name.
    count: micro-batches over all devices, ``N * D``.
    devices: devices whose sums were added, ``D``.
    like: the first micro-batch's :class:`Micro` (its shapes and dtypes;
      with ``count == 1`` its actual values).
    single: whether there was one micro-batch on one device.
  """

  sums: dict[str, Any]
  count: int
  devices: int
  like: Micro
  single: bool

  def denominator(self, dtype: Any) -> jax.Array:
    """What a mean divides by: the weights' sum, else ``N * D``."""
    if "weight" in self.sums:
      return self.sums["weight"]
    return jnp.asarray(self.count, dtype)

  def nan_if_all_skipped(self, x: jax.Array) -> jax.Array:
    """NaN where ``skip_nonfinite`` left out every weighted micro-batch."""
    counts = self.sums.get("counts")
    if "weight" not in self.sums or counts is None or "skipped" not in counts:
      return x
    none_kept = jnp.logical_and(self.sums["weight"] == 0, counts["skipped"] > 0)
    return jnp.where(none_kept, jnp.full_like(x, np.nan), x)


class Reducer(NamedTuple):
  """One accumulated quantity.

  Attributes:
    contribute: ``micro -> pytree`` summed over micro-batches.
    finalize: ``(total, totals) -> result`` after the cross-device reduction.
  """

  contribute: Callable[[Micro], PyTree]
  finalize: Callable[[PyTree, Totals], Any]


def _mean_or_sum(options: Options) -> Callable[[jax.Array, Totals], jax.Array]:
  def finish(total, totals):
    if options.reduction == "sum":
      return total
    return _dtypes.ratio(total, totals.denominator(total.dtype).astype(total.dtype))
  return finish


def value(options: Options) -> Reducer:
  finish = _mean_or_sum(options)

  def finalize(total, totals):
    like = totals.like.value
    if totals.single and options.weighted and options.reduction == "mean":
      # w * f / w can differ from f in the last bit: return f itself.
      out = jnp.where(totals.sums["weight"] != 0, like, jnp.zeros_like(like))
      out = jnp.where(jnp.isnan(totals.sums["weight"]), jnp.full_like(like, np.nan), out)
    else:
      out = finish(total, totals).astype(like.dtype)
    return totals.nan_if_all_skipped(out)

  return Reducer(
      lambda m: _dtypes.scale_by_weight(m.value, m.weight, _dtypes.wide(m.value.dtype)),
      finalize)


def grads(options: Options) -> Reducer:
  finish = _mean_or_sum(options)

  def contribute(m):
    return jax.tree.map(lambda g: _dtypes.scale_by_weight(
        g, m.weight, _dtypes.accumulator_for(options.accumulator_dtype, g.dtype)), m.grads)

  def finalize(total, totals):
    if totals.single and options.weighted and options.reduction == "mean":
      w = totals.sums["weight"]
      out = jax.tree.map(lambda g: jnp.where(
          jnp.isnan(w), jnp.full_like(g, np.nan),
          jnp.where(w != 0, g, jnp.zeros_like(g))), totals.like.grads)
    else:
      out = jax.tree.map(lambda s, g: finish(s, totals).astype(g.dtype),
                         total, totals.like.grads)
    return jax.tree.map(totals.nan_if_all_skipped, out)

  return Reducer(contribute, finalize)


def weight() -> Reducer:
  return Reducer(lambda m: m.weight, lambda total, totals: total)


def counts(options: Options) -> Reducer:
  """Kept, sampled and skipped micro-batches (for states, skipping, statistics)."""

  def contribute(m):
    out = {"kept": m.kept}
    if options.skip_nonfinite or options.with_stats:
      out.update(sampled=m.sampled, skipped=m.skipped)
    return out

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
      out = _dtypes.ratio(s, totals.denominator(s.dtype).astype(s.dtype))
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
    kept = totals.sums["counts"]["kept"]
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
  return Reducer(lambda m: jnp.where(m.sampled > 0, _stats.sq_norm(m.grads), 0),
                 lambda total, totals: total)


def build(options: Options, kinds: tuple[str, ...],
          mean_inputs: dict[int, PyTree]) -> dict[str, Reducer]:
  """The reducers these options turn on, by name."""
  reducers = {"value": value(options), "grads": grads(options)}
  if options.weighted:
    reducers["weight"] = weight()
  if options.skip_nonfinite or options.with_stats or mean_inputs:
    reducers["counts"] = counts(options)
  if any(k in ("mean", "sum") for k in kinds):
    reducers["aux"] = aux(kinds)
  if mean_inputs:
    reducers["mean_states"] = mean_states(options, mean_inputs)
  if options.with_stats:
    reducers["sq_norm"] = sq_norm()
  return reducers
