"""Across-step accumulation: an optax transformation, inner update once a cycle.

Its options are validated when it is built (:mod:`jaxaccum._steps.config`),
its inputs when ``update`` traces (:mod:`jaxaccum._steps.checks`): a value
``multi_steps`` cannot honour is a ``TypeError`` (wrong type) or a
``ValueError`` (wrong value) naming the option, the value and the fix; a
traced value it cannot honour makes the cycle's updates NaN.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxaccum._core import dtypes
from jaxaccum._devices import specs
from jaxaccum._devices.data_axis import DataAxis
from jaxaccum._devices import deferred, parallel
from jaxaccum._devices.deferred import DeferredGrads
from jaxaccum._steps import checks, restore
from jaxaccum._steps.config import Config, Params, ShouldSkipUpdateFn, Updates
from jaxaccum._steps.state import MultiSteps, MultiStepsState



def multi_steps(
    inner: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.typing.ArrayLike],
    use_grad_mean: bool = True,
    should_skip_update_fn: ShouldSkipUpdateFn | None = None,
    *,
    accumulator_dtype: jax.typing.DTypeLike | None = jnp.float32,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    data_axis: Hashable | Sequence[Hashable] | DataAxis | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
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

  Under plain ``jax.jit`` over a mesh, ``data_axis`` keeps the cycle's sum
  device-local (each device's partial sum in its row of an array of shape
  ``(D, *param.shape)``, sharded over the data axes) and reduces it across
  the devices once, on the call that completes the cycle, inside the branch
  that runs the inner optimizer; the ``k - 1`` other calls communicate
  nothing. It takes the :class:`jaxaccum.DeferredGrads` of
  ``jaxaccum.value_and_grad(..., data_axis=..., defer_reduction=True)``, or
  ordinary (already reduced) gradients, which it never reduces again. The
  reduction lands in the parameters' sharding (FSDP: a reduce-scatter), and
  dimensions sharded over other mesh axes (tensor parallelism) are never
  gathered; the inner optimizer then runs on the globally sharded gradient, so
  global norms stay global.

  A value that cannot be honoured is an error where it is static (a Python or
  numpy ``weight`` that is NaN, infinite or negative is a ``ValueError``) and NaN where
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
      ``has_updated`` is then ``False``. With ``data_axis`` it sees the
      partial sums (each leaf with its leading device axis).
    accumulator_dtype: the least precise floating dtype of the accumulated
      gradients (each is kept in this dtype promoted with its parameter's
      dtype); ``None``: the parameter's dtype.
    axis_name: for training steps under ``jax.pmap`` or ``jax.shard_map``:
      gradients are accumulated device-locally and reduced across devices over
      this axis only on the cycle's last call.
    data_axis: for training steps under plain ``jax.jit`` over a batch
      sharded along this mesh axis (or tuple of axes, e.g. HSDP's
      ``("replica", "data")``), or a :class:`jaxaccum.DataAxis`: see above.
      The name must match the gradient function's ``data_axis``: give both
      the same ``DataAxis`` to configure them once.
    mesh: with ``data_axis``, the ``jax.sharding.Mesh``; ``None``: the mesh
      set with ``jax.set_mesh`` when ``init`` and ``update`` run.
    param_specs: with ``data_axis`` on Auto mesh axes, the parameters'
      ``PartitionSpec`` pytree (or a prefix of it), as for
      ``jaxaccum.value_and_grad``: on Auto axes a sharding is invisible inside
      ``jit``; ``None``: replicated. On Explicit axes the arrays' types give
      it (pass ``params`` to ``update``, as optax does, for FSDP).

  Returns:
    A :class:`~jaxaccum._steps.state.MultiSteps` (an
    ``optax.GradientTransformationExtraArgs``) whose update takes
    ``(grads, state, params=None, *, weight=None, **extra_args)``; ``weight``
    (a non-negative scalar) makes the cycle's gradient the weighted mean of
    its calls' gradients, ``extra_args`` go to the inner optimizer.

  Raises:
    TypeError: an option of the wrong type (``every_k_schedule`` a float or a
      bool, ``should_skip_update_fn`` not callable, ...);
      :class:`jaxaccum.DeferredGrads` given to a ``multi_steps`` without
      ``data_axis``.
    ValueError: ``every_k_schedule`` below 1, a non-floating
      ``accumulator_dtype``, both ``axis_name`` and ``data_axis``, ``mesh`` or
      ``param_specs`` without ``data_axis``, a ``data_axis`` the mesh lacks,
      gradients deferred over other axes than ``data_axis``; a static
      ``weight`` that is NaN, infinite or negative (at ``update``).

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

    Under ``jax.jit`` over a mesh, the accumulator holds one row per device:

    >>> import jax
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> opt = jaxaccum.multi_steps(optax.sgd(0.1), 2, data_axis="data", mesh=mesh)
    >>> opt.init(params).acc_grads.shape == (jax.device_count(), 2)
    True
  """
  cfg = Config.create(
      inner, every_k_schedule=every_k_schedule, use_grad_mean=use_grad_mean,
      should_skip_update_fn=should_skip_update_fn, accumulator_dtype=accumulator_dtype,
      axis_name=axis_name, data_axis=data_axis, mesh=mesh, param_specs=param_specs)

  def update_fn(updates: Updates, state: MultiStepsState, params: Params | None = None,
                *, weight: jax.typing.ArrayLike | None = None, **extra_args):
    if cfg.data is not None:
      # nnx.Optimizer.update hands DeferredGrads on as an nnx.State.
      caller = sys._getframe(1).f_globals.get("__name__", "")
      updates = deferred.from_nnx_optimizer(updates, params, cfg.data.devices(),
                                            cfg.data.axes, caller)
    return _update(cfg, updates, state, params, weight, extra_args)

  return MultiSteps.create(functools.partial(_init, cfg), update_fn, cfg)


def _init(cfg: Config, params: Params) -> MultiStepsState:
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


def _zero_sums(cfg: Config, params: Params) -> Any:
  dtype_of = functools.partial(dtypes.accumulator_for, cfg.accumulator_dtype)
  if cfg.data is not None:
    return cfg.data.zeros(params, dtype_of)
  return jax.tree.map(lambda p: jnp.zeros_like(p, dtype_of(p.dtype)), params)


def _update(cfg: Config, updates: Updates, state: MultiStepsState, params: Params | None,
            weight: jax.typing.ArrayLike | None, extra_args: dict[str, Any]):
  """One call: add ``updates`` to the cycle; on its last call, run the inner update."""
  acc_grads = restore.converted(cfg, updates, state.acc_grads)
  grads = checks.incoming(cfg, updates, acc_grads)
  parallel.check_bound(cfg.axis_name)
  k = checks.every_k(cfg.schedule, state.gradient_step)
  skip, skip_state = cfg.skip_fn(grads, state.gradient_step, params)
  skip = checks.checked_skip(skip, cfg.axis_name if cfg.shared_skip else ())
  w = jnp.ones([], jnp.float32) if weight is None else checks.checked_weight(weight)
  # A skipped call, or one of weight zero, adds exactly nothing (not NaN * 0).
  w = jnp.where(skip, jnp.zeros_like(w), w)
  acc_grads = jax.tree.map(lambda acc, g: acc + dtypes.scale_by_weight(g, w, acc.dtype),
                           acc_grads, grads)
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


def _cycle_end(cfg: Config, k: jax.Array, emit: jax.Array, inner_update: Callable,
               operands: tuple[Any, jax.Array, Any], params: Params | None):
  """Where ``emit``: the inner update of the cycle's gradient, and empty sums.

  Elsewhere zero updates (of the inner update's dtypes and shardings) and the
  sums as they are.
  """
  axes = cfg.axis_name

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
        acc_grads = jax.tree.map(lambda a: dtypes.ratio(a, acc_weight), acc_grads)
      # A schedule value the cycle cannot honour (k < 1) makes it NaN.
      acc_grads = jax.tree.map(
          lambda a: jnp.where(k < 1, jnp.full_like(a, np.nan), a), acc_grads)
      new_updates, new_state = inner_update(acc_grads, inner_state)
      return (new_updates, _cast_like_state(new_state, inner_state),
              specs.to_varying((zeros, jnp.zeros_like(acc_weight)), axes))

  def continue_cycle(acc_grads, acc_weight, inner_state):
    grads = jax.eval_shape(reduced, acc_grads, acc_weight)[0] if cfg.data else acc_grads
    shapes, state_shapes = jax.eval_shape(inner_update, grads, inner_state)
    zero_updates = jax.tree.map(_zeros_of, shapes)
    if not axes:  # with axis_name the inner update sees reduced, invariant sums
      zero_updates, inner_state = specs.varying_like((zero_updates, inner_state),
                                                (shapes, state_shapes))
    return (zero_updates, inner_state,
            specs.to_varying((acc_grads, acc_weight), axes))

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


def _cast_like_state(new: Any, old: Any) -> Any:
  """The new inner state in the old one's dtypes and (on Explicit axes)
  shardings, so both cond branches agree."""
  def cast(n, o):
    if hasattr(n, "dtype") and hasattr(o, "dtype") and n.dtype != o.dtype:
      n = jnp.asarray(n).astype(o.dtype)
    if hasattr(n, "dtype") and hasattr(o, "dtype"):
      old = specs.spec_of(o)
      if specs.spec_of(n) != old and (_named(old) or _named(specs.spec_of(n))):
        n = jax.sharding.reshard(n, jax.typeof(o).sharding)
    return n

  return jax.tree.map(cast, new, old)
