"""In-step gradient accumulation: a ``lax.scan`` over micro-batches."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jaxaccum import _collectives, _loop, _split

PyTree = Any
_REDUCTIONS = ("mean", "sum")
_AUX_REDUCTIONS = ("mean", "sum", "stack")
_STATE_POLICIES = ("sequential", "mean")


def value_and_grad(
    fun: Callable[..., Any],
    *,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    argnums: int | Sequence[int] = 0,
    batch_argnums: int | Sequence[int] = 1,
    has_aux: bool = False,
    weight_fn: Callable[..., jax.typing.ArrayLike] | None = None,
    reduction: str = "mean",
    aux_reduction: str = "mean",
    accumulator_dtype: jax.typing.DTypeLike | None = jnp.float32,
    rng_argnums: int | Sequence[int] = (),
    axis_name: Hashable | Sequence[Hashable] | None = None,
    data_axis: Hashable | Sequence[Hashable] | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    state_argnums: int | Sequence[int] = (),
    state_policy: str | Sequence[str] = "sequential",
    with_stats: bool = False,
    skip_nonfinite: bool = False,
) -> Callable[..., Any]:
  """Like :func:`jax.value_and_grad`, accumulated over micro-batches.

  The batch arguments are split into ``N`` strided micro-batches (micro-batch
  ``i`` holds rows ``i, i + N, i + 2N, ...``) and ``fun`` is differentiated on
  one micro-batch at a time inside a ``lax.scan``, so activations are held for
  one micro-batch only. Roughly this Python loop::

    grads_sum, value_sum, weight_sum = 0, 0, 0
    for i in range(N):
      micro = batch[i::N]
      w = weight_fn(micro) if weight_fn else 1
      value, grads = jax.value_and_grad(fun)(params, micro, fold_in(key, i))
      grads_sum += w * grads            # in accumulator_dtype; 0 if w == 0
      value_sum += w * value
      weight_sum += w
    grads = grads_sum / weight_sum      # "mean"; "sum" returns grads_sum
    # with axis_name / data_axis: the sums are reduced across devices here,
    # once, after the loop

  Args:
    fun: function to differentiate, as for :func:`jax.value_and_grad`. It must
      return a scalar loss (or ``(loss, aux)`` with ``has_aux=True``).
    num_microbatches: number of micro-batches ``N``. Exactly one of this and
      ``microbatch_size`` is given.
    microbatch_size: rows per micro-batch, ``B / N``.
    argnums: positional argument(s) to differentiate with respect to.
    batch_argnums: positional argument(s) holding the batch: pytrees of arrays
      sharing one leading axis of size ``B``.
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    weight_fn: called as ``weight_fn(*micro_batch_args)``, returns the
      non-negative scalar weight of one micro-batch (e.g. its number of
      non-padding tokens). The result is
      then ``sum_i w_i f_i / sum_i w_i``; a micro-batch of weight zero
      contributes nothing, even a NaN loss, and if every weight is zero the
      value and gradients are zero.
    reduction: ``"mean"`` (over micro-batches, weighted by ``weight_fn``) or
      ``"sum"`` (``sum_i w_i f_i``; ``w_i = 1`` without ``weight_fn``).
    aux_reduction: ``"mean"`` (weighted by ``weight_fn`` when given; integer
      leaves come back as float32), ``"sum"`` (unweighted), or ``"stack"`` (a
      new leading axis of size ``N``).
    accumulator_dtype: the least precise dtype gradients are summed in
      (float32: bf16 gradients are summed in float32, float64 and complex
      ones in their own dtype); ``None`` sums each in its own dtype.
      Gradients come back in each parameter's dtype.
    rng_argnums: positional argument(s) that are PRNG keys; micro-batch ``i``
      receives ``jax.random.fold_in(key, i)``. With ``data_axis``, the key is
      first folded with the device's index along ``data_axis``, so rows on
      different devices get different randomness.
    axis_name: for code inside ``jax.pmap`` or ``jax.shard_map``: mesh axis
      name(s) over which the device-local results are reduced, once, after the
      loop (``psum`` of the sums, then the division of ``"mean"``). Value and
      aux are reduced the same way (a stacked aux: mean over devices for each
      micro-batch).
    data_axis: for plain ``jax.jit`` with the batch sharded over this mesh
      axis and the other arguments replicated: runs the loop in a
      ``jax.shard_map`` over that axis, with the reduction of ``axis_name``.
    mesh: the mesh for ``data_axis``; defaults to the ambient mesh
      (``jax.set_mesh``).
    state_argnums: positional argument(s) holding mutable model state, such as
      Flax Linen ``batch_stats``, threaded through the loop. ``fun`` then
      returns ``(loss, new_state)`` (``(loss, (aux, new_state))`` with
      ``has_aux``; a tuple of new states for a tuple ``state_argnums``), and the
      result carries the final state where ``jax.value_and_grad(fun,
      has_aux=True)`` would: ``((value, state), grads)``. Under
      ``axis_name`` / ``data_axis`` the final state is averaged over devices.
    state_policy: per state argument (or one for all): ``"sequential"``:
      micro-batch ``i`` sees the state left by micro-batch ``i - 1``, the same
      as ``N`` small forward passes; ``"mean"``: every micro-batch starts from
      the input state and the result is the mean of the ``N`` new states
      (integer leaves: floor of the mean).
    with_stats: also return an :class:`jaxaccum.AccumulationStats` (gradient
      noise scale, skipped micro-batches): the function then returns
      ``(result, stats)``. Costs one squared norm per micro-batch.
    skip_nonfinite: leave out of the sums every micro-batch whose loss or
      gradients hold a NaN or an infinity (its weight becomes zero, so the mean
      is over the others; its sequential state update is dropped). The
      default propagates them, so nothing is hidden silently.

  Returns:
    A function with the signature of ``fun`` returning what
    ``jax.value_and_grad(fun, argnums, has_aux)`` returns: ``(value, grads)`` or
    ``((value, aux), grads)``.

  Raises:
    ValueError: invalid static options (checked here), or at call time a batch
      whose leading size is not divisible by ``N`` or whose leaves' leading
      sizes differ.
    TypeError: at call time, a batch leaf that is not an array.

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
  _split.check_counts(num_microbatches, microbatch_size)
  argnums_t = _split.normalize_argnums("argnums", argnums)
  batch_t = _split.normalize_argnums("batch_argnums", batch_argnums)
  rng_t = _split.normalize_argnums("rng_argnums", rng_argnums)
  if not batch_t:
    raise ValueError(f"batch_argnums must name at least one argument, got {batch_argnums=}")
  for name, other in (("argnums", argnums_t), ("rng_argnums", rng_t)):
    if set(batch_t) & set(other):
      raise ValueError(f"batch_argnums and {name} overlap: {batch_argnums=}, {name}={other}")
  if set(argnums_t) & set(rng_t):
    raise ValueError(f"argnums and rng_argnums overlap: {argnums=}, {rng_argnums=}")
  if reduction not in _REDUCTIONS:
    raise ValueError(f"{reduction=} must be one of {_REDUCTIONS}")
  if aux_reduction not in _AUX_REDUCTIONS:
    raise ValueError(f"{aux_reduction=} must be one of {_AUX_REDUCTIONS}")
  if axis_name is not None and data_axis is not None:
    raise ValueError(f"give axis_name or data_axis, not both: {axis_name=}, {data_axis=}")
  if mesh is not None and data_axis is None:
    raise ValueError("mesh= is only used with data_axis=")
  state_t = _split.normalize_argnums("state_argnums", state_argnums)
  if set(state_t) & set(argnums_t + batch_t + rng_t):
    raise ValueError(
        f"state_argnums={state_argnums!r} overlaps argnums, batch_argnums or "
        f"rng_argnums ({argnums=}, {batch_argnums=}, {rng_argnums=})")
  policies = ((state_policy,) * len(state_t) if isinstance(state_policy, str)
              else tuple(state_policy))
  if len(policies) != len(state_t) or any(p not in _STATE_POLICIES for p in policies):
    raise ValueError(
        f"{state_policy=} must be one of {_STATE_POLICIES}, or one of them per "
        f"entry of {state_argnums=}")

  config = _loop.Config(
      grad_fn=jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux or bool(state_t)),
      num_microbatches=num_microbatches, microbatch_size=microbatch_size,
      argnums=argnums_t, batch_argnums=batch_t, rng_argnums=rng_t,
      state_argnums=state_t, state_policies=policies,
      state_is_tuple=not isinstance(state_argnums, (int, np.integer)), has_aux=has_aux,
      weight_fn=weight_fn, reduction=reduction, aux_reduction=aux_reduction,
      accumulator_dtype=accumulator_dtype, with_stats=with_stats,
      skip_nonfinite=skip_nonfinite,
  )
  positions = argnums_t + batch_t + rng_t + state_t

  def accumulate(*args, **kwargs):
    if data_axis is not None:
      return _data_parallel(config, args, kwargs, data_axis, mesh)
    return _loop.run(config, args, kwargs, _collectives.axes_of(axis_name))

  # Called outside jit, the scan would be traced and compiled on every call;
  # one jit of our own, made once, is compiled once per shape. (A single
  # micro-batch calls ``fun`` as it is: bit-identical to jax.value_and_grad.)
  compiled = jax.jit(accumulate)

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    if positions and max(positions) >= len(args):
      raise ValueError(
          f"argnums={argnums!r}, batch_argnums={batch_argnums!r}, "
          f"rng_argnums={rng_argnums!r} and state_argnums={state_argnums!r} must "
          f"name positional arguments, but the function was called with {len(args)}"
      )
    if axis_name is None and _all_concrete_arrays((args, kwargs)) and (
        data_axis is not None or _loop.num_microbatches_of(config, args) > 1):
      return compiled(*args, **kwargs)
    return accumulate(*args, **kwargs)

  return wrapped


def _all_concrete_arrays(tree: PyTree) -> bool:
  """Whether every leaf is an array with a value (no tracer, no Python object)."""
  return all(isinstance(x, (jax.Array, np.ndarray, np.generic))
             and not isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def grad(fun: Callable[..., Any], **options: Any) -> Callable[..., Any]:
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
  has_aux = options.get("has_aux", False) or bool(
      _split.normalize_argnums("state_argnums", options.get("state_argnums", ())))
  return drop_value(value_and_grad(fun, **options), fun, has_aux=has_aux,
                    with_stats=options.get("with_stats", False))


def drop_value(vg: Callable[..., Any], fun: Callable[..., Any], *, has_aux: bool,
               with_stats: bool) -> Callable[..., Any]:
  """Turns a ``value_and_grad``-style function into a ``grad``-style one."""

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    result = vg(*args, **kwargs)
    (out, grads), stats = result if with_stats else (result, None)
    grads = (grads, out[1]) if has_aux else grads
    return (grads, stats) if with_stats else grads

  return wrapped


def _data_parallel(config: _loop.Config, args: tuple, kwargs: dict,
                   data_axis: Hashable | Sequence[Hashable],
                   mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None):
  """Runs the loop in a ``shard_map`` over ``data_axis``: one reduction after it."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  axes = _collectives.axes_of(data_axis)
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(
        f"{data_axis=} names axes {missing} that the mesh does not have "
        f"(mesh axes: {mesh.axis_names}); pass mesh= or set one with jax.set_mesh")
  devices = int(np.prod([mesh.shape[a] for a in axes]))
  size = _split.batch_size(tuple(args[i] for i in config.batch_argnums))
  n = _split.resolve_num_microbatches(size, config.num_microbatches,
                                      config.microbatch_size)
  if size % (n * devices):
    raise ValueError(
        f"batch leading size {size} cannot be split into num_microbatches={n} "
        f"on each of the {devices} devices of {data_axis=}: it must be "
        f"divisible by {n * devices}")
  batch_spec = PartitionSpec(axes if len(axes) > 1 else axes[0])
  specs = tuple(batch_spec if i in config.batch_argnums else PartitionSpec()
                for i in range(len(args)))
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if any(types[a] == jax.sharding.AxisType.Explicit for a in axes):
    # Explicit-sharding meshes do not reshard shard_map inputs implicitly.
    to = ((lambda spec: NamedSharding(mesh, spec))
          if isinstance(mesh, jax.sharding.Mesh) else (lambda spec: spec))
    args = tuple(jax.sharding.reshard(a, to(spec)) for a, spec in zip(args, specs))

  def local(*local_args):
    salt = lax.axis_index(axes if len(axes) > 1 else axes[0])
    return _loop.run(config, local_args, kwargs, axes, rng_salt=salt,
                     num_microbatches=n)

  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(),
                       axis_names=frozenset(axes))(*args)
