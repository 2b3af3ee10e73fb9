"""One call's batch and one micro-batch: the plan, the split, the micro-step.

Micro-batch ``i`` of ``N`` holds rows ``i, i + N, i + 2N, ...`` of the batch.
A strided split keeps a data-parallel sharding of the batch axis in place:
with the batch sharded in contiguous blocks over ``D`` devices and ``B / N``
divisible by ``D``, every device holds ``B / (N D)`` rows of every micro-batch,
so no row moves. Contiguous slices would put each micro-batch on ``D / N``
devices and make XLA gather the batch (see ``docs/scale-out.md``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxaccum._core import dtypes
from jaxaccum._core.options import Options

PyTree = Any


class Binding(NamedTuple):
  """Where ``fun``'s signature lets each batch argument be passed.

  Attributes:
    names: the keyword name of each ``batch_argnums`` entry (``None`` where
      the parameter is positional-only or behind ``*args``).
    positions: the position of each ``batch_argnames`` entry (``None`` where
      the parameter is keyword-only or behind ``**kwargs``).
  """

  names: tuple[str | None, ...]
  positions: tuple[int | None, ...]

  @classmethod
  def of(cls, fun: Callable[..., Any], options: Options) -> Binding:
    """Reads ``fun``'s signature as ``jax.jit`` does for ``static_argnums``."""
    named = positional_names(fun)
    names = tuple(named[i] if i < len(named) else None for i in options.batch_argnums)
    positions = tuple(named.index(k) if k in named else None for k in options.batch_argnames)
    return cls(names, positions)


def positional_names(fun: Callable[..., Any]) -> list[str | None]:
  """The name of each positional parameter of ``fun`` (``None`` where it is
  positional-only); empty where the signature cannot be read."""
  try:
    params = list(inspect.signature(fun).parameters.values())
  except (TypeError, ValueError):
    return []
  return [p.name if p.kind is p.POSITIONAL_OR_KEYWORD else None for p in params
          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


class Plan(NamedTuple):
  """How one call is split, worked out once from its arguments' shapes.

  Attributes:
    positions: the positional arguments of this call that hold the batch.
    names: the keyword arguments of this call that hold the batch.
    axes: the batch axis of each, ``positions`` then ``names``.
    size: the rows of the (global) batch, ``B``.
    n: the number of micro-batches, ``N``.
    devices: the devices of ``data_axis`` the rows are spread over.
  """

  positions: tuple[int, ...]
  names: tuple[str, ...]
  axes: tuple[int, ...]
  size: int
  n: int
  devices: int


class Batch(NamedTuple):
  """The batch arguments of one call (or micro-batch), in plan order."""

  args: tuple
  kwargs: dict


def check_positions(options: Options, positions: tuple[int, ...], num_args: int) -> None:
  """The positional options must name arguments of the call."""
  if positions and max(positions) >= num_args:
    raise ValueError(f"{options.describe_positions()} must name positional arguments, but "
                     f"the function was called with {num_args}")


def plan(options: Options, binding: Binding, args: tuple, kwargs: dict,
         devices: int = 1) -> Plan:
  """The :class:`Plan` of a call; raises ValueError for a batch it cannot split."""
  located = [("arg", p) if p < len(args) else ("kw", k) for p, k in
             zip(options.batch_argnums, binding.names)]
  located += [("kw", k) if k in kwargs else ("arg", p) for k, p in
              zip(options.batch_argnames, binding.positions)]
  missing = [given for (where, key), given in zip(located, _given(options))
             if key is None or not (key < len(args) if where == "arg" else key in kwargs)]
  if missing:
    raise ValueError(_missing_batch(options, missing, args, kwargs))
  taken = [k for w, k in located if w == "arg" and k in options.positions]
  if taken:
    raise ValueError(
        f"batch_argnums={options.batch_argnums}, batch_argnames={options.batch_argnames} "
        f"name position(s) {taken} of fun's signature, which {options.describe_positions()} "
        "name too; each argument plays one role")
  if len(set(located)) != len(located):
    raise ValueError(
        f"batch_argnums={options.batch_argnums} and batch_argnames="
        f"{options.batch_argnames} name the same argument twice in fun's signature")
  in_axes = options.in_axes
  positions = tuple(k for w, k in located if w == "arg")
  names = tuple(k for w, k in located if w == "kw")
  axes = (tuple(a for (w, _), a in zip(located, in_axes) if w == "arg")
          + tuple(a for (w, _), a in zip(located, in_axes) if w == "kw"))
  size = batch_size(Batch(tuple(args[p] for p in positions), {k: kwargs[k] for k in names}),
                    axes)
  n = _num_microbatches(options, size)
  if size % (n * devices):
    raise ValueError(
        f"batch size {size} cannot be split into num_microbatches={n} on each of the "
        f"{devices} devices of data_axis={options.data.spec!r}: it must be divisible "
        f"by {n * devices}")
  return Plan(positions, names, axes, size, n, devices)


def _given(options: Options) -> list[Any]:
  return list(options.batch_argnums) + list(options.batch_argnames)


def _missing_batch(options: Options, missing: list, args: tuple, kwargs: dict) -> str:
  passed = f"{len(args)} positional argument(s) and keywords {sorted(kwargs)}"
  fix = ("the batch must be an argument of fun (a loss that reads its data from a "
         "closure cannot be split): pass it, naming a keyword batch with "
         "batch_argnames= and a positional one with batch_argnums=")
  nums, names = options.batch_argnums, options.batch_argnames
  shown = ", ".join(
      ([f"batch_argnums={nums[0] if len(nums) == 1 else nums}"] if nums else [])
      + ([f"batch_argnames={names}"] if names else []))
  return (f"{shown} names arguments {missing} that this call does not pass (it passes "
          f"{passed}); {fix}")


def _num_microbatches(options: Options, size: int) -> int:
  axes = options.in_axes
  where = (f"the batch arguments (batch_argnums={options.batch_argnums}, "
           f"batch_argnames={options.batch_argnames}) along their batch axis "
           f"(in_axes={axes[0] if len(set(axes)) == 1 else axes})")
  if size == 0:
    raise ValueError(f"{where} have leading size 0: there are no rows to split")
  if options.microbatch_size is not None:
    microbatch_size = options.microbatch_size
    if size % microbatch_size:
      raise ValueError(f"batch size {size} is not divisible by {microbatch_size=}; "
                       f"{where} must have a multiple of it as their batch size")
    n = size // microbatch_size
  else:
    n = options.num_microbatches
    if size % n:
      raise ValueError(f"batch size {size} is not divisible by num_microbatches={n}; "
                       f"{where} must have a multiple of it as their batch size")
  real = options.num_real_microbatches
  if isinstance(real, int) and real > n:
    raise ValueError(f"num_real_microbatches={real} exceeds the {n} micro-batches of "
                     f"this batch of {size} rows")
  return n


def batch_of(plan_: Plan, args: tuple, kwargs: dict) -> Batch:
  """The batch arguments a :class:`Plan` names."""
  return Batch(tuple(args[p] for p in plan_.positions), {k: kwargs[k] for k in plan_.names})


def _by_axis(fn: Callable[..., Any], batch: Batch, axes: tuple[int, ...]) -> Batch:
  """``fn(leaf, axis)`` over every leaf, with its argument's batch axis."""
  k = len(batch.args)
  args = tuple(jax.tree.map(lambda x, a=a: fn(x, a), arg) for arg, a in zip(batch.args, axes))
  kwargs = {name: jax.tree.map(lambda x, a=a: fn(x, a), v)
            for (name, v), a in zip(batch.kwargs.items(), axes[k:])}
  return Batch(args, kwargs)


def batch_size(batch: Batch, axes: tuple[int, ...]) -> int:
  """The batch size shared by every array leaf along its batch axis.

  Raises:
    TypeError: a leaf is not an array (a Python scalar or list, say).
    ValueError: the batch has no leaves, a leaf lacks the batch axis, or the
      leaves' batch sizes differ.
  """
  sizes = {}
  for (path, leaf), axis in _leaves_with_axes(batch, axes):
    where = "batch" + jax.tree_util.keystr(path)
    if not isinstance(leaf, (jax.Array, np.ndarray)):
      raise TypeError(f"batch leaf {where} is a {type(leaf).__name__}, not an array; "
                      "pass jax or numpy arrays with a batch axis")
    if leaf.ndim == 0:
      raise ValueError(
          f"batch leaf {where} is a scalar; it needs a leading batch axis. If this "
          "argument is not the batch, name the batch with batch_argnums= or "
          "batch_argnames= (and PRNG keys with rng_argnums=)")
    if not -leaf.ndim <= axis < leaf.ndim:
      raise ValueError(f"batch leaf {where} of shape {leaf.shape} has no axis {axis}; "
                       "it needs a batch axis there (see in_axes=)")
    sizes[where] = leaf.shape[axis]
  if not sizes:
    raise ValueError("the batch arguments hold no arrays to split")
  if len(set(sizes.values())) > 1:
    listed = ", ".join(f"{k}: {v}" for k, v in sizes.items())
    raise ValueError(f"batch leaves have different leading sizes along their batch "
                     f"axes ({listed})")
  return next(iter(sizes.values()))


def _leaves_with_axes(batch: Batch, axes: tuple[int, ...]):
  parts = list(batch.args) + list(batch.kwargs.values())
  for i, (part, axis) in enumerate(zip(parts, axes)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(part):
      yield ((jax.tree_util.SequenceKey(i),) + path, leaf), axis


def stride(batch: Batch, plan_: Plan) -> Batch:
  """Splits every leaf's batch axis of size ``B`` into ``(B // N, N)``."""
  def split(x, axis):
    axis = axis % x.ndim
    return x.reshape(*x.shape[:axis], x.shape[axis] // plan_.n, plan_.n, *x.shape[axis + 1:])
  return _by_axis(split, batch, plan_.axes)


def microbatch(strided: Batch, plan_: Plan, i: jax.Array) -> Batch:
  """Micro-batch ``i`` of a batch split by :func:`stride`."""
  def take(x, axis):
    return lax.dynamic_index_in_dim(x, i, axis=axis % (x.ndim - 1) + 1, keepdims=False)
  return _by_axis(take, strided, plan_.axes)


def unstride(stacked: jax.Array) -> jax.Array:
  """Per-micro-batch rows ``(N, B // N, ...)`` back in the batch's order ``(B, ...)``."""
  return jnp.swapaxes(stacked, 0, 1).reshape(-1, *stacked.shape[2:])


class Micro(NamedTuple):
  """What one micro-batch gives the reducers.

  Attributes:
    value: the loss.
    grads: its gradients.
    aux: its auxiliary output (``()`` without ``has_aux``).
    states: the new value of each state argument, in ``state_argnums`` order.
    weight: its weight in the sums (``None``: unweighted): ``weight_fn``'s
      result (NaN if negative or NaN), zero if ``skip_nonfinite`` left it out.
    kept: 1.0, or 0.0 if ``skip_nonfinite`` left it out.
    sampled: 1.0 if it is a gradient sample of the statistics: kept, with a
      positive weight.
    skipped: 1.0 if ``skip_nonfinite`` left out a micro-batch of positive
      weight.
  """

  value: jax.Array
  grads: PyTree
  aux: PyTree
  states: tuple
  weight: jax.Array | None
  kept: jax.Array
  sampled: jax.Array
  skipped: jax.Array


def make_step(options: Options, plan_: Plan, grad_fn: Callable[..., Any], args: tuple,
              kwargs: dict, keys: dict[int, jax.Array],
              microbatch_diff: Callable[[tuple, Batch], tuple],
              ) -> Callable[..., tuple[Micro, tuple]]:
  """The micro-step: ``step(index, micro_batch, seq_states) -> (Micro, seq_states)``.

  ``seq_states`` are the values of the ``"sequential"`` state arguments that
  the micro-batch sees; ``keys`` the PRNG keys to fold ``index`` into;
  ``microbatch_diff(diff_args, micro_batch)`` the differentiated arguments as
  this micro-batch sees them (gathered per micro-batch, say).
  """
  policies = dict(zip(options.state_argnums, options.state_policies))
  seq_pos = tuple(p for p in options.state_argnums if policies[p] == "sequential")

  def step(index: jax.Array, micro: Batch, seq_states: tuple) -> tuple[Micro, tuple]:
    call = list(args)
    for pos, part in zip(plan_.positions, micro.args):
      call[pos] = part
    for pos, key in keys.items():
      call[pos] = jax.random.fold_in(key, index)
    for pos, state in zip(seq_pos, seq_states):
      call[pos] = state
    diff = microbatch_diff(tuple(call[i] for i in options.argnums), micro)
    for pos, arg in zip(options.argnums, diff):
      call[pos] = arg
    out, grads = grad_fn(*call, **{**kwargs, **micro.kwargs})
    value, aux, states = unpack(options, out)
    weight, kept, weighed = _weigh(options, _weight_fn_args(options, plan_, micro),
                                   value, grads)
    new_seq = tuple(_keep_if(kept, states[options.state_argnums.index(p)], old)
                    for p, old in zip(seq_pos, seq_states))
    sampled = kept * weighed
    return Micro(value, grads, aux, states, weight, kept, sampled, weighed - sampled), new_seq

  return step


def _weight_fn_args(options: Options, plan_: Plan, micro: Batch) -> Batch:
  """The micro-batch as ``weight_fn(*batch_args)`` takes it: the ``batch_argnums``
  arguments by position, in their order, also where the call passed one by
  keyword (``loss(params, batch=b)``); ``batch_argnames`` ones as given."""
  args, kwargs = iter(micro.args), dict(micro.kwargs)
  by_keyword = iter([k for k in plan_.names if k not in options.batch_argnames])
  first = [next(args) if p in plan_.positions else kwargs.pop(next(by_keyword))
           for p in options.batch_argnums]
  return Batch((*first, *args), kwargs)


def _weigh(options: Options, micro: Batch, value: jax.Array, grads: PyTree):
  """The micro-batch's weight, whether it is kept, whether its weight is positive."""
  one = jnp.ones([], jnp.float32)
  weight = None
  if options.weight_fn is not None:
    weight = dtypes.checked_weight(options.weight_fn(*micro.args, **micro.kwargs),
                                    "weight_fn's result")
  # A micro-batch of weight zero (all padding) is no gradient sample, and even
  # with a 0 / 0 loss it is not counted as skipped.
  weighed = one if weight is None else (weight != 0).astype(jnp.float32)
  if not options.skip_nonfinite:
    return weight, one, weighed
  finite = jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((value, grads))]))
  if weight is None:
    return jnp.where(finite, one, 0), finite.astype(jnp.float32), weighed
  # A NaN weight (NaN or negative from weight_fn) stays NaN even when skipped.
  weight = jnp.where(jnp.logical_or(finite, jnp.isnan(weight)), weight, 0)
  return weight, finite.astype(jnp.float32), weighed


def _keep_if(kept: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """A skipped micro-batch leaves the sequential state as it found it."""
  return jax.tree.map(lambda n, o: jnp.where(kept > 0, n, o), new, old)


def unpack(options: Options, out: Any) -> tuple[jax.Array, PyTree, tuple]:
  """Splits ``fun``'s output into value, aux and the new states (a tuple)."""
  if not options.state_argnums:
    value, aux = out if options.has_aux else (out, ())
    return value, aux, ()
  # fun's output was checked to be a pair when the function was built.
  value, rest = out
  aux, states = rest if options.has_aux else ((), rest)
  states = tuple(states) if options.state_is_tuple else (states,)
  if len(states) != len(options.state_argnums):
    raise ValueError(
        f"fun returned {len(states)} new states for "
        f"state_argnums={options.state_argnums}")
  return value, aux, states
