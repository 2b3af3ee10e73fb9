"""``multi_steps``'s options as typed fields, validated by the one option table.

Each option is checked by its definition in :mod:`jaxaccum._core.options`
(shared with ``value_and_grad``: ``accumulator_dtype``, ``axis_name``,
``data_axis``, ``mesh``, ``param_specs``), so a check and its message exist
once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxaccum._core import options
from jaxaccum._steps.cycle import DataCycle

Params = Any
Updates = Any
ShouldSkipUpdateFn = Callable[[Updates, jax.Array, Params | None], tuple[jax.Array, Any]]


def _never_skip(updates, gradient_step, params):
  del updates, gradient_step, params
  return jnp.array(False), ()


class Config(NamedTuple):
  """The validated options of one ``multi_steps``.

  Attributes:
    inner_opt: the inner optimizer as given.
    inner: the same, taking extra arguments.
    schedule: ``every_k_schedule`` as a function of ``gradient_step``.
    use_grad_mean: the cycle's mean (else its sum).
    skip_fn: ``should_skip_update_fn``, or one that never skips.
    shared_skip: whether devices must agree on the skip decision (a user's
      ``skip_fn`` under ``axis_name``).
    accumulator_dtype: the least precise dtype of the sums (``None``: theirs).
    axis_name: the ``axis_name`` axes (empty without it).
    data: with ``data_axis``, the accumulator of per-device partial sums.
  """

  inner_opt: optax.GradientTransformation
  inner: optax.GradientTransformationExtraArgs
  schedule: Callable[[jax.Array], Any]
  use_grad_mean: bool
  skip_fn: ShouldSkipUpdateFn
  shared_skip: bool
  accumulator_dtype: Any
  axis_name: tuple[Hashable, ...]
  data: DataCycle | None

  @classmethod
  def create(cls, inner: Any, **given: Any) -> Config:
    """Validates ``multi_steps``' arguments; raises TypeError / ValueError."""
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
      hint = " (call it: optax.adam(1e-3), not optax.adam)" if callable(inner) else ""
      raise TypeError(f"inner={inner!r} is not an optax.GradientTransformation{hint}")
    v = options.validate(options.MS, given)
    skip_fn = v["should_skip_update_fn"]
    return cls(
        inner_opt=inner, inner=optax.with_extra_args_support(inner),
        schedule=v["every_k_schedule"], use_grad_mean=v["use_grad_mean"],
        skip_fn=_never_skip if skip_fn is None else skip_fn,
        shared_skip=skip_fn is not None, accumulator_dtype=v["accumulator_dtype"],
        axis_name=v["axis_name"],
        data=None if v["data_axis"] is None else DataCycle(v["data_axis"]))
