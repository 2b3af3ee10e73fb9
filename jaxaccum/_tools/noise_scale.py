"""Smoothing the gradient noise scale over training steps.

One step's estimates of ``|G|^2`` and ``tr(Sigma)`` (from ``with_stats=True``)
are unbiased but noisy, and their ratio is more so: the squared-norm
estimate can come out near zero or negative. As McCandlish et al. (2018)
recommend, each estimate is averaged over steps on its own and the ratio taken
of the averages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class NoiseScaleState(NamedTuple):
  """State of :func:`jaxaccum.noise_scale_ema` (a pytree of scalars).

  Attributes:
    count: int32, the updates averaged so far (those with finite estimates).
    sq_norm: float32, bias-corrected moving average of ``|G|^2``
      (``stats.sq_norm_estimate``); 0 before the first update.
    trace: float32, bias-corrected moving average of ``tr(Sigma)``
      (``stats.trace_estimate``); 0 before the first update.

  Example:

    >>> import jaxaccum
    >>> state = jaxaccum.noise_scale_ema().init()
    >>> int(state.count), float(state.sq_norm), float(state.trace)
    (0, 0.0, 0.0)
  """

  count: jax.Array
  sq_norm: jax.Array
  trace: jax.Array


class NoiseScaleSmoother(NamedTuple):
  """The ``(init, update)`` pair returned by :func:`jaxaccum.noise_scale_ema`.

  Attributes:
    init: ``() -> NoiseScaleState``.
    update: ``(state, stats) -> (b_simple, state)``, with ``stats`` a
      :class:`jaxaccum.AccumulationStats` and ``b_simple`` the smoothed noise
      scale ``trace / sq_norm`` of the new state (float32; NaN before any
      finite estimate).

  Example:

    >>> import jaxaccum
    >>> smoother = jaxaccum.noise_scale_ema(decay=0.9)
    >>> isinstance(smoother, jaxaccum.NoiseScaleSmoother)
    True
  """

  init: Callable[[], NoiseScaleState]
  update: Callable[[NoiseScaleState, Any], tuple[jax.Array, NoiseScaleState]]


def noise_scale_ema(decay: float = 0.99) -> NoiseScaleSmoother:
  """Exponential moving averages of the noise-scale estimates, optax style.

  ``update`` folds one step's ``stats.sq_norm_estimate`` and
  ``stats.trace_estimate`` into separate moving averages and returns their
  ratio, the smoothed simple noise scale ``B_simple = tr(Sigma) / |G|^2``: the
  batch size around which doubling the batch stops nearly halving the steps
  needed (McCandlish et al., 2018).

  The averages are bias-corrected as in Adam: after ``t`` updates with
  estimates ``x_1..x_t`` each is ``sum_i decay^(t-i) x_i / sum_i
  decay^(t-i)``, so the first update returns that step's own estimates rather
  than ones shrunk towards the initial zero. Estimates that are not finite
  (NaN with a single micro-batch, or from a step whose gradient overflowed)
  leave the state unchanged. ``init`` and ``update`` are jittable.

  Args:
    decay: weight of the past, in ``[0, 1)`` and below 1 in float32 (at most
      ``1 - 2**-24``); ``0`` keeps only the last step. About
      ``1 / (1 - decay)`` recent steps dominate the average.

  Returns:
    A :class:`jaxaccum.NoiseScaleSmoother` ``(init, update)``.

  Raises:
    TypeError: ``decay`` is not a real number (a ``bool``, a string,
      ``None``); later, ``update`` given a ``state`` or ``stats`` without the
      fields of a :class:`jaxaccum.NoiseScaleState` or
      :class:`jaxaccum.AccumulationStats`, or non-numeric estimates.
    ValueError: ``decay`` outside ``[0, 1)``, or so close to 1 that it rounds
      to 1.0 in float32, the dtype of the averages (above ``1 - 2**-24``).

  Example:

    >>> import jax, jax.numpy as jnp, jaxaccum
    >>> def loss(w, batch):
    ...   x, y = batch
    ...   return jnp.mean((x @ w - y) ** 2)
    >>> step = jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=4, with_stats=True))
    >>> smoother = jaxaccum.noise_scale_ema(decay=0.9)
    >>> state, w = smoother.init(), jnp.zeros(3)
    >>> for i in range(5):
    ...   x = jax.random.normal(jax.random.key(i), (32, 3))
    ...   y = x @ jnp.array([1.0, -1.0, 0.5]) + jax.random.normal(jax.random.key(100 + i), (32,))
    ...   (value, grads), stats = step(w, (x, y))
    ...   b_simple, state = jax.jit(smoother.update)(state, stats)
    ...   w = w - 0.05 * grads
    >>> int(state.count), bool(jnp.isfinite(b_simple))
    (5, True)
  """
  decay_f = _check_decay(decay)

  def init() -> NoiseScaleState:
    zero = jnp.zeros([], jnp.float32)
    return NoiseScaleState(count=jnp.zeros([], jnp.int32), sq_norm=zero, trace=zero)

  def update(state: NoiseScaleState, stats: Any) -> tuple[jax.Array, NoiseScaleState]:
    if not isinstance(state, NoiseScaleState):
      raise TypeError(f"state must be the NoiseScaleState from init() or the previous "
                      f"update, got {type(state).__name__}")
    missing = [f for f in ("sq_norm_estimate", "trace_estimate") if not hasattr(stats, f)]
    if missing:
      raise TypeError(
          f"stats has no {', '.join(missing)}: got {type(stats).__name__}; pass the "
          "AccumulationStats of value_and_grad(..., with_stats=True)")
    sq_norm = _estimate(stats.sq_norm_estimate, "sq_norm_estimate")
    trace = _estimate(stats.trace_estimate, "trace_estimate")
    finite = jnp.logical_and(jnp.isfinite(sq_norm), jnp.isfinite(trace))
    count = state.count + finite.astype(jnp.int32)
    # The bias-corrected average moves towards x by (1 - d) / (1 - d^t): 1 at
    # t = 1, tending to 1 - d (the plain EMA step) as t grows.
    d = jnp.asarray(decay_f, jnp.float32)
    step = (1 - d) / (1 - d ** jnp.maximum(count, 1).astype(jnp.float32))

    def move(avg, x):
      return jnp.where(finite, avg + step * (x - avg), avg)

    new = NoiseScaleState(count=count, sq_norm=move(state.sq_norm, sq_norm),
                          trace=move(state.trace, trace))
    # 0 / 0 = NaN until a finite estimate has arrived.
    return new.trace / new.sq_norm, new

  return NoiseScaleSmoother(init=init, update=update)


# The averages are float32: a decay that rounds to 1.0 there makes the
# bias-correction step 0 / 0.
_LARGEST_DECAY = float(np.nextafter(np.float32(1), np.float32(0)))


def _check_decay(decay: Any) -> float:
  """``decay`` as a float, checked to lie in ``[0, 1)`` in float32 too."""
  if isinstance(decay, bool) or not isinstance(decay, (int, float, np.integer, np.floating)):
    raise TypeError(
        f"decay must be a number in [0, 1), got {decay=!r} of type {type(decay).__name__}")
  if not 0 <= decay < 1:
    raise ValueError(f"decay must be a number in [0, 1), got {decay=!r}")
  if np.float32(decay) >= 1:
    raise ValueError(
        f"{decay=!r} rounds to 1.0 in float32, the dtype the averages are kept "
        f"in, and would make them NaN; pass a decay of at most {_LARGEST_DECAY!r} "
        "(1 - 2**-24)")
  return float(decay)


def _estimate(value: Any, name: str) -> jax.Array:
  """An estimate as a float32 scalar; a non-numeric one is a TypeError."""
  dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
  if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(f"stats.{name} must be a real number or array, got {value!r}")
  return jnp.asarray(value, jnp.float32)
