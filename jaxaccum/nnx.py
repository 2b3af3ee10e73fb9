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
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxaccum import _accumulate, _collectives, _compat, _split

__all__ = ["grad", "value_and_grad"]


def value_and_grad(
    f: Callable[..., Any],
    *,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    batch_argnums: int | Sequence[int] = 1,
    weight_fn: Callable[..., jax.typing.ArrayLike] | None = None,
    reduction: str = "mean",
    aux_reduction: str = "mean",
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
      ``sow``), and its arguments after the module are arrays or pytrees.
    wrt: an NNX filter of the variables to differentiate (default
      :class:`flax.nnx.Param`), as for :class:`flax.nnx.Optimizer`. Parameters
      it leaves out are held constant.
    has_aux: whether ``f`` returns ``(loss, aux)``.
    num_microbatches: number of micro-batches ``N``. Exactly one of this and
      ``microbatch_size`` is given.
    microbatch_size: rows per micro-batch, ``B / N``.
    batch_argnums: position(s) of the batch argument(s) in ``f``'s signature
      (the module is position 0, so at least 1).
    weight_fn: ``weight_fn(*micro_batch_args)``: the weight of one micro-batch,
      as in :func:`jaxaccum.value_and_grad`.
    reduction: ``"mean"`` or ``"sum"`` over micro-batches.
    aux_reduction: ``"mean"``, ``"sum"`` or ``"stack"``.
    accumulator_dtype: dtype the gradients are summed in.
    axis_name: mesh axis name(s) for use inside ``jax.shard_map`` /
      ``jax.pmap``: one reduction after the loop.
    data_axis: mesh axis the batch is sharded over, for a jitted step.
    mesh: the mesh for ``data_axis`` (default: the ambient mesh).
    state_policy: for :class:`flax.nnx.BatchStat` variables: ``"sequential"``
      (micro-batch ``i`` sees the statistics left by ``i - 1``, as ``N`` small
      forward passes) or ``"mean"`` (every micro-batch starts from the input
      statistics; the module gets the mean of the ``N`` updated ones).
    with_stats: also return a :class:`jaxaccum.AccumulationStats`: the result
      becomes ``(result, stats)``.
    skip_nonfinite: leave out every micro-batch whose loss or gradients are
      not finite (its state update is dropped too).

  Returns:
    A function with ``f``'s signature returning ``(loss, grads)`` or
    ``((loss, aux), grads)``, ``grads`` an :class:`flax.nnx.State` of the
    ``wrt`` variables (and ``(that, stats)`` with ``with_stats=True``).

  Raises:
    ValueError: invalid options, e.g. ``batch_argnums`` naming the module.

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
  batch_t = _split.normalize_argnums("batch_argnums", batch_argnums)
  if 0 in batch_t:
    raise ValueError(f"{batch_argnums=} names the module (position 0); the batch "
                     "arguments come after it")
  if state_policy not in _accumulate._STATE_POLICIES:
    raise ValueError(f"{state_policy=} must be one of {_accumulate._STATE_POLICIES}")
  # The module's variables, in the order nnx.split returns them; the first
  # filter that matches a variable wins.
  filters = (wrt, nnx.BatchStat, nnx.RngKey, nnx.Param, ...)
  axes = None if data_axis is None else _collectives.axes_of(data_axis)

  @functools.wraps(f)
  def wrapped(model, *args, **kwargs):
    graphdef, diff, stats, keys, frozen, rest = nnx.split(model, *filters)
    num_args = len(args)
    if batch_t and max(batch_t) > num_args:
      raise ValueError(f"{batch_argnums=} names an argument beyond the "
                       f"{num_args} passed after the module")

    def pure(diff, *pure_args, **pure_kwargs):
      user_args = pure_args[:num_args]
      stats, rest, keys, frozen = pure_args[num_args:]
      if axes is not None:
        keys = jax.tree.map(
            functools.partial(_fold_in, data=lax.axis_index(
                axes if len(axes) > 1 else axes[0])), keys)
      # A copy, so the forward pass mutates fresh variables, not the caller's.
      local = _compat.nnx_merge_copy(graphdef, diff, stats, keys, frozen, rest)
      out = f(local, *user_args, **pure_kwargs)
      _, _, new_stats, _, _, new_rest = nnx.split(local, *filters)
      loss, aux = out if has_aux else (out, ())
      return loss, (aux, (new_stats, new_rest))

    state_argnums = (num_args + 1, num_args + 2)
    vg = _accumulate.value_and_grad(
        pure, num_microbatches=num_microbatches, microbatch_size=microbatch_size,
        argnums=0, batch_argnums=batch_t, has_aux=True, weight_fn=weight_fn,
        reduction=reduction, aux_reduction=aux_reduction,
        accumulator_dtype=accumulator_dtype, axis_name=axis_name,
        data_axis=data_axis, mesh=mesh, state_argnums=state_argnums,
        state_policy=(state_policy, "sequential"), with_stats=with_stats,
        skip_nonfinite=skip_nonfinite)
    result = vg(diff, *args, stats, rest, keys, frozen, **kwargs)
    ((loss, (aux, (new_stats, new_rest))), grads), extra = (
        result if with_stats else (result, None))
    nnx.update(model, new_stats, new_rest)
    out = ((loss, aux) if has_aux else loss), grads
    return (out, extra) if with_stats else out

  return wrapped


def grad(f: Callable[..., Any], **options: Any) -> Callable[..., Any]:
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
  return _accumulate.drop_value(value_and_grad(f, **options), f,
                                has_aux=options.get("has_aux", False),
                                with_stats=options.get("with_stats", False))


def _fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
  """``jax.random.fold_in`` for an array of keys of any shape."""
  # A raw uint32 key is an array of shape (..., 2), a typed key a scalar.
  raw = not jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  flat = key.reshape((-1, key.shape[-1]) if raw else (-1,))
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(flat).reshape(key.shape)
