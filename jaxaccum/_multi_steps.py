"""Across-step accumulation: an optax transformation, inner update once a cycle.

Options and inputs are validated here too: a value ``multi_steps`` cannot
honour is a ``TypeError`` (wrong type) or a ``ValueError`` (wrong value)
naming the option, the value and the fix, where it is known when tracing;
a traced value it cannot honour makes the cycle's updates NaN.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxaccum import _dtypes, _options, _sharded
from jaxaccum._deferred import DeferredGrads
from jaxaccum._multi_steps_sharded import DataCycle

Params = Any
Updates = Any
ShouldSkipUpdateFn = Callable[[Updates, jax.Array, Params | None], tuple[jax.Array, Any]]


class MultiStepsState(NamedTuple):
  """State of :func:`jaxaccum.multi_steps`.

  The fields of ``optax.MultiStepsState`` (``mini_step``, ``gradient_step``,
  ``inner_opt_state``, ``acc_grads``, ``skip_state``) with the same meaning,
  except that ``acc_grads`` holds a sum, not a running mean, and two more.

  Attributes:
    mini_step: int32, calls accumulated so far in the current cycle (a call
      skipped by ``should_skip_update_fn`` does not count).
    gradient_step: int32, completed cycles: updates of the inner optimizer.
    inner_opt_state: the inner optimizer's state; it changes once per cycle.
    acc_grads: the current cycle's sum of (weighted) gradients, in the
      accumulator dtype. Under ``axis_name`` it is device-local until the
      cycle's last call.
    acc_weight: float32, the current cycle's sum of weights (the number of
      accumulated calls without ``weight``).
    skip_state: the second output of ``should_skip_update_fn`` on the last
      call (``()`` without one).
    updated: bool, whether the call that returned this state ran the inner
      optimizer (what :func:`jaxaccum.has_updated` reads).

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
  updated: Any = np.bool_(False)


class MultiSteps(optax.GradientTransformationExtraArgs):
  """What :func:`jaxaccum.multi_steps` returns.

  An ``optax.GradientTransformationExtraArgs`` (``init, update = ms`` and
  ``optax.chain`` work) with the methods of ``optax.MultiSteps``.

  Example:

    >>> import jax.numpy as jnp, optax, jaxaccum
    >>> ms = jaxaccum.multi_steps(optax.sgd(0.1), 2)
    >>> isinstance(ms, optax.GradientTransformation), bool(ms.has_updated(ms.init(jnp.zeros(2))))
    (True, False)
  """

  @property
  def inner_opt(self) -> optax.GradientTransformation:
    """The inner optimizer, as given to :func:`jaxaccum.multi_steps`."""
    return self.__dict__["inner_opt"]

  def has_updated(self, state: MultiStepsState) -> jax.Array:
    """Same as :func:`jaxaccum.has_updated`."""
    return has_updated(state)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """``init`` and ``update`` as a plain ``optax.GradientTransformationExtraArgs``."""
    return optax.GradientTransformationExtraArgs(self.init, self.update)

  def state_from_optax(self, optax_state: Any) -> MultiStepsState:
    """Converts an ``optax.MultiStepsState`` (saved mid-cycle, say) to this state.

    The inner optimizer, ``use_grad_mean`` and ``every_k_schedule`` must be
    those the ``optax.MultiSteps`` had. ``optax.MultiSteps`` keeps the running
    mean of the cycle's gradients (with ``use_grad_mean``), this state their
    sum: the sum is recovered as ``mini_step`` times the mean (exact up to
    rounding).

    Args:
      optax_state: the ``optax.MultiStepsState``.

    Returns:
      The equivalent :class:`jaxaccum.MultiStepsState`.
    """
    mini_step = jnp.asarray(optax_state.mini_step, jnp.int32)
    count = mini_step.astype(jnp.float32)
    use_grad_mean, accumulator_dtype = self.__dict__["options"]

    def to_sum(acc):
      acc = acc.astype(_dtypes.accumulator_for(accumulator_dtype, acc.dtype))
      return acc * count.astype(acc.dtype) if use_grad_mean else acc

    gradient_step = jnp.asarray(optax_state.gradient_step, jnp.int32)
    return MultiStepsState(
        mini_step=mini_step, gradient_step=gradient_step,
        inner_opt_state=optax_state.inner_opt_state,
        acc_grads=jax.tree.map(to_sum, optax_state.acc_grads),
        acc_weight=count, skip_state=optax_state.skip_state,
        updated=jnp.logical_and(mini_step == 0, gradient_step > 0))


def _never_skip(updates, gradient_step, params):
  del updates, gradient_step, params
  return jnp.array(False), ()


def multi_steps(
    inner: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.typing.ArrayLike],
    use_grad_mean: bool = True,
    should_skip_update_fn: ShouldSkipUpdateFn | None = None,
    *,
    accumulator_dtype: jax.typing.DTypeLike | None = jnp.float32,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    data_axis: Hashable | Sequence[Hashable] | None = None,
    mesh: Any = None,
    param_specs: Any = None,
) -> MultiSteps:
  """Accumulates gradients over ``k`` calls; the inner optimizer runs once.

  A drop-in for ``optax.MultiSteps(inner, every_k_schedule, use_grad_mean,
  should_skip_update_fn)``: the first ``k - 1`` calls of a cycle return zero
  updates, the ``k``-th returns the inner optimizer's update for the cycle's
  mean gradient. The result is itself the transformation (``ms.init``,
  ``ms.update``, usable in ``optax.chain``, ``TrainState(tx=...)`` and
  ``nnx.Optimizer``) and also has ``ms.has_updated(state)``,
  ``ms.gradient_transformation()`` and ``ms.inner_opt``. Unlike
  ``optax.MultiSteps``, the inner update is computed only on a cycle's last
  call (under ``lax.cond``), not on every call and discarded. Roughly this
  Python loop::

    for call in range(k):
      acc_grads += weight * grads           # weight = 1 by default
      acc_weight += weight
    grads = acc_grads / acc_weight          # use_grad_mean=False: acc_grads
    # with axis_name: both sums are reduced across devices here, once a cycle
    updates, inner_state = inner.update(grads, inner_state, params)
    acc_grads, acc_weight = 0, 0

  The state (:class:`jaxaccum.MultiStepsState`) holds the sum of the cycle's
  gradients and of its weights, where ``optax.MultiStepsState`` holds a running
  mean; ``ms.state_from_optax`` converts the latter, so training started with
  ``optax.MultiSteps`` resumes from its checkpoint, even mid-cycle. The new
  inner state is cast to the dtypes of the old one (as ``optax.MultiSteps``
  does), so an inner state that follows bfloat16 parameters stays bfloat16 when
  the gradients are float32.

  A value that cannot be honoured is an error where it is static and NaN where
  it is traced: a traced ``weight`` that is NaN or negative, or a traced
  ``every_k_schedule`` result below 1, makes the cycle's gradient (hence its
  updates) NaN; ``should_skip_update_fn=optax.skip_not_finite`` cannot catch
  those, since it inspects the incoming gradients.

  Args:
    inner: the optimizer to run once per cycle.
    every_k_schedule: the number of calls ``k`` per cycle (an integer >= 1), or
      a function of the ``gradient_step`` count returning it as an integer
      scalar (an integer array or Python int; a float is a ``TypeError``).
    use_grad_mean: ``True``: the cycle's (weighted) mean gradient; ``False``:
      the (weighted) sum.
    should_skip_update_fn: as in ``optax.MultiSteps``: called as
      ``fn(updates, gradient_step, params)``, returns ``(skip, skip_state)``;
      a skipped call changes nothing, as if it never happened, except that
      ``has_updated`` is then ``False``.
    accumulator_dtype: the least precise floating dtype of the accumulated
      gradients (each is kept in this dtype promoted with its parameter's
      dtype); ``None``: the parameter's dtype.
    axis_name: for training steps under ``jax.pmap`` or ``jax.shard_map``:
      gradients are accumulated device-locally and reduced across devices over
      this axis only on the cycle's last call.

  Returns:
    A :class:`~jaxaccum._multi_steps.MultiSteps` (an
    ``optax.GradientTransformationExtraArgs``) whose update takes
    ``(grads, state, params=None, *, weight=None, **extra_args)``; ``weight``
    (a non-negative scalar) makes the cycle's gradient the weighted mean of
    its calls' gradients, ``extra_args`` go to the inner optimizer.

  Raises:
    TypeError: an option of the wrong type (``every_k_schedule`` a float or a
      bool, ``should_skip_update_fn`` not callable, ...).
    ValueError: ``every_k_schedule`` below 1, a non-floating
      ``accumulator_dtype``.

  Example:

    >>> import jax.numpy as jnp, optax, jaxaccum
    >>> opt = jaxaccum.multi_steps(optax.sgd(0.1), every_k_schedule=2)
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jnp.array([1.0, 2.0]), state, params)
    >>> updates, bool(opt.has_updated(state))
    (Array([0., 0.], dtype=float32), False)
    >>> updates, state = opt.update(jnp.array([3.0, 4.0]), state, params)
    >>> updates, bool(opt.has_updated(state))
    (Array([-0.2, -0.3], dtype=float32), True)
  """
  _check_inner(inner)
  _check_bool(use_grad_mean=use_grad_mean)
  _check_skip_fn(should_skip_update_fn)
  cfg = _Config(
      inner=optax.with_extra_args_support(inner),
      schedule=_schedule_of(every_k_schedule),
      use_grad_mean=bool(use_grad_mean),
      skip_fn=_never_skip if should_skip_update_fn is None else should_skip_update_fn,
      shared_skip=should_skip_update_fn is not None,
      accumulator_dtype=_dtypes.check_accumulator_dtype(accumulator_dtype),
      axis_name=axis_name,
      axes=_options.axes_of("axis_name", axis_name),
      data=_data_cycle(axis_name, data_axis, mesh, param_specs),
  )

  def update_fn(updates: Updates, state: MultiStepsState, params: Params | None = None,
                *, weight: jax.typing.ArrayLike | None = None, **extra_args):
    return _update(cfg, updates, state, params, weight, extra_args)

  ms = MultiSteps(functools.partial(_init, cfg), update_fn)
  ms.__dict__.update(inner_opt=inner, options=(cfg.use_grad_mean, cfg.accumulator_dtype))
  return ms


class _Config(NamedTuple):
  """``multi_steps``'s options, validated."""

  inner: optax.GradientTransformationExtraArgs
  schedule: Callable[[jax.Array], Any]
  use_grad_mean: bool
  skip_fn: ShouldSkipUpdateFn
  shared_skip: bool  # devices agree on the skip decision (a user's skip_fn)
  accumulator_dtype: Any
  axis_name: Any
  axes: tuple[Hashable, ...]
  data: DataCycle | None  # with data_axis: the partial-sums accumulator


def _init(cfg: _Config, params: Params) -> MultiStepsState:
  gradient_step = jnp.zeros([], jnp.int32)
  _, skip_state = cfg.skip_fn(optax.tree.zeros_like(params), gradient_step, params)
  return MultiStepsState(
      mini_step=jnp.zeros([], jnp.int32),
      gradient_step=gradient_step,
      inner_opt_state=cfg.inner.init(params),
      acc_grads=_zero_sums(cfg, params),
      acc_weight=jnp.zeros([], jnp.float32),
      skip_state=skip_state,
      updated=jnp.zeros([], jnp.bool_),
  )


def _zero_sums(cfg: _Config, params: Params) -> Any:
  dtype_of = functools.partial(_dtypes.accumulator_for, cfg.accumulator_dtype)
  if cfg.data is not None:
    return cfg.data.zeros(params, dtype_of)
  return jax.tree.map(lambda p: jnp.zeros_like(p, dtype_of(p.dtype)), params)


def _update(cfg: _Config, updates: Updates, state: MultiStepsState, params: Params | None,
            weight: jax.typing.ArrayLike | None, extra_args: dict[str, Any]):
  """One call: add ``updates`` to the cycle; on its last call, run the inner update."""
  grads = _incoming(cfg, updates, state.acc_grads)
  _check_axes_bound(cfg.axis_name, cfg.axes)
  k = _every_k(cfg.schedule, state.gradient_step)
  skip, skip_state = cfg.skip_fn(grads, state.gradient_step, params)
  skip = _checked_skip(skip, cfg.axes if cfg.shared_skip else ())
  w = jnp.ones([], jnp.float32) if weight is None else _checked_weight(weight)
  # A skipped call, or one of weight zero, adds exactly nothing (not NaN * 0).
  w = jnp.where(skip, jnp.zeros_like(w), w)
  acc_grads = jax.tree.map(lambda acc, g: acc + _dtypes.scale_by_weight(g, w, acc.dtype),
                           state.acc_grads, grads)
  acc_weight = state.acc_weight + w
  mini_step = jnp.where(skip, state.mini_step, optax.safe_increment(state.mini_step))
  emit = jnp.logical_and(jnp.logical_not(skip), mini_step >= k)
  # The inner optimizer sees gradients of the dtypes it would be given directly.
  like = params if isinstance(updates, DeferredGrads) else updates

  def inner_update(grads, inner_state):
    if like is not None:
      grads = optax.tree.cast_like(grads, like)
    return cfg.inner.update(grads, inner_state, params, **extra_args)

  new_updates, inner_state, (acc_grads, acc_weight) = _cycle_end(
      cfg, k, emit, inner_update, (acc_grads, acc_weight, state.inner_opt_state), params)
  new_state = MultiStepsState(
      mini_step=jnp.where(emit, jnp.zeros_like(mini_step), mini_step),
      gradient_step=jnp.where(
          emit, optax.safe_increment(state.gradient_step), state.gradient_step),
      inner_opt_state=inner_state,
      acc_grads=acc_grads,
      acc_weight=acc_weight,
      skip_state=skip_state,
      updated=emit,
  )
  return new_updates, new_state


def _cycle_end(cfg: _Config, k: jax.Array, emit: jax.Array, inner_update: Callable,
               operands: tuple[Any, jax.Array, Any], params: Params | None):
  """Where ``emit``: the inner update of the cycle's gradient, and empty sums.

  Elsewhere zero updates (of the inner update's dtypes and shardings) and the
  sums as they are.
  """
  axes = cfg.axes

  def reduced(acc_grads, acc_weight):
    if axes:
      return lax.psum((acc_grads, acc_weight), axes)
    if cfg.data is not None:
      return cfg.data.reduce(acc_grads, params), acc_weight
    return acc_grads, acc_weight

  def finish_cycle(acc_grads, acc_weight, inner_state):
    with jax.named_scope("jaxaccum/multi_steps_update"):
      zeros = optax.tree.zeros_like(acc_grads)
      acc_grads, acc_weight = reduced(acc_grads, acc_weight)
      if cfg.use_grad_mean:
        acc_grads = jax.tree.map(lambda a: _dtypes.ratio(a, acc_weight), acc_grads)
      # A schedule value the cycle cannot honour (k < 1) makes it NaN.
      acc_grads = jax.tree.map(
          lambda a: jnp.where(k < 1, jnp.full_like(a, np.nan), a), acc_grads)
      new_updates, new_state = inner_update(acc_grads, inner_state)
      return (new_updates, _cast_like_state(new_state, inner_state),
              _sharded.to_varying((zeros, jnp.zeros_like(acc_weight)), axes))

  def continue_cycle(acc_grads, acc_weight, inner_state):
    grads = jax.eval_shape(reduced, acc_grads, acc_weight)[0] if cfg.data else acc_grads
    shapes = jax.eval_shape(inner_update, grads, inner_state)[0]
    zero_updates = jax.tree.map(_zeros_of, shapes)
    return (zero_updates, inner_state,
            _sharded.to_varying((acc_grads, acc_weight), axes))

  return lax.cond(emit, finish_cycle, continue_cycle, *operands)


def _zeros_of(shape: jax.ShapeDtypeStruct) -> jax.Array:
  """Zeros of ``shape``, with its sharding where its type has one (Explicit axes),
  so that both branches of the cycle's ``lax.cond`` have the same types."""
  sharding = getattr(shape, "sharding", None)
  if not _named(getattr(sharding, "spec", P())):
    return jnp.zeros(shape.shape, shape.dtype)
  return jnp.zeros(shape.shape, shape.dtype, out_sharding=sharding)


def _named(spec: P) -> bool:
  return any(entry is not None for entry in spec)


def has_updated(state: MultiStepsState) -> jax.Array:
  """Whether the last call of a :func:`jaxaccum.multi_steps` ran the inner optimizer.

  ``True`` right after a call that ended a cycle; ``False`` after a call that
  ``should_skip_update_fn`` skipped, even if the call before it ended a cycle.
  (``optax.MultiSteps.has_updated`` reads ``mini_step == 0 and gradient_step >
  0``, which is also true after such a skipped call; a state without the
  ``updated`` field, such as ``optax.MultiStepsState``, is read that way.)

  Args:
    state: the state returned by that call.

  Returns:
    A boolean scalar array.

  Example:

    >>> import jax.numpy as jnp, optax, jaxaccum
    >>> opt = jaxaccum.multi_steps(optax.sgd(1.0), every_k_schedule=3)
    >>> bool(jaxaccum.has_updated(opt.init(jnp.zeros(2))))
    False
  """
  updated = getattr(state, "updated", None)
  if updated is None:
    return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)
  return jnp.asarray(updated, jnp.bool_)


def _cast_like_state(new: Any, old: Any) -> Any:
  """The new inner state in the old one's dtypes and (on Explicit axes)
  shardings, so both cond branches agree."""
  def cast(n, o):
    if hasattr(n, "dtype") and hasattr(o, "dtype") and n.dtype != o.dtype:
      n = jnp.asarray(n).astype(o.dtype)
    if hasattr(n, "dtype") and hasattr(o, "dtype"):
      old = _sharded.spec_of(o)
      if _sharded.spec_of(n) != old and (_named(old) or _named(_sharded.spec_of(n))):
        n = jax.sharding.reshard(n, jax.typeof(o).sharding)
    return n

  return jax.tree.map(cast, new, old)


# --- validation: what is known when tracing is an error naming the option ---


def _check_inner(inner: Any) -> None:
  if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
    hint = " (call it: optax.adam(1e-3), not optax.adam)" if callable(inner) else ""
    raise TypeError(f"inner={inner!r} is not an optax.GradientTransformation{hint}")


def _check_skip_fn(should_skip_update_fn: Any) -> None:
  if should_skip_update_fn is not None and not callable(should_skip_update_fn):
    raise TypeError(f"{should_skip_update_fn=} is not callable; pass a function "
                    "(updates, gradient_step, params) -> (skip, skip_state), or None")


def _check_bool(**option: Any) -> None:
  (name, value), = option.items()
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name}={value!r} must be True or False")


def _schedule_of(every_k_schedule: Any) -> Callable[[jax.Array], Any]:
  """``every_k_schedule`` as a function of ``gradient_step``, validated."""
  name = f"every_k_schedule={every_k_schedule!r}"
  if isinstance(every_k_schedule, (bool, np.bool_)):
    raise TypeError(f"{name} is a bool; pass an integer >= 1 or a function of the step")
  if isinstance(every_k_schedule, (np.ndarray, jax.Array)) and not callable(every_k_schedule):
    if every_k_schedule.shape != () or not jnp.issubdtype(every_k_schedule.dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer >= 1 or a function of the step")
    every_k_schedule = int(every_k_schedule)
  if isinstance(every_k_schedule, numbers.Integral):
    if every_k_schedule < 1:
      raise ValueError(f"{name} must be an integer >= 1 (calls per optimizer step)")
    k = int(every_k_schedule)
    return lambda step: k
  if isinstance(every_k_schedule, numbers.Real):
    raise TypeError(f"{name} is not an integer; pass an int >= 1, e.g. "
                    "every_k_schedule=4, or a function of the step")
  if not callable(every_k_schedule):
    raise TypeError(f"{name} must be an integer >= 1 or a function of the step")
  return every_k_schedule


def _every_k(schedule: Callable[[jax.Array], Any], gradient_step: jax.Array) -> jax.Array:
  """The schedule's ``k`` as int32; a static value below 1 is an error."""
  k = schedule(gradient_step)
  k_arr = k if isinstance(k, jax.core.Tracer) else np.asarray(k)
  if not jnp.issubdtype(k_arr.dtype, jnp.integer):
    raise TypeError(f"every_k_schedule returned {k!r} of dtype {k_arr.dtype}; it must "
                    "return an integer (e.g. jnp.where(step < 10, 1, 4), not 4.0)")
  if k_arr.shape != ():
    raise ValueError(f"every_k_schedule returned shape {k_arr.shape}; it must return "
                     "a scalar")
  if isinstance(k_arr, np.ndarray) and int(k_arr) < 1:
    raise ValueError(f"every_k_schedule returned {int(k_arr)}; it must return an "
                     "integer >= 1 (calls per optimizer step)")
  return jnp.asarray(k_arr).astype(jnp.int32)


def _checked_skip(skip: Any, axes: tuple[Hashable, ...]) -> jax.Array:
  skip = jnp.asarray(skip)
  if (skip.dtype, skip.shape) != (jnp.bool_, ()):
    raise ValueError(
        "should_skip_update_fn must return a boolean scalar, got dtype "
        f"{skip.dtype} and shape {skip.shape}")
  if axes:
    # Devices must agree, or only some would enter the cycle's all-reduce:
    # a call skipped on any device is skipped on all of them.
    skip = lax.pmax(_sharded.to_varying(skip.astype(jnp.int32), axes), axes) > 0
  return skip


def _check_structure(updates: Updates, acc_grads: Any) -> None:
  got, want = jax.tree.structure(updates), jax.tree.structure(acc_grads)
  if got != want:
    raise ValueError(
        "multi_steps: the gradients do not have the structure of the parameters "
        f"the state was initialized with: got {got}, expected {want}; pass "
        "gradients of the same pytree as the params given to init")


def _check_axes_bound(axis_name: Any, axes: tuple[Hashable, ...]) -> None:
  for a in axes:
    try:
      lax.axis_size(a)
    except NameError:
      raise ValueError(
          f"{axis_name=} is not bound here: multi_steps(axis_name=...) is for "
          "updates called inside jax.pmap or jax.shard_map over that axis; under "
          "plain jax.jit over sharded arrays, leave axis_name=None") from None


def _data_cycle(axis_name: Any, data_axis: Any, mesh: Any, param_specs: Any) -> DataCycle | None:
  axes = _options.axes_of("data_axis", data_axis)
  if axes and axis_name is not None:
    raise ValueError(f"give axis_name or data_axis, not both: {axis_name=}, {data_axis=}; "
                     "axis_name inside pmap / shard_map, data_axis under plain jit")
  if not axes:
    for name, value in (("mesh", mesh), ("param_specs", param_specs)):
      if value is not None:
        raise ValueError(f"multi_steps({name}=...) is only used with data_axis=; "
                         "pass data_axis= too")
    return None
  if mesh is not None and not hasattr(mesh, "axis_names"):
    raise TypeError(f"multi_steps(mesh={mesh!r}) must be a jax.sharding.Mesh (or None "
                    "for the mesh of jax.set_mesh)")
  return DataCycle(axes, mesh, param_specs)


def _incoming(cfg: _Config, updates: Any, acc_grads: Any) -> Any:
  """The call's gradients, in the accumulator's form."""
  if isinstance(updates, DeferredGrads) and cfg.data is None:
    raise TypeError(
        f"multi_steps got DeferredGrads (not yet reduced over {updates.axes}) but was "
        f"built without data_axis; pass multi_steps(..., data_axis={updates.axes!r}) "
        "to reduce them once a cycle, or drop defer_reduction=True")
  _check_structure(updates.partials if isinstance(updates, DeferredGrads) else updates,
                   acc_grads)
  return updates if cfg.data is None else cfg.data.partials(updates, acc_grads)


def _checked_weight(weight: Any) -> jax.Array:
  """``weight`` as float32; a static NaN or negative one is an error, a traced
  one becomes NaN (see ``multi_steps``)."""
  if isinstance(weight, (numbers.Real, np.ndarray, np.generic)) and not isinstance(
      weight, (bool, np.bool_)):
    value = np.asarray(weight, np.float64)
    if value.shape == () and not value >= 0:
      raise ValueError(f"weight={weight!r} must be a number >= 0 (a NaN or negative "
                       "weight has no weighted mean); pass weight=0.0 to leave a call out")
  return _dtypes.checked_weight(weight, "weight").astype(jnp.float32)

