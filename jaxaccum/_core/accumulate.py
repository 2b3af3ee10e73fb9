"""In-step gradient accumulation: the public ``value_and_grad`` and ``grad``.

One call: the options (validated once, :mod:`jaxaccum._core.options`) and the
call's arguments give its :class:`~jaxaccum._core.microbatch.Plan` and strategy,
worked out once; the loop (:mod:`jaxaccum._core.loop`) runs under the strategy
and returns :class:`~jaxaccum._core.loop.Outputs`, which a :class:`Layout` nests
the way :func:`jax.value_and_grad` nests its result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import traceback_util

from jaxaccum._core import loop as _loop
from jaxaccum._core import microbatch
from jaxaccum._devices import data_axis as _data_axis
from jaxaccum._core.microbatch import Binding, Plan
from jaxaccum._core.options import AuxReduction, Options, Reduction, StatePolicy
from jaxaccum._devices.data_axis import DataAxis, FsdpGather

AxisName = Hashable | Sequence[Hashable] | None


def value_and_grad(
    fun: Callable[..., Any],
    *,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    argnums: int | Sequence[int] = 0,
    batch_argnums: int | Sequence[int] | None = None,
    batch_argnames: str | Sequence[str] = (),
    has_aux: bool = False,
    weight_fn: Callable[..., jax.typing.ArrayLike] | None = None,
    reduction: Reduction = "mean",
    aux_reduction: AuxReduction | Any = "mean",
    accumulator_dtype: jax.typing.DTypeLike | None = jnp.float32,
    rng_argnums: int | Sequence[int] = (),
    axis_name: AxisName = None,
    data_axis: AxisName | DataAxis = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    state_argnums: int | Sequence[int] = (),
    state_policy: StatePolicy | Sequence[StatePolicy] = "sequential",
    with_stats: bool = False,
    skip_nonfinite: bool = False,
    fsdp_gather: FsdpGather = "once",
    param_specs: Any = None,
    defer_reduction: bool = False,
    in_axes: int | Sequence[int] = 0,
    num_real_microbatches: int | jax.Array | None = None,
) -> Callable[..., Any]:
  """Like :func:`jax.value_and_grad`, accumulated over micro-batches.

  The batch arguments are split into ``N`` strided micro-batches (micro-batch
  ``i`` holds rows ``i, i + N, i + 2N, ...``) and ``fun`` is differentiated on
  one at a time inside a ``lax.scan``, so activations are held for one
  micro-batch only; ``fun`` is traced once. Roughly this Python loop::

    grads_sum, value_sum, weight_sum = 0, 0, 0
    for i in range(N):                  # range(num_real_microbatches)
      micro = batch[i::N]
      w = weight_fn(micro) if weight_fn else 1
      value, grads = jax.value_and_grad(fun)(params, micro, fold_in(key, i))
      grads_sum += w * grads            # in accumulator_dtype; 0 if w == 0
      value_sum += w * value
      weight_sum += w
    grads = grads_sum / weight_sum      # "mean"; "sum" returns grads_sum
    # axis_name / data_axis: reduced across devices here, once

  Args:
    fun: returns a scalar loss (``(loss, aux)`` with ``has_aux=True``).
    num_microbatches: ``N``; exactly one of this and ``microbatch_size``.
    microbatch_size: rows per micro-batch, ``B / N``.
    argnums: positional argument(s) to differentiate with respect to.
    batch_argnums: the batch argument(s) (default ``1``), bound to ``fun``'s
      signature as ``jax.jit`` binds ``static_argnums``.
    batch_argnames: keyword batch argument(s).
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    weight_fn: ``weight_fn(*micro_batch_args)``, one micro-batch's weight.
    reduction: ``"mean"`` or ``"sum"`` over micro-batches.
    aux_reduction: ``"mean"``, ``"sum"``, ``"stack"``, ``"concat"``, or a
      pytree prefix of the aux of these.
    accumulator_dtype: the least precise dtype gradients are summed in.
    rng_argnums: PRNG key argument(s); micro-batch ``i`` gets ``fold_in(key, i)``.
    axis_name: inside ``pmap`` / ``shard_map``: the axis to reduce over.
    data_axis: under ``jit`` over a batch sharded along this mesh axis (axes),
      or a :class:`jaxaccum.DataAxis` (the plan shared with ``multi_steps``).
    mesh: the mesh of ``data_axis`` (default: the ambient mesh).
    state_argnums: mutable state argument(s), such as BatchNorm statistics.
    state_policy: ``"sequential"`` or ``"mean"``, per state argument.
    with_stats: also return :class:`jaxaccum.AccumulationStats`.
    skip_nonfinite: leave out micro-batches with non-finite loss or gradients.
    fsdp_gather: ``"once"`` or ``"per_microbatch"`` (FSDP parameters).
    param_specs: on Auto mesh axes, the differentiated arguments' specs.
    defer_reduction: return :class:`jaxaccum.DeferredGrads` (``data_axis``).
    in_axes: the batch axis of each batch argument (one int for all).
    num_real_microbatches: compute the first ``n <= N`` only (may be traced).

  Returns:
    A function with ``fun``'s signature returning what
    ``jax.value_and_grad(fun, argnums, has_aux)`` returns. Every option in
    detail: ``docs/semantics.md``; devices: ``docs/scale-out.md``,
    ``docs/sharded.md``.

  Raises:
    TypeError: an option of the wrong type; at call time, a batch leaf that
      is not an array.
    ValueError: an option of a wrong value; at call time, a batch size that
      ``N`` does not divide or leaves of different batch sizes.

  Example:

    >>> import jax, jax.numpy as jnp, jaxaccum
    >>> def loss(w, batch):
    ...   x, y = batch
    ...   return jnp.mean((x @ w - y) ** 2)
    >>> x = jnp.arange(32.0).reshape(16, 2) / 10
    >>> y = x @ jnp.array([1.0, -2.0])
    >>> w = jnp.zeros(2)
    >>> value, grads = jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=4))(w, (x, y))
    >>> ref_value, ref_grads = jax.value_and_grad(loss)(w, (x, y))
    >>> bool(jnp.allclose(grads, ref_grads)), bool(jnp.allclose(value, ref_value))
    (True, True)
  """
  options = Options.create(**_keywords(locals()))
  return functools.wraps(fun)(_public(fun, options, Layout.of(options).value_and_grad))


def grad(
    fun: Callable[..., Any],
    *,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    argnums: int | Sequence[int] = 0,
    batch_argnums: int | Sequence[int] | None = None,
    batch_argnames: str | Sequence[str] = (),
    has_aux: bool = False,
    weight_fn: Callable[..., jax.typing.ArrayLike] | None = None,
    reduction: Reduction = "mean",
    aux_reduction: AuxReduction | Any = "mean",
    accumulator_dtype: jax.typing.DTypeLike | None = jnp.float32,
    rng_argnums: int | Sequence[int] = (),
    axis_name: AxisName = None,
    data_axis: AxisName | DataAxis = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    state_argnums: int | Sequence[int] = (),
    state_policy: StatePolicy | Sequence[StatePolicy] = "sequential",
    with_stats: bool = False,
    skip_nonfinite: bool = False,
    fsdp_gather: FsdpGather = "once",
    param_specs: Any = None,
    defer_reduction: bool = False,
    in_axes: int | Sequence[int] = 0,
    num_real_microbatches: int | jax.Array | None = None,
) -> Callable[..., Any]:
  """Like :func:`jax.grad`, accumulated over micro-batches.

  Takes the options of :func:`jaxaccum.value_and_grad` and returns only the
  gradients: ``grads``, or ``(grads, aux)`` with ``has_aux=True`` (the aux slot
  holds the final state with ``state_argnums``), and ``(that, stats)`` with
  ``with_stats=True``.

  Example:

    >>> import jax.numpy as jnp, jaxaccum
    >>> loss = lambda w, x: jnp.mean((x * w) ** 2)
    >>> g = jaxaccum.grad(loss, num_microbatches=2)(jnp.float32(3.0), jnp.arange(4.0))
    >>> float(g)  # d/dw mean(x^2 w^2) = 2 w mean(x^2) = 6 * 3.5
    21.0
  """
  options = Options.create(**_keywords(locals()))
  return functools.wraps(fun)(_public(fun, options, Layout.of(options).grad))


def _keywords(names: dict[str, Any]) -> dict[str, Any]:
  """The public keyword arguments among a function's locals."""
  return {k: v for k, v in names.items() if k != "fun"}


def _public(fun: Callable[..., Any], options: Options,
            nest: Callable[[_loop.Outputs], Any]) -> Callable[..., Any]:
  core = build(fun, options)

  @traceback_util.api_boundary
  def accumulated(*args, **kwargs):
    return nest(core(*args, **kwargs))

  return accumulated


def build(fun: Callable[..., Any], options: Options) -> Callable[..., _loop.Outputs]:
  """The accumulated ``fun``: ``(*args, **kwargs) -> Outputs``.

  Called outside any trace it runs under a jit of its own, made once here,
  so it compiles once per shapes (non-array leaves are static); with a single
  micro-batch it calls ``fun`` eagerly, bit-identical to
  :func:`jax.value_and_grad`.
  """
  grad_fn = jax.value_and_grad(
      _checked(fun, options),
      argnums=options.argnums[0] if options.argnums_is_int else options.argnums,
      has_aux=options.has_aux or bool(options.state_argnums))
  binding = Binding.of(fun, options)

  def accumulate(plan: Plan, args: tuple, kwargs: dict) -> _loop.Outputs:
    try:
      return _loop.accumulate(options, plan, grad_fn, args, kwargs)
    except (TypeError, ValueError) as e:
      hint = _unsplit_hint(options, plan, args, kwargs)
      if hint is None:
        raise
      raise type(e)(f"{e}\n\n{hint}") from e

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def compiled(plan, static, arrays):
    return accumulate(plan, *_Static.merge(static, arrays))

  def call(*args, **kwargs):
    microbatch.check_positions(options, options.positions, len(args))
    devices = _data_axis.data_devices(options.data)
    plan = microbatch.plan(options, binding, args, kwargs, devices)
    if options.axis_name or _traced((args, kwargs)) or (
        not options.data_axis and plan.n == 1):
      return accumulate(plan, args, kwargs)
    static, arrays = _Static.split((args, kwargs))
    if static is None:
      return accumulate(plan, args, kwargs)
    return compiled(plan, static, arrays)

  return call


def _unsplit_hint(options: Options, plan: Plan, args: tuple, kwargs: dict) -> str | None:
  """Where tracing failed, the arguments left whole that have the batch's size."""
  whole = [i for i, a in enumerate(args)
           if i not in plan.positions and leading_size(a) == plan.size]
  # A differentiated argument is a suspect too (argnums=1 on a batch-sized x).
  diff = [i for i in whole if i in options.argnums]
  suspects = [f"{'differentiated' if i in diff else 'positional'} argument {i}" for i in whole]
  suspects += [f"keyword argument {k!r}" for k, v in kwargs.items()
               if k not in plan.names and leading_size(v) == plan.size]
  if not suspects or plan.n == 1:
    return None
  never = ("; a differentiated argument is never split: differentiate the parameters "
           "(argnums) and pass the data in batch_argnums") if diff else ""
  return (f"{', '.join(suspects)} of this call is passed whole to every micro-batch "
          f"but has the batch's size {plan.size} along its leading axis: if it is part "
          f"of the batch, name it in batch_argnums (now {options.batch_argnums}) or "
          f"batch_argnames (now {options.batch_argnames}), e.g. batch_argnums=(1, 2) "
          f"for loss(params, x, y){never}")


def leading_size(tree: Any) -> int | None:
  """The leading size shared by ``tree``'s array leaves (``None``: none shared)."""
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(tree) if np.ndim(x) > 0}
  return sizes.pop() if len(sizes) == 1 else None


def _checked(fun: Callable[..., Any], options: Options) -> Callable[..., Any]:
  """``fun``, with a clear error when its output does not match the options."""
  if not (options.has_aux or options.state_argnums):
    return fun

  @functools.wraps(fun)
  def checked(*args, **kwargs):
    out = fun(*args, **kwargs)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
      because = (f"state_argnums={options.state_argnums}" if options.state_argnums
                 else "has_aux=True")
      expected = "(loss, aux)" if not options.state_argnums else (
          "(loss, (aux, new_state))" if options.has_aux else "(loss, new_state)")
      got = (f"an array of shape {jnp.shape(out)}" if hasattr(out, "shape")
             else f"a {type(out).__name__}")
      raise TypeError(f"with {because}, fun must return {expected}; it returned {got}")
    return out

  return checked


def _traced(tree: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


class Layout(NamedTuple):
  """The nesting of one accumulated function's result.

  Attributes:
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    num_states: how many state arguments there are.
    state_is_tuple: whether the states come back as a tuple (a tuple
      ``state_argnums``) rather than one state.
    with_stats: whether the result is paired with the statistics.
  """

  has_aux: bool
  num_states: int = 0
  state_is_tuple: bool = False
  with_stats: bool = False

  @classmethod
  def of(cls, options: Options) -> Layout:
    """The layout of :func:`value_and_grad`'s result for ``options``."""
    return cls(options.has_aux, len(options.state_argnums), options.state_is_tuple,
               options.with_stats)

  def _aux_slot(self, aux: Any, states: tuple) -> Any:
    if not self.num_states:
      return aux
    state = states if self.state_is_tuple else states[0]
    return (aux, state) if self.has_aux else state

  @property
  def has_aux_slot(self) -> bool:
    return self.has_aux or bool(self.num_states)

  def value_and_grad(self, outputs: Any) -> Any:
    """``(value, grads)`` or ``((value, aux), grads)``, and the statistics."""
    value = outputs.value
    if self.has_aux_slot:
      value = (value, self._aux_slot(outputs.aux, outputs.states))
    return self._with_stats((value, outputs.grads), outputs.stats)

  def grad(self, outputs: Any) -> Any:
    """``grads`` or ``(grads, aux)``, and the statistics."""
    grads = outputs.grads
    if self.has_aux_slot:
      grads = (grads, self._aux_slot(outputs.aux, outputs.states))
    return self._with_stats(grads, outputs.stats)

  def _with_stats(self, result: Any, stats: Any) -> Any:
    return (result, stats) if self.with_stats else result


class _Static:
  """The non-array leaves of a call, hashed as static arguments of the jit.

  Python scalars are compared by type and value, so repeated calls with the
  same ones reuse the compiled step (and ``1`` and ``True`` do not collide).
  """

  def __init__(self, treedef, values):
    self.treedef, self.values = treedef, values

  @classmethod
  def split(cls, tree: Any) -> tuple[_Static | None, list]:
    leaves, treedef = jax.tree.flatten(tree)
    is_array = [isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves]
    static = cls(treedef, tuple((i, type(x), x) for i, (x, a) in
                                enumerate(zip(leaves, is_array)) if not a))
    try:
      hash(static)
    except TypeError:
      return None, []
    return static, [x if a else None for x, a in zip(leaves, is_array)]

  @staticmethod
  def merge(static: _Static, arrays: list) -> Any:
    leaves = list(arrays)
    for i, _, x in static.values:
      leaves[i] = x
    return static.treedef.unflatten(leaves)

  def _key(self):
    return (self.treedef, self.values)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, _Static) and self._key() == other._key()
