"""The checks of single option values, each written once.

Every function takes the option's name and value and returns the value
normalized (positions as tuples, axes as tuples of names), raising as jax
does: a wrong type is a ``TypeError``, a wrong value a ``ValueError``, each
naming the option, the value and the fix. :mod:`jaxaccum._core.options`
attaches one of them to each option.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def index(name: str, value: Any) -> int:
  """``value`` as an int, checked the way jax checks integers."""
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be an int, got {name}={value!r}")
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be an int, got {name}={value!r}") from None


def positive(name: str, value: Any) -> int | None:
  """An optional int that must be at least 1."""
  if value is None:
    return None
  n = index(name, value)
  if n < 1:
    raise ValueError(f"{name} must be >= 1, got {name}={value!r}")
  return n


def is_sequence(value: Any) -> bool:
  """Whether an option was given as a sequence (not a str)."""
  return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str)


def argnums(name: str, value: Any, *, allow_empty: bool = True) -> tuple[int, ...]:
  """An int or a sequence of ints, as a tuple of distinct ints >= 0."""
  if is_sequence(value):
    nums = tuple(index(name, a) for a in value)
  else:
    try:
      nums = (index(name, value),)
    except TypeError:
      raise TypeError(
          f"{name} must be an int or a tuple of ints, got {name}={value!r}") from None
  if any(n < 0 for n in nums):
    raise ValueError(f"{name} must be non-negative, got {name}={value!r}")
  if len(set(nums)) != len(nums):
    raise ValueError(f"{name} has repeated entries: {name}={value!r}")
  if not nums and not allow_empty:
    raise ValueError(f"{name} must name at least one argument, got {name}={value!r}")
  return nums


def nonempty_argnums(name: str, value: Any) -> tuple[int, ...]:
  return argnums(name, value, allow_empty=False)


def optional_argnums(name: str, value: Any) -> tuple[int, ...] | None:
  return None if value is None else argnums(name, value)


def names(name: str, value: Any) -> tuple[str, ...]:
  """A str or a sequence of distinct strs, as a tuple."""
  out = (value,) if isinstance(value, str) else value
  if not isinstance(out, Sequence) or not all(isinstance(v, str) for v in out):
    raise TypeError(f"{name} must be a str or a tuple of str, got {name}={value!r}")
  if len(set(out)) != len(out):
    raise ValueError(f"{name} has repeated entries: {name}={value!r}")
  return tuple(out)


def boolean(name: str, value: Any) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {name}={value!r}")
  return bool(value)


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
  """``value``, checked to be one of the strings ``choices``."""
  if not isinstance(value, str):
    raise TypeError(f"{name} must be one of {choices}, got {name}={value!r}")
  if value not in choices:
    raise ValueError(f"{name}={value!r} must be one of {choices}")
  return value


def one_of(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
  """The check of an option whose value is one of ``choices``."""
  return lambda name, value: choice(name, value, choices)


def optional_callable(name: str, value: Any) -> Any:
  if value is not None and not callable(value):
    raise TypeError(f"{name}={value!r} is not callable; pass a function, or None")
  return value


def axes(name: str, value: Any, *, required: bool = False) -> tuple[Hashable, ...]:
  """A mesh axis option as a tuple of axis names (empty for ``None``, unless
  ``required``)."""
  if value is None and not required:
    return ()
  if value is None:
    raise ValueError(f"{name} must name at least one axis, got {name}=None")
  out = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  for a in out:
    if not isinstance(a, Hashable):
      raise TypeError(f"{name} must be an axis name or a tuple of them, got {name}={value!r}")
  if not out:
    raise ValueError(f"{name} must name at least one axis, got {name}={value!r}")
  return out


def mesh(name: str, value: Any) -> Any:
  if value is not None and not hasattr(value, "axis_names"):
    raise TypeError(f"{name}={value!r} must be a jax.sharding.Mesh (or None for the mesh "
                    "of jax.set_mesh)")
  return value


def param_specs(name: str, value: Any) -> Any:
  """``None``, a ``PartitionSpec`` or a pytree of them."""
  if value is None:
    return None
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
  leaves = jax.tree.leaves(value, is_leaf=is_spec)
  if not leaves or not all(is_spec(x) for x in leaves):
    raise TypeError(
        f"{name}={value!r} must be a PartitionSpec or a pytree of them (a prefix of "
        "the parameters), e.g. {'w': P('data', None), 'b': P()}")
  return value


def accumulator_dtype(name: str, value: Any) -> jnp.dtype | None:
  """``None`` or a floating dtype."""
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError as e:
    raise TypeError(
        f"{name}={value!r} is not a dtype; pass a floating dtype such as "
        "jnp.float32, or None to sum in each gradient's own dtype") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{name}={value!r} is not a floating dtype: gradients summed in it "
        "would be truncated; pass jnp.float32 (the default), jnp.float64, or None")
  return dtype


def aux_reduction(name: str, value: Any, choices: tuple[str, ...]) -> Any:
  """A reduction name, or a pytree of them (a prefix of the aux)."""
  if isinstance(value, str):
    return choice(name, value, choices)
  leaves = jax.tree.leaves(value)
  if not leaves:
    raise ValueError(f"{name}={value!r} holds no reduction; use one of {choices}")
  for leaf in leaves:
    error = TypeError if not isinstance(leaf, str) else ValueError
    if leaf not in choices:
      raise error(f"{name}={value!r} holds {leaf!r}; each entry must be one of {choices}")
  return value


def in_axes(name: str, value: Any) -> tuple[int, ...] | int:
  """One int, or one int per batch argument (checked against them later)."""
  if is_sequence(value):
    return tuple(index(name, a) for a in value)
  return index(name, value)


def real_microbatches(name: str, value: Any) -> Any:
  """A static int >= 1 or a traced integer scalar."""
  if value is None:
    return None
  if isinstance(value, jax.Array):
    if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer scalar, got {jax.typeof(value)}")
    if isinstance(value, jax.core.Tracer):
      return value
    value = int(value)  # concrete: checked now, like a Python int
  return positive(name, value)


def schedule(name: str, value: Any) -> Callable[[jax.Array], Any]:
  """``every_k_schedule``: an integer >= 1 or a function of the step."""
  given = f"{name}={value!r}"
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{given} is a bool; pass an integer >= 1 or a function of the step")
  if isinstance(value, (np.ndarray, jax.Array)) and not callable(value):
    if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError(f"{given} must be an integer >= 1 or a function of the step")
    value = int(value)
  if isinstance(value, numbers.Integral):
    if value < 1:
      raise ValueError(f"{given} must be an integer >= 1 (calls per optimizer step)")
    k = int(value)
    return lambda step: k
  if isinstance(value, numbers.Real):
    raise TypeError(f"{given} is not an integer; pass an int >= 1, e.g. "
                    "every_k_schedule=4, or a function of the step")
  if not callable(value):
    raise TypeError(f"{given} must be an integer >= 1 or a function of the step")
  return value
