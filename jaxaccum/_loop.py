"""The micro-batch loop: one contribution per micro-batch, a scan, one reduction.

Everything the loop carries is a running sum (``_Sums``) plus the state of the
``"sequential"`` state policy; every division, and every cross-device
reduction, happens once after the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxaccum import _collectives, _dtypes, _split, _stats

PyTree = Any


class Config(NamedTuple):
  """The static options of one accumulated function (validated already)."""

  grad_fn: Callable[..., Any]
  num_microbatches: int | None
  microbatch_size: int | None
  argnums: tuple[int, ...]
  batch_argnums: tuple[int, ...]
  rng_argnums: tuple[int, ...]
  state_argnums: tuple[int, ...]
  state_policies: tuple[str, ...]
  state_is_tuple: bool
  has_aux: bool
  weight_fn: Callable[..., Any] | None
  reduction: str
  aux_reduction: str
  accumulator_dtype: Any
  with_stats: bool
  skip_nonfinite: bool

  @property
  def weighted(self) -> bool:
    return self.weight_fn is not None or self.skip_nonfinite

  @property
  def counts_kept(self) -> bool:
    return self.skip_nonfinite or self.with_stats or "mean" in self.state_policies


class _Sums(NamedTuple):
  """Running sums over micro-batches (``()`` for what is not needed).

  Attributes:
    grads: (weighted) gradients, in the accumulator dtype.
    value: (weighted) losses, in float32 or wider.
    weight: weights.
    aux: auxiliary outputs reduced by ``"mean"`` or ``"sum"``.
    kept: micro-batches kept (all but those ``skip_nonfinite`` left out).
    sampled: kept micro-batches of positive weight: the gradient samples of
      the statistics.
    skipped: micro-batches of positive weight that ``skip_nonfinite`` left out.
    sq_norm: squared norms of the sampled micro-batch gradients.
    state: new states of the ``"mean"`` state policy, of kept micro-batches.
  """

  grads: PyTree
  value: jax.Array
  weight: Any
  aux: PyTree
  kept: Any
  sampled: Any
  skipped: Any
  sq_norm: Any
  state: PyTree


def _state_mean(total: jax.Array, count: jax.Array, fallback: jax.Array) -> jax.Array:
  """Mean of summed states (integers: floor), ``fallback`` if none was kept."""
  safe = jnp.maximum(count, 1).astype(total.dtype)
  mean = total / safe if _dtypes.is_float(total) else total // safe
  return jnp.where(count > 0, mean.astype(fallback.dtype), fallback)


def num_microbatches_of(config: Config, args: tuple) -> int:
  """The number of micro-batches for these arguments (validated)."""
  batch = tuple(args[i] for i in config.batch_argnums)
  return _split.resolve_num_microbatches(
      _split.batch_size(batch), config.num_microbatches, config.microbatch_size)


def run(config: Config, args: tuple, kwargs: dict, axes: tuple[Hashable, ...],
        rng_salt: jax.Array | None = None, num_microbatches: int | None = None):
  """Runs the loop on one device (or on each device of ``axes``)."""
  batch = tuple(args[i] for i in config.batch_argnums)
  size = _split.batch_size(batch)
  n = num_microbatches or num_microbatches_of(config, args)
  args = list(args)
  # Device-varying parameters keep every micro-step's gradient device-local.
  for i in config.argnums:
    args[i] = _collectives.to_varying(args[i], axes)
  keys = {i: args[i] if rng_salt is None else jax.random.fold_in(args[i], rng_salt)
          for i in config.rng_argnums}
  policies = dict(zip(config.state_argnums, config.state_policies))
  seq_pos = tuple(p for p in config.state_argnums if policies[p] == "sequential")
  mean_pos = tuple(p for p in config.state_argnums if policies[p] == "mean")

  def one(index, micro, seq_states):
    """One micro-batch's contribution to the sums, its new states, its aux."""
    call = list(args)
    for pos, part in zip(config.batch_argnums, micro):
      call[pos] = part
    for pos, key in keys.items():
      call[pos] = jax.random.fold_in(key, index)
    for pos, state in zip(seq_pos, seq_states):
      call[pos] = state
    out, grads = config.grad_fn(*call, **kwargs)
    value, aux, new_states = _unpack(config, out)
    new_states = dict(zip(config.state_argnums, new_states))
    keep = None
    if config.skip_nonfinite:
      keep = jnp.logical_and(
          jnp.isfinite(value),
          jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
                            or [jnp.array(True)])))
    w = None
    if config.weight_fn is not None:
      w = jnp.asarray(config.weight_fn(*micro))
      if w.shape != ():
        raise ValueError(f"weight_fn must return a scalar per micro-batch, got shape {w.shape}")
      w = w.astype(_dtypes.wide(w.dtype))
    # A micro-batch of weight zero (all padding) is no gradient sample: it is
    # left out of the statistics and, even with a 0 / 0 loss, not counted as
    # skipped.
    weighed = jnp.ones([], jnp.float32) if w is None else (w > 0).astype(jnp.float32)
    if keep is not None:
      w = jnp.where(keep, jnp.ones([], jnp.float32) if w is None else w, 0)
    kept = (jnp.ones([], jnp.float32) if keep is None else keep.astype(jnp.float32))
    sampled = kept * weighed
    if keep is not None:
      # A skipped micro-batch leaves the sequential state as it found it.
      new_seq = tuple(jax.tree.map(lambda new, old: jnp.where(keep, new, old),
                                   new_states[p], state)
                      for p, state in zip(seq_pos, seq_states))
    else:
      new_seq = tuple(new_states[p] for p in seq_pos)
    acc = config.accumulator_dtype
    sums = _Sums(
        grads=jax.tree.map(
            lambda g: _dtypes.scale_by_weight(g, w, _dtypes.accumulator_for(acc, g.dtype)), grads),
        value=_dtypes.scale_by_weight(value, w, _dtypes.wide(value.dtype)),
        weight=() if w is None else w,
        aux=_aux_contribution(config.aux_reduction, aux, w),
        kept=kept if config.counts_kept else (),
        sampled=sampled if config.with_stats else (),
        skipped=weighed - sampled if config.with_stats else (),
        sq_norm=(jnp.where(sampled > 0, _stats.sq_norm(grads), 0)
                 if config.with_stats else ()),
        state=tuple(jax.tree.map(
            lambda s: jnp.where(kept > 0, s.astype(_dtypes.wide(s.dtype)) if _dtypes.is_float(s) else s,
                                jnp.zeros_like(s, _dtypes.wide(s.dtype) if _dtypes.is_float(s) else s.dtype)),
            new_states[p]) for p in mean_pos),
    )
    stacked = aux if config.aux_reduction == "stack" else ()
    return _collectives.to_varying((sums, new_seq, stacked), axes), (value, grads)

  seq_init = _collectives.to_varying(tuple(args[p] for p in seq_pos), axes)
  if n == 1:
    (sums, seq_states, stacked), (value, grads) = one(0, batch, seq_init)
    stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], stacked)
  else:
    strided = _split.stride(batch, n)

    def body(carry, index):
      with jax.named_scope("jaxaccum/microbatch"):
        sums, seq_states = carry
        (new, seq_states, stacked), _ = one(
            index, _split.microbatch(strided, index), seq_states)
        return (jax.tree.map(jnp.add, sums, new), seq_states), stacked

    (shapes, _, _), (value, grads) = jax.eval_shape(
        lambda: one(0, _split.microbatch(strided, 0), seq_init))
    init = _collectives.to_varying(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), axes)
    (sums, seq_states), stacked = lax.scan(
        body, (init, seq_init), jnp.arange(n, dtype=jnp.int32))

  with jax.named_scope("jaxaccum/reduce"):
    inputs = {p: args[p] for p in mean_pos}
    return _finalize(config, sums, seq_states, stacked, inputs, n, size, axes,
                     value, grads)


def _unpack(config: Config, out) -> tuple[jax.Array, PyTree, tuple]:
  """Splits ``fun``'s output into value, aux and the new states (a tuple)."""
  if not config.state_argnums:
    value, aux = out if config.has_aux else (out, ())
    return value, aux, ()
  value, rest = out
  aux, states = rest if config.has_aux else ((), rest)
  return value, aux, tuple(states) if config.state_is_tuple else (states,)


def _aux_contribution(aux_reduction: str, aux: PyTree, w: jax.Array | None) -> PyTree:
  """What one micro-batch adds to the aux sums (``()`` for ``"stack"``)."""
  aux = jax.tree.map(jnp.asarray, aux)
  if aux_reduction == "mean":
    return jax.tree.map(lambda a: _dtypes.scale_by_weight(a, w, _dtypes.wide(a.dtype)), aux)
  if aux_reduction == "sum":
    def add(a):
      a = a.astype(jnp.int32) if a.dtype == jnp.bool_ else a
      # A micro-batch of weight zero (or skipped) adds nothing, not its NaN.
      return a if w is None else jnp.where(w > 0, a, jnp.zeros_like(a))
    return jax.tree.map(add, aux)
  return ()


def _finalize(config: Config, sums: _Sums, seq_states: tuple, stacked: PyTree,
              mean_inputs: dict, n: int, size: int, axes: tuple[Hashable, ...],
              value_like: jax.Array, grads_like: PyTree):
  """Reduces the sums across devices (one psum) and forms the results.

  ``value_like`` and ``grads_like`` give the output dtypes; when there is a
  single micro-batch on a single device they are its actual results.
  """
  sums, seq_states, stacked = _collectives.psum((sums, seq_states, stacked), axes)
  devices = _collectives.axis_size(axes)
  if config.weighted:
    total = sums.weight
  else:
    total = jnp.asarray(n * devices, _dtypes.wide(sums.value.dtype))

  def mean(x):
    if config.weighted:
      return _dtypes.ratio(x, total)
    return x / total.astype(x.dtype)

  finish = mean if config.reduction == "mean" else (lambda x: x)
  acc_grads = jax.tree.map(finish, sums.grads)
  grads = jax.tree.map(lambda s, g: s.astype(g.dtype), acc_grads, grads_like)
  value = finish(sums.value).astype(value_like.dtype)
  if n * devices == 1 and config.weighted and config.reduction == "mean":
    # w * f / w can differ from f in the last bit: return f itself.
    keep = sums.weight > 0
    grads = jax.tree.map(lambda g: jnp.where(keep, g, jnp.zeros_like(g)), grads_like)
    value = jnp.where(keep, value_like, jnp.zeros_like(value_like))

  aux = ()
  if config.aux_reduction == "mean":
    aux = jax.tree.map(mean, sums.aux)
  elif config.aux_reduction == "sum":
    aux = sums.aux
  elif devices == 1:
    aux = stacked
  else:
    aux = jax.tree.map(
        lambda a: a.astype(_dtypes.wide(a.dtype)) / jnp.asarray(devices, _dtypes.wide(a.dtype)), stacked)

  states = {}
  for p, state in zip((p for p in config.state_argnums if p not in mean_inputs),
                      seq_states):
    states[p] = jax.tree.map(
        lambda s: s / jnp.asarray(devices, s.dtype) if _dtypes.is_float(s) else s // devices,
        state) if devices > 1 else state
  for p, state_sum in zip(mean_inputs, sums.state):
    states[p] = jax.tree.map(lambda s, x: _state_mean(s, sums.kept, x),
                             state_sum, mean_inputs[p])
  states = tuple(states[p] for p in config.state_argnums)
  if config.state_argnums:
    state_out = states if config.state_is_tuple else states[0]
    aux = (aux, state_out) if config.has_aux else state_out
  out = (value, aux) if (config.has_aux or config.state_argnums) else value
  if not config.with_stats:
    return out, grads
  return (out, grads), _make_stats(config, sums, acc_grads, n, size, devices)


def _make_stats(config: Config, sums: _Sums, acc_grads: PyTree, n: int, size: int,
                devices: int) -> _stats.AccumulationStats:
  """The noise-scale statistics from the reduced sums."""
  sampled = sums.sampled
  if config.reduction == "sum":
    acc_grads = jax.tree.map(lambda g: _dtypes.ratio(g, sums.weight) if config.weighted
                             else g / jnp.asarray(n * devices, g.dtype), acc_grads)
  small_sq = _dtypes.ratio(sums.sq_norm, sampled)
  big_sq = _stats.sq_norm(acc_grads)
  b_small = jnp.asarray(size // n, jnp.int32)
  b_big = b_small.astype(jnp.float32) * sampled
  g2, trace, scale = _stats.noise_estimates(small_sq, big_sq, b_small, b_big)
  return _stats.AccumulationStats(
      microbatch_sq_norm=small_sq, grad_sq_norm=big_sq, sq_norm_estimate=g2,
      trace_estimate=trace, noise_scale=scale, microbatch_size=b_small,
      num_microbatches=jnp.asarray(n, jnp.int32),
      effective_batch_size=jnp.asarray(size * devices, jnp.int32),
      num_skipped=sums.skipped.astype(jnp.int32))
