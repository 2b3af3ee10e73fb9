"""Flax Linen adapters: weighted cycles through ``TrainState``, fp16 loss scaling.

- :class:`TrainState`: ``flax.training.train_state.TrainState`` whose
  ``apply_gradients`` takes ``weight=`` (the weight of this call's gradient in
  a :func:`jaxaccum.multi_steps` cycle, e.g. its number of tokens) and which
  reads the number of optimizer steps (:attr:`TrainState.optimizer_step`).
- Dynamic loss scaling with ``flax.training.dynamic_scale.DynamicScale``, with
  one finiteness decision and one scale adjustment per accumulation cycle:
  :func:`dynamic_scale_value_and_grad` (micro-batches in one step) and
  :func:`scaled_value_and_grad` with :func:`apply_scaled_gradients` (across
  steps).

This module imports flax (the ``flax`` extra: ``pip install 'jaxaccum[flax]'``);
``import jaxaccum`` does not (``jaxaccum.linen`` is imported on first use).

Example:

  >>> import jax.numpy as jnp, optax, jaxaccum
  >>> state = jaxaccum.linen.TrainState.create(
  ...     apply_fn=None, params={"w": jnp.zeros(2)},
  ...     tx=jaxaccum.multi_steps(optax.sgd(1.0), every_k_schedule=2))
  >>> state = state.apply_gradients(grads={"w": jnp.array([1.0, 1.0])}, weight=3.0)
  >>> state = state.apply_gradients(grads={"w": jnp.array([5.0, 5.0])}, weight=1.0)
  >>> state.params["w"].tolist(), int(state.step), int(state.optimizer_step)
  ([-2.0, -2.0], 2, 1)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxaccum import _compat
from jaxaccum._core import dtypes
from jaxaccum._devices.deferred import DeferredGrads
from jaxaccum._steps.state import MultiStepsState, has_updated

# Before flax is imported: without it, the error names the extra to install.
_compat.require_flax("jaxaccum.linen")

from flax.training import train_state  # noqa: E402
from flax.training.dynamic_scale import DynamicScale  # noqa: E402

from jaxaccum._flax.loss_scale import (  # noqa: E402
    all_finite, check_dynamic_scale, dynamic_scale_value_and_grad, scaled_value_and_grad,
    update_dynamic_scale)

__all__ = [
    "TrainState",
    "apply_scaled_gradients",
    "dynamic_scale_value_and_grad",
    "scaled_value_and_grad",
    "update_dynamic_scale",
]


def _is_multi_steps_state(x: Any) -> bool:
  return isinstance(x, MultiStepsState)


def _multi_steps_state(opt_state: Any) -> MultiStepsState | None:
  """The (first) :class:`jaxaccum.MultiStepsState` inside ``opt_state``, if any."""
  for node in jax.tree.leaves(opt_state, is_leaf=_is_multi_steps_state):
    if _is_multi_steps_state(node):
      return node
  return None


def _tx_update(state: train_state.TrainState, grads: Any, weight: Any) -> tuple[Any, Any]:
  """``state.tx.update`` of ``grads``, with ``weight`` when one is given."""
  kwargs = {} if weight is None else {"weight": weight}
  return state.tx.update(grads, state.opt_state, state.params, **kwargs)


class TrainState(train_state.TrainState):
  """A Flax Linen ``TrainState`` that passes a gradient weight to ``tx``.

  With ``tx=jaxaccum.multi_steps(...)``, ``apply_gradients(grads=g,
  weight=n)`` makes each optimizer step use the weighted mean of its calls'
  gradients: with ``n`` the number of non-padding tokens of the call's batch
  and a token-mean loss, exactly the token mean over the whole cycle (an
  unweighted mean of per-call means is not). Only the creation changes
  (``jaxaccum.linen.TrainState.create`` for
  ``flax.training.train_state.TrainState.create``) and the step passes
  ``weight=``.

  ``step`` counts ``apply_gradients`` calls, as in Flax; with
  ``multi_steps`` that is ``k`` times the number of optimizer steps, which
  :attr:`optimizer_step` gives (learning-rate schedules inside ``tx`` already
  advance once per optimizer step).

  Example:

    >>> import jax, jax.numpy as jnp, optax, jaxaccum
    >>> state = jaxaccum.linen.TrainState.create(
    ...     apply_fn=None, params={"w": jnp.zeros(2)},
    ...     tx=jaxaccum.multi_steps(optax.sgd(1.0), every_k_schedule=2))
    >>> state = state.apply_gradients(grads={"w": jnp.array([1.0, 1.0])}, weight=3.0)
    >>> state = state.apply_gradients(grads={"w": jnp.array([5.0, 5.0])}, weight=1.0)
    >>> state.params["w"]  # -(3 * 1 + 1 * 5) / 4
    Array([-2., -2.], dtype=float32)
    >>> int(state.step), int(state.optimizer_step)
    (2, 1)
  """

  def apply_gradients(self, *, grads: Any, weight: jax.typing.ArrayLike | None = None,
                      **kwargs: Any) -> TrainState:
    """Like Flax's ``apply_gradients``; ``weight`` goes to ``tx.update``.

    Args:
      grads: gradients with the structure of ``params``, or the
        :class:`jaxaccum.DeferredGrads` of ``defer_reduction=True`` (for a
        ``tx`` that is a ``multi_steps(data_axis=...)``).
      weight: the weight of these gradients in the accumulation cycle (a
        non-negative scalar); ``None``: no ``weight`` is passed, so any
        ``tx`` works.
      **kwargs: other fields to replace, as in Flax.

    Returns:
      The new state, ``step`` incremented by one.

    Raises:
      ValueError: a Python or NumPy ``weight`` that is NaN, infinite or negative (a
        traced one makes the cycle's update NaN, as in
        :func:`jaxaccum.multi_steps`).
    """
    dtypes.check_static_weight(weight)
    if isinstance(grads, DeferredGrads):
      # Flax's apply_gradients looks for a key in ``grads``; these go to
      # ``tx`` (a ``multi_steps(data_axis=...)``) as they are.
      updates, opt_state = _tx_update(self, grads, weight)
      return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                          opt_state=opt_state, **kwargs)
    if weight is None:
      return super().apply_gradients(grads=grads, **kwargs)
    # Flax's own apply_gradients, with a tx whose update receives the weight.
    tx = self.tx
    weighted = optax.GradientTransformationExtraArgs(
        tx.init, functools.partial(tx.update, weight=weight))
    new_state = super(TrainState, self.replace(tx=weighted)).apply_gradients(
        grads=grads, **kwargs)
    return new_state.replace(tx=tx)

  @property
  def optimizer_step(self) -> jax.Array:
    """Optimizer steps taken: ``gradient_step`` of the ``multi_steps`` state.

    Without a :func:`jaxaccum.multi_steps` in ``tx``, every call is an
    optimizer step and this is ``step``.
    """
    ms_state = _multi_steps_state(self.opt_state)
    return jnp.asarray(self.step if ms_state is None else ms_state.gradient_step)


def apply_scaled_gradients(
    state: train_state.TrainState,
    *,
    grads: Any,
    dynamic_scale: DynamicScale,
    weight: jax.typing.ArrayLike | None = None,
    **kwargs: Any,
) -> tuple[train_state.TrainState, DynamicScale, jax.Array]:
  """``apply_gradients`` with one loss-scale decision per accumulation cycle.

  For ``tx=jaxaccum.multi_steps(...)`` and gradients from
  :func:`scaled_value_and_grad`. An overflow in any call of a cycle makes the
  cycle's accumulated gradient, hence its update, non-finite; on the cycle's
  last call (when the inner optimizer ran) the update is checked once: if it
  is not finite, the parameters, the inner optimizer state and
  ``gradient_step`` stay as they were (the accumulators are emptied for the
  next cycle), and the scale is lowered; if it is finite, it is applied and
  the scale may grow. Calls within a cycle leave the scale alone. Without a
  ``multi_steps`` in ``tx`` every call is a cycle: Flax's own
  ``DynamicScale`` step.

  Args:
    state: a Flax Linen ``TrainState``.
    grads: this call's unscaled gradients.
    dynamic_scale: the ``DynamicScale`` the gradients were computed with.
    weight: as for :meth:`jaxaccum.linen.TrainState.apply_gradients`.
    **kwargs: other fields of ``state`` to replace.

  Returns:
    ``(new_state, new_dynamic_scale, is_fin)``; ``is_fin`` is false only on the
    last call of a cycle that was not applied.

  Raises:
    ValueError: a Python or NumPy ``weight`` that is NaN, infinite or negative, before
      the scale is touched (a traced one makes the cycle non-finite, which
      lowers the scale).

  Example:

    >>> import jax.numpy as jnp, optax, jaxaccum, jaxaccum.linen
    >>> from flax.training.dynamic_scale import DynamicScale
    >>> state = jaxaccum.linen.TrainState.create(
    ...     apply_fn=None, params=jnp.zeros(2), tx=jaxaccum.multi_steps(optax.sgd(1.0), 2))
    >>> ds = DynamicScale()
    >>> for g in [jnp.array([jnp.inf, 1.0]), jnp.array([1.0, 1.0])]:  # an overflow, then not
    ...   state, ds, is_fin = jaxaccum.linen.apply_scaled_gradients(
    ...       state, grads=g, dynamic_scale=ds)
    >>> state.params, bool(is_fin), float(ds.scale)  # the cycle skipped, the scale halved
    (Array([0., 0.], dtype=float32), False, 32768.0)
  """
  check_dynamic_scale(dynamic_scale)
  dtypes.check_static_weight(weight)
  updates, opt_state = _tx_update(state, grads, weight)
  ms_state = _multi_steps_state(opt_state)
  decided = jnp.array(True) if ms_state is None else has_updated(ms_state)
  finite = all_finite(updates)
  keep = jnp.logical_or(jnp.logical_not(decided), finite)
  where = lambda new, old: jax.tree.map(functools.partial(jnp.where, keep), new, old)
  params = where(optax.apply_updates(state.params, updates), state.params)
  if ms_state is None:
    opt_state = where(opt_state, state.opt_state)
  else:
    def restore(new, old):
      if not _is_multi_steps_state(new):
        return new
      return new._replace(inner_opt_state=where(new.inner_opt_state, old.inner_opt_state),
                          gradient_step=where(new.gradient_step, old.gradient_step),
                          updated=jnp.logical_and(new.updated, keep))

    opt_state = jax.tree.map(restore, opt_state, state.opt_state, is_leaf=_is_multi_steps_state)
  adjusted = update_dynamic_scale(dynamic_scale, finite)
  new_scale = jax.tree.map(functools.partial(jnp.where, decided), adjusted, dynamic_scale)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, **kwargs)
  return new_state, new_scale, keep
