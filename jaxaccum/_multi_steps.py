"""Across-step accumulation: an optax transformation, inner update once a cycle."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxaccum import _collectives, _dtypes

Params = Any
Updates = Any
ShouldSkipUpdateFn = Callable[[Updates, jax.Array, Params | None], tuple[jax.Array, Any]]


class MultiStepsState(NamedTuple):
  """State of :func:`jaxaccum.multi_steps`.

  Attributes:
    mini_step: int32, calls accumulated so far in the current cycle.
    gradient_step: int32, completed cycles: updates of the inner optimizer.
    inner_opt_state: the inner optimizer's state; it changes once per cycle.
    acc_grads: the current cycle's sum of (weighted) gradients, in the
      accumulator dtype. Under ``axis_name`` it is device-local until the
      cycle's last call.
    acc_weight: float32, the current cycle's sum of weights (the number of
      accumulated calls without ``weight``).
    skip_state: the second output of ``should_skip_update_fn`` on the last
      call (``()`` without one).

  Example:

    >>> import jax.numpy as jnp, optax, jaxaccum
    >>> state = jaxaccum.multi_steps(optax.adam(1e-3), 4).init(jnp.zeros(3))
    >>> isinstance(state, jaxaccum.MultiStepsState), int(state.mini_step)
    (True, 0)
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  inner_opt_state: Any
  acc_grads: Any
  acc_weight: jax.Array
  skip_state: Any = ()


def _never_skip(updates, gradient_step, params):
  del updates, gradient_step, params
  return jnp.array(False), ()


def multi_steps(
    inner: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.typing.ArrayLike],
    *,
    accumulator_dtype: jax.typing.DTypeLike | None = jnp.float32,
    use_grad_mean: bool = True,
    should_skip_update_fn: ShouldSkipUpdateFn | None = None,
    axis_name: Hashable | Sequence[Hashable] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Accumulates gradients over ``k`` calls; the inner optimizer runs once.

  A drop-in for
  ``optax.MultiSteps(inner, every_k_schedule).gradient_transformation()``: the
  first ``k - 1`` calls of a cycle return zero updates, the ``k``-th returns the
  inner optimizer's update for the cycle's mean gradient. Unlike
  ``optax.MultiSteps``, the inner update is computed only on that call (under
  ``lax.cond``), not on every call and discarded. Roughly this Python loop::

    for call in range(k):
      acc_grads += weight * grads           # weight = 1 by default
      acc_weight += weight
    grads = acc_grads / acc_weight          # use_grad_mean=False: acc_grads
    # with axis_name: both sums are reduced across devices here, once a cycle
    updates, inner_state = inner.update(grads, inner_state, params)
    acc_grads, acc_weight = 0, 0

  Args:
    inner: the optimizer to run once per cycle.
    every_k_schedule: the number of calls ``k`` per cycle, or a function of the
      ``gradient_step`` count returning it.
    accumulator_dtype: the least precise dtype of the accumulated gradients
      (each is kept in this dtype promoted with its parameter's dtype);
      ``None``: the parameter's dtype.
    use_grad_mean: ``True``: the cycle's (weighted) mean gradient; ``False``:
      the (weighted) sum.
    should_skip_update_fn: as in ``optax.MultiSteps``: called as
      ``fn(updates, gradient_step, params)``, returns ``(skip, skip_state)``;
      a skipped call changes nothing, as if it never happened.
    axis_name: for training steps under ``jax.pmap`` or ``jax.shard_map``:
      gradients are accumulated device-locally and reduced across devices over
      this axis only on the cycle's last call.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update takes
    ``(grads, state, params=None, *, weight=None, **extra_args)``; ``weight``
    makes the cycle's gradient the weighted mean of its calls' gradients,
    ``extra_args`` go to the inner optimizer.

  Raises:
    ValueError: ``every_k_schedule`` is an int below 1.

  Example:

    >>> import jax.numpy as jnp, optax, jaxaccum
    >>> opt = jaxaccum.multi_steps(optax.sgd(0.1), every_k_schedule=2)
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jnp.array([1.0, 2.0]), state, params)
    >>> updates, bool(jaxaccum.has_updated(state))
    (Array([0., 0.], dtype=float32), False)
    >>> updates, state = opt.update(jnp.array([3.0, 4.0]), state, params)
    >>> updates, bool(jaxaccum.has_updated(state))
    (Array([-0.2, -0.3], dtype=float32), True)
  """
  if isinstance(every_k_schedule, bool) or (
      isinstance(every_k_schedule, int) and every_k_schedule < 1):
    raise ValueError(f"{every_k_schedule=} must be an int >= 1 or a callable")
  if isinstance(every_k_schedule, int):
    schedule = lambda step, k=every_k_schedule: k
  elif callable(every_k_schedule):
    schedule = every_k_schedule
  else:
    raise ValueError(f"{every_k_schedule=} must be an int >= 1 or a callable")
  inner = optax.with_extra_args_support(inner)
  skip_fn = _never_skip if should_skip_update_fn is None else should_skip_update_fn
  axes = _collectives.axes_of(axis_name)

  def init_fn(params: Params) -> MultiStepsState:
    gradient_step = jnp.zeros([], jnp.int32)
    _, skip_state = skip_fn(optax.tree.zeros_like(params), gradient_step, params)
    return MultiStepsState(
        mini_step=jnp.zeros([], jnp.int32),
        gradient_step=gradient_step,
        inner_opt_state=inner.init(params),
        acc_grads=jax.tree.map(
            lambda p: jnp.zeros_like(p, _dtypes.accumulator_for(accumulator_dtype, p.dtype)),
            params),
        acc_weight=jnp.zeros([], jnp.float32),
        skip_state=skip_state,
    )

  def update_fn(updates: Updates, state: MultiStepsState, params: Params | None = None,
                *, weight: jax.typing.ArrayLike | None = None, **extra_args):
    k = jnp.asarray(schedule(state.gradient_step)).astype(jnp.int32)
    skip, skip_state = skip_fn(updates, state.gradient_step, params)
    skip = jnp.asarray(skip)
    if (skip.dtype, skip.shape) != (jnp.bool_, ()):
      raise ValueError(
          "should_skip_update_fn must return a boolean scalar, got dtype "
          f"{skip.dtype} and shape {skip.shape}")
    if axes and should_skip_update_fn is not None:
      # Devices must agree, or only some would enter the cycle's all-reduce:
      # a call skipped on any device is skipped on all of them.
      skip = lax.pmax(_collectives.to_varying(skip.astype(jnp.int32), axes), axes) > 0
    w = jnp.ones([], jnp.float32) if weight is None else jnp.asarray(weight, jnp.float32)
    # A skipped call, or one of weight zero, adds exactly nothing (not NaN * 0).
    w = jnp.where(skip, jnp.zeros_like(w), w)
    acc_grads = jax.tree.map(lambda acc, g: acc + _dtypes.scale_by_weight(g, w, acc.dtype),
                             state.acc_grads, updates)
    acc_weight = state.acc_weight + w
    mini_step = jnp.where(skip, state.mini_step, optax.safe_increment(state.mini_step))
    emit = jnp.logical_and(jnp.logical_not(skip), mini_step >= k)

    def inner_update(grads, inner_state):
      return inner.update(grads, inner_state, params, **extra_args)

    def finish_cycle(acc_grads, acc_weight, inner_state):
      with jax.named_scope("jaxaccum/multi_steps_update"):
        acc_grads, acc_weight = _collectives.psum((acc_grads, acc_weight), axes)
        if use_grad_mean:
          safe = jnp.where(acc_weight > 0, acc_weight, jnp.ones_like(acc_weight))
          acc_grads = jax.tree.map(lambda a: a / safe.astype(a.dtype), acc_grads)
        new_updates, inner_state = inner_update(
            optax.tree.cast_like(acc_grads, updates), inner_state)
        zeros = optax.tree.zeros_like(acc_grads)
        return (new_updates, inner_state,
                _collectives.to_varying((zeros, jnp.zeros_like(acc_weight)), axes))

    def continue_cycle(acc_grads, acc_weight, inner_state):
      shapes = jax.eval_shape(
          inner_update, optax.tree.cast_like(acc_grads, updates), inner_state)[0]
      zero_updates = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      return (zero_updates, inner_state,
              _collectives.to_varying((acc_grads, acc_weight), axes))

    new_updates, inner_state, (acc_grads, acc_weight) = lax.cond(
        emit, finish_cycle, continue_cycle, acc_grads, acc_weight, state.inner_opt_state)
    new_state = MultiStepsState(
        mini_step=jnp.where(emit, jnp.zeros_like(mini_step), mini_step),
        gradient_step=jnp.where(
            emit, optax.safe_increment(state.gradient_step), state.gradient_step),
        inner_opt_state=inner_state,
        acc_grads=acc_grads,
        acc_weight=acc_weight,
        skip_state=skip_state,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def has_updated(state: MultiStepsState) -> jax.Array:
  """Whether the last call of a :func:`jaxaccum.multi_steps` ended a cycle.

  Args:
    state: the state returned by that call.

  Returns:
    A boolean scalar array: ``True`` right after the inner optimizer ran.

  Example:

    >>> import jax.numpy as jnp, optax, jaxaccum
    >>> opt = jaxaccum.multi_steps(optax.sgd(1.0), every_k_schedule=3)
    >>> bool(jaxaccum.has_updated(opt.init(jnp.zeros(2))))
    False
  """
  return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)
