"""Flax NNX adapters: :func:`value_and_grad` and :func:`grad` for NNX modules.

They mirror :func:`flax.nnx.value_and_grad` / :func:`flax.nnx.grad`: the loss
takes the module first, the gradients come back as an :class:`flax.nnx.State`
of the variables selected by ``wrt`` (what :meth:`flax.nnx.Optimizer.update`
takes), and the module's mutable state (BatchNorm statistics, RNG counts) is
updated in place. Inside, every NNX object among the arguments is split into
arrays (:mod:`jaxaccum._flax.nnx_args`) and handed to :func:`jaxaccum.value_and_grad`:

- the ``wrt`` variables of the differentiated arguments are differentiated;
- :class:`flax.nnx.BatchStat` variables follow ``state_policy``;
- every other variable that the forward pass may change (RNG counts, caches,
  counters) is threaded sequentially, so micro-batch ``i`` sees what
  micro-batch ``i - 1`` left, as ``N`` small forward passes would;
- RNG keys and parameters outside ``wrt`` are constants.

The core function is built once per structure of the arguments, so outside
:func:`flax.nnx.jit` a step compiles once per graph structure and shapes.
``docs/flax.md`` has the guide.

Example:

  >>> import jax.numpy as jnp, jaxaccum
  >>> from flax import nnx
  >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  >>> loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
  >>> loss, grads = jaxaccum.nnx.value_and_grad(loss_fn, num_microbatches=2)(
  ...     model, jnp.ones((4, 2)))
  >>> sorted(grads.keys())
  ['bias', 'kernel']
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax._src import traceback_util
from jax.sharding import PartitionSpec as P

from jaxaccum import _compat
from jaxaccum._core import accumulate, checks, microbatch
from jaxaccum._core.accumulate import Layout
from jaxaccum._core.options import (OPTIONS, STATE_POLICIES, AuxReduction, Options, Reduction,
                                    StatePolicy)
from jaxaccum._devices import parallel
from jaxaccum._devices import specs as _specs
from jaxaccum._devices.data_axis import DataAxis, FsdpGather
from jaxaccum._devices.deferred import DeferredGrads

# Before flax is imported: without it, the error names the extra to install.
_compat.require_flax("jaxaccum.nnx")

from flax import nnx  # noqa: E402

from jaxaccum._flax import nnx_args as _nnx_args  # noqa: E402

__all__ = ["grad", "value_and_grad"]


def value_and_grad(
    f: Callable[..., Any],
    *,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    argnums: int | nnx.DiffState | Sequence[int | nnx.DiffState] = 0,
    wrt: Any = nnx.Param,
    batch_argnums: int | Sequence[int] | None = None,
    batch_argnames: str | Sequence[str] = (),
    has_aux: bool = False,
    weight_fn: Callable[..., jax.typing.ArrayLike] | None = None,
    reduction: Reduction = "mean",
    aux_reduction: AuxReduction | Any = "mean",
    accumulator_dtype: jax.typing.DTypeLike | None = jnp.float32,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    data_axis: Hashable | Sequence[Hashable] | DataAxis | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    state_policy: StatePolicy = "sequential",
    with_stats: bool = False,
    skip_nonfinite: bool = False,
    fsdp_gather: FsdpGather = "once",
    param_specs: Any = None,
    defer_reduction: bool = False,
    in_axes: int | Sequence[int] = 0,
    num_real_microbatches: int | jax.Array | None = None,
) -> Callable[..., Any]:
  """Like :func:`flax.nnx.value_and_grad`, accumulated over micro-batches.

  ``f(model, *args)`` is differentiated on one micro-batch of the batch
  arguments at a time inside a ``lax.scan``; the module's state is updated in
  place, as by :func:`flax.nnx.value_and_grad`. The options not listed here
  (``microbatch_size``, ``batch_argnames``, ``weight_fn``, ``reduction``,
  ``aux_reduction``, ``accumulator_dtype``, ``axis_name``, ``mesh``,
  ``with_stats``, ``skip_nonfinite``, ``fsdp_gather``, ``defer_reduction``,
  ``in_axes``, ``num_real_microbatches``) mean what they mean for
  :func:`jaxaccum.value_and_grad` (``docs/options.md``); ``nnx.Rngs``
  arguments stand for ``rng_argnums``; ``docs/flax.md`` details the NNX ones.

  Args:
    f: ``f(model, *args)`` returning a scalar loss, or ``(loss, aux)``. Its
      arguments are NNX objects, pytrees of them, or arrays.
    argnums: the argument(s) to differentiate (an NNX object, a pytree of
      them or arrays), each an int or an :class:`flax.nnx.DiffState`; a tuple
      returns a tuple, as for :func:`flax.nnx.value_and_grad`.
    wrt: NNX filter of the variables to differentiate.
    has_aux: whether ``f`` returns ``(loss, aux)``.
    num_microbatches: number of micro-batches ``N``.
    batch_argnums: position(s) of the batch argument(s) (default ``1``).
    data_axis: mesh axis the batch is sharded over, for a jitted step, or a
      :class:`jaxaccum.DataAxis`.
    state_policy: ``"sequential"`` or ``"mean"``, for ``nnx.BatchStat``.
    param_specs: the parameters' ``PartitionSpec`` s on Auto mesh axes (one,
      or a pytree prefix of the gradients); by default those of the
      Variables' sharding metadata (``nnx.with_partitioning``).

  Returns:
    A function with ``f``'s signature returning ``(loss, grads)`` or
    ``((loss, aux), grads)``, ``grads`` shaped as by
    :func:`flax.nnx.value_and_grad` (and ``(that, stats)`` with ``with_stats``).

  Raises:
    TypeError, ValueError: an option of the wrong type or value.

  Example:

    >>> import jax.numpy as jnp, jaxaccum.nnx
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> loss_fn = lambda model, x, y: jnp.mean((model(x) - y) ** 2)
    >>> x = jnp.arange(24.0).reshape(8, 3) / 24
    >>> y = x.sum(axis=1, keepdims=True)
    >>> loss, grads = jaxaccum.nnx.value_and_grad(
    ...     loss_fn, num_microbatches=4, batch_argnums=(1, 2))(model, x, y)
    >>> ref_loss, ref_grads = nnx.value_and_grad(loss_fn)(model, x, y)
    >>> bool(jnp.allclose(loss, ref_loss)), bool(jnp.allclose(
    ...     grads["kernel"][...], ref_grads["kernel"][...]))
    (True, True)
  """
  return _Accumulated(f, _Spec.create(locals()), value_and_grad=True).function()


def grad(
    f: Callable[..., Any],
    *,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    argnums: int | nnx.DiffState | Sequence[int | nnx.DiffState] = 0,
    wrt: Any = nnx.Param,
    batch_argnums: int | Sequence[int] | None = None,
    batch_argnames: str | Sequence[str] = (),
    has_aux: bool = False,
    weight_fn: Callable[..., jax.typing.ArrayLike] | None = None,
    reduction: Reduction = "mean",
    aux_reduction: AuxReduction | Any = "mean",
    accumulator_dtype: jax.typing.DTypeLike | None = jnp.float32,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    data_axis: Hashable | Sequence[Hashable] | DataAxis | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    state_policy: StatePolicy = "sequential",
    with_stats: bool = False,
    skip_nonfinite: bool = False,
    fsdp_gather: FsdpGather = "once",
    param_specs: Any = None,
    defer_reduction: bool = False,
    in_axes: int | Sequence[int] = 0,
    num_real_microbatches: int | jax.Array | None = None,
) -> Callable[..., Any]:
  """Like :func:`flax.nnx.grad`, accumulated over micro-batches.

  Takes the options of :func:`jaxaccum.nnx.value_and_grad` and returns only
  the gradients: ``grads``, ``(grads, aux)`` with ``has_aux=True``, and
  ``(that, stats)`` with ``with_stats=True``.

  Example:

    >>> import jax.numpy as jnp, jaxaccum.nnx
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0))
    >>> model.kernel[...] = jnp.ones((2, 1))
    >>> loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
    >>> grads = jaxaccum.nnx.grad(loss_fn, num_microbatches=2)(model, jnp.ones((4, 2)))
    >>> grads["kernel"][...].ravel().tolist()  # d/dk mean((x k)^2) = 2 * 2 * 1
    [4.0, 4.0]
  """
  return _Accumulated(f, _Spec.create(locals()), value_and_grad=False).function()


class _Spec(NamedTuple):
  """The validated options.

  Attributes:
    diff: ``{position: filter}`` of the differentiated arguments.
    single: whether ``argnums`` named one argument (grads not in a tuple).
    state_policy: the policy of :class:`flax.nnx.BatchStat` variables.
    options: the options for the user's positions, validated once.
  """

  diff: dict[int, Any]
  single: bool
  state_policy: str
  options: Options

  @classmethod
  def create(cls, names: dict[str, Any]) -> _Spec:
    given = {k: v for k, v in names.items() if k != "f"}
    argnums, wrt = given.pop("argnums"), given.pop("wrt")
    policy = OPTIONS["state_policy"].check("state_policy", given["state_policy"])
    if not isinstance(policy, str):
      raise TypeError(f"jaxaccum.nnx takes one state_policy, for nnx.BatchStat: one of "
                      f"{STATE_POLICIES}, got state_policy={policy!r}")
    single = not checks.is_sequence(argnums)
    entries = (argnums,) if single else tuple(argnums)
    given_positions = [e.argnum if isinstance(e, nnx.DiffState) else e for e in entries]
    nums = checks.nonempty_argnums(
        "argnums", given_positions[0] if single else tuple(given_positions))
    diff = {n: e.filter if isinstance(e, nnx.DiffState) else wrt for n, e in zip(nums, entries)}
    given["state_policy"] = "sequential"  # BatchStat is no core state argument
    # The user's positions, so that a message names what the user gave.
    options = Options.create(argnums=next(iter(diff)) if single else tuple(diff), **given)
    if 0 in options.batch_argnums:
      raise ValueError(
          f"batch_argnums={options.batch_argnums} names position 0, the module; the "
          "batch arguments come after it")
    return cls(diff, single, policy, options)

  def core_options(self, num_args: int, param_specs: Any) -> Options:
    """The core's options for ``pure(diff, *args, stats, rest, keys, frozen)``:
    the differentiated trees are one argument in front, the states at the end."""
    o = self.options
    data = o.data if o.data is None else dataclasses.replace(o.data, param_specs=param_specs)
    states = (num_args + 1, num_args + 2)
    return dataclasses.replace(
        o, argnums=(0,), has_aux=True, argnums_is_int=True, data=data,
        batch_argnums=tuple(i + 1 for i in o.batch_argnums),
        state_argnums=states, state_is_tuple=True, positions=(0, *states),
        state_policies=(self.state_policy, "sequential"))

  def param_specs(self, diff: tuple) -> Any:
    """The core's ``param_specs`` for the differentiated trees ``diff``.

    The user's, or else the partition specs in the Variables' sharding
    metadata (:func:`flax.nnx.get_partition_spec`): on Auto mesh axes an
    array's sharding is invisible inside ``jit``, the metadata is not.
    """
    data = self.options.data
    if data is None:
      return None
    if data.param_specs is not None:
      return (data.param_specs,) if self.single else tuple(data.param_specs)
    is_state = lambda x: isinstance(x, nnx.State)  # noqa: E731
    return tuple(jax.tree.map(lambda x: nnx.get_partition_spec(x) if is_state(x) else P(),
                              tree, is_leaf=is_state) for tree in diff)


class _Accumulated:
  """The accumulated function: one core function per structure of arguments."""

  def __init__(self, f: Callable[..., Any], spec: _Spec, *, value_and_grad: bool):
    self.f, self.spec = f, spec
    options = spec.options
    layout = Layout(options.has_aux, with_stats=options.with_stats)
    self.nest = layout.value_and_grad if value_and_grad else layout.grad
    self.cores: dict[Any, Callable[..., Any]] = {}

  def function(self) -> Callable[..., Any]:
    """A plain function with ``f``'s name and signature (what ``nnx.jit`` wraps)."""
    return functools.wraps(self.f)(traceback_util.api_boundary(self.__call__))

  def __call__(self, *args, **kwargs):
    spec = self.spec
    args, kwargs = _bound(self.f, args, kwargs)
    microbatch.check_positions(spec.options, spec.options.batch_argnums + tuple(spec.diff),
                               len(args))
    arguments, parts, plain = _nnx_args.Arguments.split(args, spec.diff)
    diff = tuple(plain[i] for i in spec.diff)
    param_specs = spec.param_specs(diff)
    # The filters are the same for every call (and may be unhashable lists).
    key = (arguments._replace(diff=()),
           tuple(jax.tree.leaves(param_specs, is_leaf=_specs.is_spec)))
    if key not in self.cores:
      self.cores[key] = self._core(arguments, spec.core_options(len(args), param_specs))
    others = tuple(None if i in spec.diff else a for i, a in enumerate(plain))
    try:
      outputs = self.cores[key](diff, *others, parts["stats"], parts["rest"], parts["keys"],
                                parts["frozen"], **kwargs)
    except (TypeError, ValueError) as e:
      hint = _unsplit_hint(spec, plain)
      if hint is None:
        raise
      raise type(e)(f"{e}\n\n{hint}") from e
    for node, stats, rest in zip(arguments.nodes(args), *outputs.states):
      nnx.update(node, stats, rest)
    return self.nest(outputs._replace(grads=self._grads(outputs.grads), states=()))

  def _grads(self, grads: Any) -> Any:
    """The gradients as the user's ``argnums`` nest them (deferred ones too)."""
    if isinstance(grads, DeferredGrads):
      return DeferredGrads(self._grads(grads.partials), grads.axes)
    return grads[0] if self.spec.single else grads

  def _core(self, arguments: _nnx_args.Arguments, options: Options) -> Callable[..., Any]:
    """The core accumulated function for one structure of arguments."""
    f, has_aux, diff_at = self.f, self.spec.options.has_aux, tuple(self.spec.diff)
    num_args, data_axis = len(arguments.treedefs), options.data_axis

    def pure(diff, *pure_args, **kwargs):
      plain = list(pure_args[:num_args])
      for i, tree in zip(diff_at, diff):
        plain[i] = tree
      stats, rest, keys, frozen = pure_args[num_args:]
      if data_axis:
        keys = parallel.salt_keys(keys, data_axis)
      user = arguments.merge(tuple(plain), stats, rest, keys, frozen)
      out = f(*user, **kwargs)
      loss, aux = out if has_aux else (out, ())
      return loss, (aux, arguments.states(user))

    pure.__signature__ = _pure_signature(self.f, num_args)
    return accumulate.build(pure, options)


def _unsplit_hint(spec: _Spec, plain: list) -> str | None:
  """Where tracing failed, the differentiated arguments (whole in every
  micro-batch) that have the batch's size, as the core names other arguments."""
  leading = accumulate.leading_size
  batch = [plain[i] for i in spec.options.batch_argnums if i < len(plain)]
  size = leading(batch)
  suspects = [i for i in spec.diff if size is not None and leading(plain[i]) == size]
  if not suspects:
    return None
  return (f"differentiated argument(s) {suspects} of this call are passed whole to every "
          f"micro-batch but have the batch's size {size} along their leading axis: if "
          f"one is part of the batch, it cannot also be differentiated; name the batch "
          f"in batch_argnums (now {spec.options.batch_argnums}) and differentiate the "
          "parameters (argnums=0 for the model)")


def _pure_signature(f: Callable[..., Any], num_args: int) -> inspect.Signature:
  """The signature the core reads for ``pure(diff, *args, stats, rest, keys,
  frozen)``: ``f``'s positional parameters by name, one place on, so that
  ``batch_argnames`` naming one of them finds it at its position (every
  argument reaches the core by position, :func:`_bound`)."""
  params = microbatch.positional_names(f)
  names = [(params[i] if i < len(params) else None) or f"_jaxaccum_arg{i}"
           for i in range(num_args)]
  names = ["_jaxaccum_diff", *names, *(f"_jaxaccum_{k}" for k in ("stats", "rest", "keys",
                                                                   "frozen"))]
  kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
  return inspect.Signature([inspect.Parameter(n, kind) for n in names]
                           + [inspect.Parameter("_jaxaccum_kwargs", inspect.Parameter.VAR_KEYWORD)])


def _bound(f: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
  """Arguments passed by keyword moved to their positions where ``f``'s
  signature allows, so a batch named by position may be passed by keyword,
  as the core binds it (the core sees a wrapper of ``f``, not its signature)."""
  try:
    bound = inspect.signature(f).bind(*args, **kwargs)
  except (TypeError, ValueError):
    return args, kwargs
  return bound.args, bound.kwargs
