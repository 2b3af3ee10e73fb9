"""The options of an accumulated function: one frozen object, validated once.

:func:`jaxaccum.value_and_grad`, :func:`jaxaccum.grad`, :mod:`jaxaccum.nnx`
and the planner build an :class:`Options` from their keyword arguments; every
check of a static option lives here, as jax checks its own arguments: a wrong
type is a ``TypeError``, a wrong value a ``ValueError``, each naming the
option, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum._core import dtypes

Reduction = Literal["mean", "sum"]
AuxReduction = Literal["mean", "sum", "stack", "concat"]
StatePolicy = Literal["sequential", "mean"]
FsdpGather = Literal["once", "per_microbatch"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
AUX_REDUCTIONS: tuple[str, ...] = get_args(AuxReduction)
STATE_POLICIES: tuple[str, ...] = get_args(StatePolicy)
FSDP_GATHER: tuple[str, ...] = get_args(FsdpGather)


def index(name: str, value: Any) -> int:
  """``value`` as an int, checked the way jax checks integers."""
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be an int, got {name}={value!r}")
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be an int, got {name}={value!r}") from None


def positive(name: str, value: Any) -> int | None:
  """An optional int option that must be at least 1."""
  if value is None:
    return None
  n = index(name, value)
  if n < 1:
    raise ValueError(f"{name} must be >= 1, got {name}={value!r}")
  return n


def argnums_tuple(name: str, argnums: Any, *, allow_empty: bool = True) -> tuple[int, ...]:
  """``argnums`` (an int or a sequence of ints) as a tuple of distinct ints >= 0."""
  if isinstance(argnums, (Sequence, np.ndarray)) and not isinstance(argnums, str):
    nums = tuple(index(name, a) for a in argnums)
  else:
    try:
      nums = (index(name, argnums),)
    except TypeError:
      raise TypeError(
          f"{name} must be an int or a tuple of ints, got {name}={argnums!r}") from None
  if any(n < 0 for n in nums):
    raise ValueError(f"{name} must be non-negative, got {name}={argnums!r}")
  if len(set(nums)) != len(nums):
    raise ValueError(f"{name} has repeated entries: {name}={argnums!r}")
  if not nums and not allow_empty:
    raise ValueError(f"{name} must name at least one argument, got {name}={argnums!r}")
  return nums


def _names(name: str, value: Any) -> tuple[str, ...]:
  names = (value,) if isinstance(value, str) else value
  if not isinstance(names, Sequence) or not all(isinstance(v, str) for v in names):
    raise TypeError(f"{name} must be a str or a tuple of str, got {name}={value!r}")
  if len(set(names)) != len(names):
    raise ValueError(f"{name} has repeated entries: {name}={value!r}")
  return tuple(names)


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
  """``value``, checked to be one of the strings ``choices``."""
  if not isinstance(value, str):
    raise TypeError(f"{name} must be one of {choices}, got {name}={value!r}")
  if value not in choices:
    raise ValueError(f"{name}={value!r} must be one of {choices}")
  return value


def _callable(name: str, value: Any) -> Any:
  if value is not None and not callable(value):
    raise TypeError(f"{name} must be callable or None, got {name}={value!r}")
  return value


def axes_of(name: str, value: Any) -> tuple[Hashable, ...]:
  """A mesh axis option as a tuple of axis names (empty for ``None``)."""
  if value is None:
    return ()
  axes = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  for a in axes:
    if not isinstance(a, Hashable):
      raise TypeError(f"{name} must be an axis name or a tuple of them, got {name}={value!r}")
  if not axes:
    raise ValueError(f"{name} must name at least one axis, got {name}={value!r}")
  return axes


def _aux_reduction(value: Any) -> Any:
  """A reduction name, or a pytree of them (a prefix of the aux)."""
  if isinstance(value, str):
    return choice("aux_reduction", value, AUX_REDUCTIONS)
  leaves = jax.tree.leaves(value)
  if not leaves:
    raise ValueError(f"aux_reduction={value!r} holds no reduction; use one of {AUX_REDUCTIONS}")
  for leaf in leaves:
    if not isinstance(leaf, str):
      raise TypeError(
          f"aux_reduction={value!r} holds {leaf!r}; each entry must be one of "
          f"{AUX_REDUCTIONS}")
    if leaf not in AUX_REDUCTIONS:
      raise ValueError(
          f"aux_reduction={value!r} holds {leaf!r}; each entry must be one of "
          f"{AUX_REDUCTIONS}")
  return value


@dataclasses.dataclass(frozen=True)
class Options:
  """The validated static options of one accumulated function.

  Built with :meth:`create` from the public keyword arguments of
  :func:`jaxaccum.value_and_grad` (see there for what each one means): the
  user's options first, normalized (positions as tuples, axes as tuples of
  names), then the few facts derived from how they were given.
  """

  num_microbatches: int | None
  microbatch_size: int | None
  argnums: tuple[int, ...]
  batch_argnums: tuple[int, ...]
  batch_argnames: tuple[str, ...]
  has_aux: bool
  weight_fn: Callable[..., Any] | None
  reduction: Reduction
  aux_reduction: Any
  accumulator_dtype: Any
  rng_argnums: tuple[int, ...]
  axis_name: tuple[Hashable, ...]
  data_axis: tuple[Hashable, ...]
  mesh: Any
  state_argnums: tuple[int, ...]
  state_policies: tuple[StatePolicy, ...]
  with_stats: bool
  skip_nonfinite: bool
  fsdp_gather: FsdpGather
  param_specs: Any
  defer_reduction: bool
  in_axes: tuple[int, ...] | int
  num_real_microbatches: Any
  # Derived from how the options were given.
  argnums_is_int: bool
  state_is_tuple: bool

  @classmethod
  def create(
      cls, *, num_microbatches: Any = None, microbatch_size: Any = None,
      argnums: Any = 0, batch_argnums: Any = None, batch_argnames: Any = (),
      has_aux: Any = False, weight_fn: Any = None, reduction: Any = "mean",
      aux_reduction: Any = "mean", accumulator_dtype: Any = jnp.float32,
      rng_argnums: Any = (), axis_name: Any = None, data_axis: Any = None,
      mesh: Any = None, state_argnums: Any = (), state_policy: Any = "sequential",
      with_stats: Any = False, skip_nonfinite: Any = False,
      fsdp_gather: Any = "once", param_specs: Any = None,
      defer_reduction: Any = False, in_axes: Any = 0, num_real_microbatches: Any = None,
  ) -> Options:
    """Validates the public keyword arguments; raises TypeError / ValueError."""
    if (num_microbatches is None) == (microbatch_size is None):
      raise ValueError(
          "exactly one of num_microbatches and microbatch_size must be given, got "
          f"{num_microbatches=} and {microbatch_size=}")
    names = _names("batch_argnames", batch_argnames)
    if batch_argnums is None:
      # batch_argnames alone replaces the default batch argument.
      batch_argnums = () if names else 1
    batch_t = argnums_tuple("batch_argnums", batch_argnums)
    if not batch_t and not names:
      raise ValueError(
          f"batch_argnums and batch_argnames name no argument ({batch_argnums=}, "
          f"{batch_argnames=}); name the batch argument(s) to split")
    argnums_t = argnums_tuple("argnums", argnums, allow_empty=False)
    rng_t = argnums_tuple("rng_argnums", rng_argnums)
    state_t = argnums_tuple("state_argnums", state_argnums)
    _check_disjoint(batch_argnums=(batch_t, batch_argnums), argnums=(argnums_t, argnums),
                    rng_argnums=(rng_t, rng_argnums), state_argnums=(state_t, state_argnums))
    for name, value in (("has_aux", has_aux), ("with_stats", with_stats),
                        ("skip_nonfinite", skip_nonfinite),
                        ("defer_reduction", defer_reduction)):
      if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")
    axis_t, data_t = axes_of("axis_name", axis_name), axes_of("data_axis", data_axis)
    gather = choice("fsdp_gather", fsdp_gather, FSDP_GATHER)
    _check_axes(axis_t, data_t, mesh=mesh, fsdp_gather=gather, defer_reduction=defer_reduction)
    if defer_reduction and with_stats:
      raise ValueError(
          "defer_reduction=True leaves the gradients unreduced, but with_stats=True "
          "needs their reduced norms; drop one of them")
    if defer_reduction and gather == "per_microbatch":
      raise ValueError(
          f"defer_reduction=True keeps each device's unreduced gradient sums, but "
          f"fsdp_gather={gather!r} reduce-scatters them in every micro-batch; use "
          "fsdp_gather='once' with defer_reduction")
    _check_param_specs(param_specs, data_t, argnums_t, argnums)
    return cls(
        num_microbatches=positive("num_microbatches", num_microbatches),
        microbatch_size=positive("microbatch_size", microbatch_size),
        argnums=argnums_t, batch_argnums=batch_t, batch_argnames=names,
        has_aux=bool(has_aux), weight_fn=_callable("weight_fn", weight_fn),
        reduction=choice("reduction", reduction, REDUCTIONS),
        aux_reduction=_aux_reduction(aux_reduction),
        accumulator_dtype=dtypes.check_accumulator_dtype(accumulator_dtype),
        rng_argnums=rng_t, axis_name=axis_t, data_axis=data_t, mesh=mesh,
        state_argnums=state_t, state_policies=_state_policies(state_policy, state_t),
        with_stats=bool(with_stats), skip_nonfinite=bool(skip_nonfinite),
        fsdp_gather=gather,
        param_specs=param_specs, defer_reduction=bool(defer_reduction),
        in_axes=_in_axes(in_axes, len(batch_t) + len(names)),
        num_real_microbatches=_real_microbatches(num_real_microbatches, num_microbatches),
        argnums_is_int=not isinstance(argnums, (Sequence, np.ndarray)),
        state_is_tuple=isinstance(state_argnums, (Sequence, np.ndarray)),
    )

  @property
  def weighted(self) -> bool:
    """Whether micro-batches carry weights (``weight_fn`` or skipping)."""
    return self.weight_fn is not None or self.skip_nonfinite

  @property
  def positions(self) -> tuple[int, ...]:
    """The positional arguments an option names, other than the batch (which
    may be passed by keyword where ``fun``'s signature allows)."""
    return self.argnums + self.rng_argnums + self.state_argnums

  def describe_positions(self) -> str:
    """The positional options, for messages (one position shown as an int)."""
    shown = {name: nums[0] if len(nums) == 1 else nums for name, nums in (
        ("argnums", self.argnums), ("rng_argnums", self.rng_argnums),
        ("state_argnums", self.state_argnums)) if nums}
    return ", ".join(f"{k}={v!r}" for k, v in shown.items())


def _check_disjoint(**groups: tuple[tuple[int, ...], Any]) -> None:
  """Each group is ``(positions, the value as given)``."""
  items = list(groups.items())
  for i, (a, (nums_a, given_a)) in enumerate(items):
    for b, (nums_b, given_b) in items[i + 1:]:
      if set(nums_a) & set(nums_b):
        raise ValueError(f"{a} and {b} overlap: {a}={given_a!r}, {b}={given_b!r}; "
                         "each argument plays one role")


def _check_axes(axis_t: tuple, data_t: tuple, **only_with_data_axis: Any) -> None:
  """The options that only ``data_axis`` uses need it."""
  if axis_t and data_t:
    raise ValueError(f"give axis_name or data_axis, not both: axis_name={axis_t!r}, "
                     f"data_axis={data_t!r}")
  defaults = {"mesh": None, "fsdp_gather": "once", "defer_reduction": False}
  for name, value in only_with_data_axis.items():
    given = value is not None if defaults[name] is None else value != defaults[name]
    if given and not data_t:
      raise ValueError(f"{name}= is only used with data_axis= (got {name}={value!r}); pass "
                       "data_axis= too: the mesh axis or axes the batch is sharded over")


def _in_axes(in_axes: Any, count: int) -> tuple[int, ...]:
  """The batch axis of each batch argument (``batch_argnums`` then ``batch_argnames``)."""
  if isinstance(in_axes, (Sequence, np.ndarray)) and not isinstance(in_axes, str):
    axes = tuple(index("in_axes", a) for a in in_axes)
    if len(axes) != count:
      raise ValueError(
          f"in_axes={in_axes!r} must give one axis per batch argument (batch_argnums "
          f"then batch_argnames: {count} of them), or one int for all")
    return axes
  return (index("in_axes", in_axes),) * count


def _real_microbatches(value: Any, num_microbatches: Any) -> Any:
  """``num_real_microbatches``: a static int in ``1..N`` or a traced integer scalar."""
  if value is None:
    return None
  if isinstance(value, jax.Array):
    if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError("num_real_microbatches must be an integer scalar, got "
                      f"{jax.typeof(value)}")
    if isinstance(value, jax.core.Tracer):
      return value
    value = int(value)  # concrete: checked now, like a Python int
  n = positive("num_real_microbatches", value)
  if num_microbatches is not None and n > num_microbatches:
    raise ValueError(f"num_real_microbatches={n} exceeds {num_microbatches=}; "
                     "it counts the micro-batches to compute, at most N")
  return n


def _check_param_specs(param_specs: Any, data_t: tuple, argnums_t: tuple,
                       argnums: Any) -> None:
  if param_specs is None:
    return
  if not data_t:
    raise ValueError("param_specs= is only used with data_axis=; pass data_axis= too")
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
  leaves = jax.tree.leaves(param_specs, is_leaf=is_spec)
  if not leaves or not all(is_spec(x) for x in leaves):
    raise TypeError(
        f"param_specs must be a PartitionSpec or a pytree of them, got {param_specs=}")
  if isinstance(argnums, (Sequence, np.ndarray)) and (
      not isinstance(param_specs, (tuple, list)) or len(param_specs) != len(argnums_t)):
    raise ValueError(
        f"with a sequence {argnums=}, param_specs must be a tuple of one entry per "
        f"argument, got {param_specs=}")


def _state_policies(state_policy: Any, state_t: tuple[int, ...]) -> tuple[str, ...]:
  if not isinstance(state_policy, (str, Sequence)):
    fix = "; leave it out for the default 'sequential'" if state_policy is None else ""
    raise TypeError(
        f"state_policy must be one of {STATE_POLICIES} or a tuple of them, got "
        f"{state_policy=}{fix}")
  if not state_t and state_policy != "sequential":
    raise ValueError(
        f"{state_policy=} is given without state_argnums; name the state "
        "argument(s) with state_argnums=")
  if isinstance(state_policy, str):
    return (choice("state_policy", state_policy, STATE_POLICIES),) * len(state_t)
  policies = tuple(choice("state_policy", p, STATE_POLICIES) for p in state_policy)
  if len(policies) != len(state_t):
    raise ValueError(
        f"{state_policy=} must be one of {STATE_POLICIES}, or one of them per "
        f"entry of state_argnums={state_t}")
  return policies
