"""The state of ``multi_steps``, the transformation it returns, ``has_updated``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaccum._core import dtypes


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
      cycle's last call. With ``data_axis`` each leaf has shape ``(D,
      *param.shape)`` (``D`` devices along the data axes), sharded over them
      on its leading dimension: each device's running sum in its own row,
      as in :class:`jaxaccum.DeferredGrads`; the rows sum to the cycle's sum.
      A state restored with another ``D``, or with / without ``data_axis``,
      is converted on the first ``update`` (its rows summed, never broadcast;
      ``docs/multi_steps.md``).
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

  @classmethod
  def create(cls, init: Any, update: Any, config: Any) -> MultiSteps:
    """The transformation, holding its validated options (a
    :class:`jaxaccum._steps.config.Config`)."""
    ms = cls(init, update)
    # A NamedTuple's fields are init and update: the options ride beside them.
    ms.__dict__["config"] = config
    return ms

  @property
  def config(self) -> Any:
    """The validated options of :func:`jaxaccum.multi_steps`."""
    return self.__dict__["config"]

  @property
  def inner_opt(self) -> optax.GradientTransformation:
    """The inner optimizer, as given to :func:`jaxaccum.multi_steps`."""
    return self.config.inner_opt

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
    rounding). With ``data_axis`` the sum becomes the accumulator's rows
    (placed, not reduced again), on the mesh of ``multi_steps``.

    Args:
      optax_state: the ``optax.MultiStepsState``.

    Returns:
      The equivalent :class:`jaxaccum.MultiStepsState`.
    """
    mini_step = jnp.asarray(optax_state.mini_step, jnp.int32)
    count = mini_step.astype(jnp.float32)
    config = self.config
    use_grad_mean, accumulator_dtype, data = (config.use_grad_mean,
                                              config.accumulator_dtype, config.data)

    def to_sum(acc):
      acc = acc.astype(dtypes.accumulator_for(accumulator_dtype, acc.dtype))
      return acc * count.astype(acc.dtype) if use_grad_mean else acc

    gradient_step = jnp.asarray(optax_state.gradient_step, jnp.int32)
    acc_grads = jax.tree.map(to_sum, optax_state.acc_grads)
    if data is not None:
      acc_grads = data.partials(acc_grads, data.zeros(acc_grads, lambda dtype: dtype))
    return MultiStepsState(
        mini_step=mini_step, gradient_step=gradient_step,
        inner_opt_state=optax_state.inner_opt_state,
        acc_grads=acc_grads,
        acc_weight=count, skip_state=optax_state.skip_state,
        updated=jnp.logical_and(mini_step == 0, gradient_step > 0))


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
