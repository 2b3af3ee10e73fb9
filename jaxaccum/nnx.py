"""Flax NNX adapters: :func:`value_and_grad` and :func:`grad` for NNX modules.

They mirror :func:`flax.nnx.value_and_grad` / :func:`flax.nnx.grad`: the loss
takes the module first, the gradients come back as an :class:`flax.nnx.State`
of the variables selected by ``wrt`` (what :meth:`flax.nnx.Optimizer.update`
takes), and the module's mutable state (BatchNorm statistics, RNG counts) is
updated in place. Inside, the module is split into arrays and handed to
:func:`jaxaccum.value_and_grad`:

- the ``wrt`` variables are differentiated;
- :class:`flax.nnx.BatchStat` variables follow ``state_policy``;
- every other variable that the forward pass may change (RNG counts, caches,
  counters) is threaded sequentially, so micro-batch ``i`` sees what
  micro-batch ``i - 1`` left, as ``N`` small forward passes would: each
  micro-batch draws distinct dropout keys from the module's ``nnx.Rngs``;
- RNG keys and parameters outside ``wrt`` are constants.

NNX objects passed after the module (an ``nnx.Rngs``, a second module) are
handled the same way: their variables are threaded through the loop, so an
``nnx.Rngs`` argument draws distinct keys in every micro-batch. The core
function is built once per graph structure, so outside :func:`flax.nnx.jit`
a step compiles once per graph structure and shapes.

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
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src import traceback_util

from jaxaccum import _accumulate, _compat, _parallel
from jaxaccum._options import STATE_POLICIES, Options, argnums_tuple
from jaxaccum._accumulate import Layout

__all__ = ["grad", "value_and_grad"]

# The variables of each NNX argument, in the order nnx.split returns them;
# the first filter that matches a variable wins.
_PARTS = ("diff", "stats", "keys", "frozen", "rest")


def value_and_grad(
    f: Callable[..., Any],
    *,
    argnums: int | nnx.DiffState | Sequence[int | nnx.DiffState] = 0,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    batch_argnums: int | Sequence[int] | None = None,
    batch_argnames: str | Sequence[str] = (),
    weight_fn: Callable[..., jax.typing.ArrayLike] | None = None,
    reduction: str = "mean",
    aux_reduction: Any = "mean",
    accumulator_dtype: jax.typing.DTypeLike | None = jnp.float32,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    data_axis: Hashable | Sequence[Hashable] | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    state_policy: str = "sequential",
    with_stats: bool = False,
    skip_nonfinite: bool = False,
) -> Callable[..., Any]:
  """Like :func:`flax.nnx.value_and_grad`, accumulated over micro-batches.

  ``f(model, *args)`` takes an NNX module first; the batch arguments (named by
  ``batch_argnums``, as in :func:`jaxaccum.value_and_grad`) are split into
  ``N`` micro-batches and ``f`` is differentiated on one at a time inside a
  ``lax.scan``. Like :func:`flax.nnx.value_and_grad`, the returned function
  updates the module's state in place: BatchNorm statistics follow
  ``state_policy``; RNG counts and any other mutated variable advance
  micro-batch after micro-batch (so each micro-batch draws distinct dropout
  keys, exactly those of ``N`` small forward passes). Use it under
  :func:`flax.nnx.jit`. Under ``data_axis``, the RNG keys are also folded with
  the device's index along that axis, so devices draw different masks.

  Args:
    f: ``f(model, *args)`` returning a scalar loss, or ``(loss, aux)`` with
      ``has_aux=True``. It must not add variables to the module (no
      ``sow``). Its arguments are NNX objects (modules, ``nnx.Rngs``),
      arrays or pytrees of arrays.
    argnums: as for :func:`flax.nnx.value_and_grad`: the position(s) of the
      NNX objects to differentiate, each an int (its ``wrt`` variables) or an
      :class:`flax.nnx.DiffState` naming its own filter. A tuple returns a
      tuple of gradient states.
    wrt: an NNX filter of the variables to differentiate (default
      :class:`flax.nnx.Param`) for the ``argnums`` given as ints, as for
      :class:`flax.nnx.Optimizer`. Parameters it leaves out are held constant.
    has_aux: whether ``f`` returns ``(loss, aux)``.
    num_microbatches: number of micro-batches ``N``. Exactly one of this and
      ``microbatch_size`` is given.
    microbatch_size: rows per micro-batch, ``B / N``.
    batch_argnums: position(s) of the batch argument(s) in ``f``'s signature
      (the module is position 0, so at least 1).
    batch_argnames: keyword argument(s) of ``f`` holding batches, split like
      ``batch_argnums``; given alone, they replace the default
      ``batch_argnums=1``.
    weight_fn: ``weight_fn(*micro_batch_args, **micro_batch_kwargs)``: the
      weight of one micro-batch, as in :func:`jaxaccum.value_and_grad`.
    reduction: ``"mean"`` or ``"sum"`` over micro-batches.
    aux_reduction: ``"mean"``, ``"sum"``, ``"stack"``, ``"concat"``, or a
      pytree of them, as in :func:`jaxaccum.value_and_grad`.
    accumulator_dtype: dtype the gradients are summed in.
    axis_name: mesh axis name(s) for use inside ``jax.shard_map`` /
      ``jax.pmap``: one reduction after the loop.
    data_axis: mesh axis the batch is sharded over, for a jitted step.
    mesh: the mesh for ``data_axis`` (default: the ambient mesh).
    state_policy: for :class:`flax.nnx.BatchStat` variables: ``"sequential"``
      (micro-batch ``i`` sees the statistics left by ``i - 1``, as ``N`` small
      forward passes: with momentum ``m`` the running averages move about
      ``(1 - m**N) / (1 - m)`` times as far per step as with the full batch)
      or ``"mean"`` (every micro-batch starts from the input statistics; the
      module gets the mean of the ``N`` updated ones, which move as far as
      with the full batch). Neither gives the full batch's running averages:
      each micro-batch is normalized with its own statistics, so ``"mean"``
      matches the full batch's running mean in the first BatchNorm layer only,
      as :func:`jaxaccum.value_and_grad` details.
    with_stats: also return a :class:`jaxaccum.AccumulationStats`: the result
      becomes ``(result, stats)``.
    skip_nonfinite: leave out every micro-batch whose loss or gradients are
      not finite (its state update is dropped too).

  Returns:
    A function with ``f``'s signature returning ``(loss, grads)`` or
    ``((loss, aux), grads)``, ``grads`` an :class:`flax.nnx.State` of the
    ``wrt`` variables (and ``(that, stats)`` with ``with_stats=True``).

  Raises:
    TypeError: an option of the wrong type.
    ValueError: an option of a wrong value, e.g. ``batch_argnums`` naming the
      module.

  Example:

    >>> import jax.numpy as jnp, optax, jaxaccum.nnx
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((model(x) - y) ** 2)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   loss, grads = jaxaccum.nnx.value_and_grad(
    ...       loss_fn, num_microbatches=4, batch_argnums=(1, 2))(model, x, y)
    ...   optimizer.update(model, grads)
    ...   return loss
    >>> x = jnp.arange(24.0).reshape(8, 3) / 24
    >>> y = x.sum(axis=1, keepdims=True)
    >>> loss, grads = jaxaccum.nnx.value_and_grad(
    ...     loss_fn, num_microbatches=4, batch_argnums=(1, 2))(model, x, y)
    >>> ref_loss, ref_grads = nnx.value_and_grad(loss_fn)(model, x, y)
    >>> bool(jnp.allclose(loss, ref_loss)), bool(jnp.allclose(
    ...     grads["kernel"][...], ref_grads["kernel"][...]))
    (True, True)
    >>> first = float(train_step(model, optimizer, x, y))
    >>> float(train_step(model, optimizer, x, y)) < first
    True
  """
  return _Accumulated(f, _Spec.create(locals()), value_and_grad=True).function()


def grad(
    f: Callable[..., Any],
    *,
    argnums: int | nnx.DiffState | Sequence[int | nnx.DiffState] = 0,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    batch_argnums: int | Sequence[int] | None = None,
    batch_argnames: str | Sequence[str] = (),
    weight_fn: Callable[..., jax.typing.ArrayLike] | None = None,
    reduction: str = "mean",
    aux_reduction: Any = "mean",
    accumulator_dtype: jax.typing.DTypeLike | None = jnp.float32,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    data_axis: Hashable | Sequence[Hashable] | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    state_policy: str = "sequential",
    with_stats: bool = False,
    skip_nonfinite: bool = False,
) -> Callable[..., Any]:
  """Like :func:`flax.nnx.grad`, accumulated over micro-batches.

  Takes the options of :func:`jaxaccum.nnx.value_and_grad` and returns only
  the gradients: ``grads``, ``(grads, aux)`` with ``has_aux=True``, and
  ``(that, stats)`` with ``with_stats=True``. The module's state is updated in
  place as with :func:`jaxaccum.nnx.value_and_grad`.

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
  """The validated options: the differentiated arguments and the core's options.

  Attributes:
    diff: ``{position: filter}`` of the differentiated NNX arguments.
    single: whether ``argnums`` named one argument (grads not in a tuple).
    state_policy: the policy of :class:`flax.nnx.BatchStat` variables.
    options: the core's options for the user's positions (``argnums`` is a
      placeholder; positions are shifted when the core function is built).
  """

  diff: dict[int, Any]
  single: bool
  state_policy: str
  options: Options

  @classmethod
  def create(cls, names: dict[str, Any]) -> _Spec:
    argnums, wrt = names["argnums"], names["wrt"]
    single = not isinstance(argnums, Sequence)
    entries = (argnums,) if single else tuple(argnums)
    diff = {}
    for entry in entries:
      if isinstance(entry, nnx.DiffState):
        diff[argnums_tuple("argnums", entry.argnum)[0]] = entry.filter
      else:
        diff[argnums_tuple("argnums", entry)[0]] = wrt
    if not diff or len(diff) != len(entries):
      raise ValueError(f"argnums must name distinct arguments, got {argnums=}")
    keywords = {k: v for k, v in names.items()
                if k not in ("f", "argnums", "wrt", "state_policy")}
    options = Options.create(**keywords)
    policy = names["state_policy"]
    if not isinstance(policy, str) or policy not in STATE_POLICIES:
      raise (ValueError if isinstance(policy, str) else TypeError)(
          f"state_policy={policy!r} must be one of {STATE_POLICIES}")
    named = set(options.batch_argnums) & (set(diff) | {0})
    if named:
      raise ValueError(
          f"batch_argnums={options.batch_argnums} names NNX argument(s) {sorted(named)} "
          "(the module is position 0); the batch arguments come after it")
    return cls(diff, single, policy, options)


class _Accumulated:
  """The accumulated function: one core function per graph structure."""

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
    options = self.spec.options
    if options.batch_argnums and max(options.batch_argnums) >= len(args):
      raise ValueError(f"batch_argnums={options.batch_argnums} names an argument "
                       f"beyond the {len(args)} passed")
    nodes = tuple(i for i, a in enumerate(args) if nnx.graph.is_graph_node(a))
    missing = set(self.spec.diff) - set(nodes)
    if missing:
      raise ValueError(f"argnums names argument(s) {sorted(missing)}, which are not "
                       "NNX objects; jaxaccum.nnx differentiates NNX objects")
    splits = {i: nnx.split(args[i], *self._filters(i)) for i in nodes}
    graphdefs = tuple(splits[i][0] for i in nodes)
    key = (nodes, graphdefs, len(args))
    if key not in self.cores:
      self.cores[key] = self._core(nodes, graphdefs, len(args))
    parts = {name: tuple(splits[i][k + 1] for i in nodes) for k, name in enumerate(_PARTS)}
    plain = tuple(None if i in nodes else a for i, a in enumerate(args))
    diff = tuple(parts["diff"][nodes.index(i)] for i in self.spec.diff)
    outputs = self.cores[key](diff, *plain, parts["stats"], parts["rest"], parts["keys"],
                              parts["frozen"], **kwargs)
    new_stats, new_rest = outputs.states
    for i, stats, rest in zip(nodes, new_stats, new_rest):
      nnx.update(args[i], stats, rest)
    grads = outputs.grads[0] if self.spec.single else outputs.grads
    return self.nest(outputs._replace(grads=grads, states=()))

  def _filters(self, position: int) -> tuple:
    return (self.spec.diff.get(position, nnx.Nothing), nnx.BatchStat, nnx.RngKey,
            nnx.Param, ...)

  def _core(self, nodes: tuple[int, ...], graphdefs: tuple, num_args: int):
    """The core accumulated function for this graph structure."""
    f, options, diff_at = self.f, self.spec.options, tuple(self.spec.diff)
    data_axis = options.data_axis

    def pure(diff, *pure_args, **kwargs):
      user = list(pure_args[:num_args])
      stats, rest, keys, frozen = pure_args[num_args:]
      if data_axis:
        keys = _parallel.salt_keys(keys, data_axis)
      for k, i in enumerate(nodes):
        own = diff[diff_at.index(i)] if i in diff_at else nnx.State({})
        # A copy, so the forward pass mutates fresh variables, not the caller's.
        user[i] = _compat.nnx_merge_copy(graphdefs[k], own, stats[k], keys[k], frozen[k],
                                         rest[k])
      out = f(*user, **kwargs)
      new = [nnx.split(user[i], *self._filters(i)) for i in nodes]
      loss, aux = out if options.has_aux else (out, ())
      return loss, (aux, (tuple(s[2] for s in new), tuple(s[5] for s in new)))

    core_options = dataclasses.replace(
        options, argnums=(0,), argnums_is_int=True, has_aux=True,
        batch_argnums=tuple(i + 1 for i in options.batch_argnums),
        state_argnums=(num_args + 1, num_args + 2), state_is_tuple=True,
        state_policies=(self.spec.state_policy, "sequential"))
    return _accumulate.build(pure, core_options)
