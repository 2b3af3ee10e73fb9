"""In-step gradient accumulation: a ``lax.scan`` over micro-batches."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jaxaccum import _collectives, _split

PyTree = Any
_REDUCTIONS = ("mean", "sum")
_AUX_REDUCTIONS = ("mean", "sum", "stack")


class _Sums(NamedTuple):
  """What the loop carries: running sums over micro-batches.

  Attributes:
    grads: sum of (weighted) gradients, in the accumulator dtype.
    value: sum of (weighted) losses, in float32 or wider.
    weight: sum of weights (``()`` without ``weight_fn``).
    aux: sums of the auxiliary outputs (``()`` unless reduced by mean or sum).
  """

  grads: PyTree
  value: jax.Array
  weight: Any
  aux: PyTree


def _wide(dtype) -> jnp.dtype:
  """A float dtype of at least 32 bits to sum values of ``dtype`` in."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.inexact) and dtype.itemsize >= 4:
    return dtype
  return jnp.dtype(jnp.float32)


def _weighted(x: jax.Array, w: jax.Array | None, dtype) -> jax.Array:
  """``w * x`` in ``dtype``, exactly zero where ``w == 0`` (even if x is NaN)."""
  x = x.astype(dtype)
  if w is None:
    return x
  return jnp.where(w > 0, w.astype(dtype) * x, jnp.zeros_like(x))


def _ratio(total: jax.Array, weight: jax.Array) -> jax.Array:
  """``total / weight`` where weight is positive, zero where it is not."""
  safe = jnp.where(weight > 0, weight, jnp.ones_like(weight)).astype(total.dtype)
  return jnp.where(weight > 0, total / safe, jnp.zeros_like(total))


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
    weight_fn: called as ``weight_fn(*micro_batch_args)``, returns the weight of
      one micro-batch (e.g. its number of non-padding tokens). The result is
      then ``sum_i w_i f_i / sum_i w_i``; a micro-batch of weight zero
      contributes nothing, even a NaN loss, and if every weight is zero the
      value and gradients are zero.
    reduction: ``"mean"`` (over micro-batches, weighted by ``weight_fn``) or
      ``"sum"`` (``sum_i w_i f_i``; ``w_i = 1`` without ``weight_fn``).
    aux_reduction: ``"mean"`` (weighted by ``weight_fn`` when given; integer
      leaves come back as float32), ``"sum"`` (unweighted), or ``"stack"`` (a
      new leading axis of size ``N``).
    accumulator_dtype: dtype the gradients are summed in; ``None`` sums each
      in its own dtype. Gradients come back in each parameter's dtype.
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

  config = _Config(
      fun=fun, grad_fn=jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux),
      num_microbatches=num_microbatches, microbatch_size=microbatch_size,
      argnums=argnums_t, batch_argnums=batch_t, rng_argnums=rng_t,
      has_aux=has_aux, weight_fn=weight_fn, reduction=reduction,
      aux_reduction=aux_reduction, accumulator_dtype=accumulator_dtype,
  )
  positions = argnums_t + batch_t + rng_t

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    if positions and max(positions) >= len(args):
      raise ValueError(
          f"argnums={argnums!r}, batch_argnums={batch_argnums!r} and "
          f"rng_argnums={rng_argnums!r} must name positional arguments, but the "
          f"function was called with {len(args)}"
      )
    if data_axis is not None:
      return _data_parallel(config, args, kwargs, data_axis, mesh)
    return _accumulate(config, args, kwargs, _collectives.axes_of(axis_name))

  return wrapped


def grad(fun: Callable[..., Any], **options: Any) -> Callable[..., Any]:
  """Like :func:`jax.grad`, accumulated over micro-batches.

  Takes the options of :func:`jaxaccum.value_and_grad` and returns only the
  gradients (``(grads, aux)`` with ``has_aux=True``).

  Example:

    >>> import jax.numpy as jnp, jaxaccum
    >>> loss = lambda w, x: jnp.mean((x * w) ** 2)
    >>> g = jaxaccum.grad(loss, num_microbatches=2)(jnp.float32(3.0), jnp.arange(4.0))
    >>> float(g)  # d/dw mean(x^2 w^2) = 2 w mean(x^2) = 6 * 3.5
    21.0
  """
  vg = value_and_grad(fun, **options)
  has_aux = options.get("has_aux", False)

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    out, grads = vg(*args, **kwargs)
    return (grads, out[1]) if has_aux else grads

  return wrapped


class _Config(NamedTuple):
  fun: Callable[..., Any]
  grad_fn: Callable[..., Any]
  num_microbatches: int | None
  microbatch_size: int | None
  argnums: tuple[int, ...]
  batch_argnums: tuple[int, ...]
  rng_argnums: tuple[int, ...]
  has_aux: bool
  weight_fn: Callable[..., Any] | None
  reduction: str
  aux_reduction: str
  accumulator_dtype: Any


def _accumulate(config: _Config, args: tuple, kwargs: dict,
                axes: tuple[Hashable, ...], rng_salt: jax.Array | None = None,
                num_microbatches: int | None = None):
  """The loop on one device (or on every device of ``axes``)."""
  batch = tuple(args[i] for i in config.batch_argnums)
  size = _split.batch_size(batch)
  n = num_microbatches or _split.resolve_num_microbatches(
      size, config.num_microbatches, config.microbatch_size)
  args = list(args)
  # Device-varying parameters keep every micro-step's gradient device-local.
  for i in config.argnums:
    args[i] = _collectives.to_varying(args[i], axes)
  keys = {i: args[i] if rng_salt is None else jax.random.fold_in(args[i], rng_salt)
          for i in config.rng_argnums}

  def one(index, micro):
    """The (weighted) contribution of one micro-batch, and its stacked aux."""
    call = list(args)
    for pos, part in zip(config.batch_argnums, micro):
      call[pos] = part
    for pos, key in keys.items():
      call[pos] = jax.random.fold_in(key, index)
    out, grads = config.grad_fn(*call, **kwargs)
    value, aux = out if config.has_aux else (out, ())
    w = None
    if config.weight_fn is not None:
      w = jnp.asarray(config.weight_fn(*micro))
      w = w.astype(_wide(w.dtype))
    acc = config.accumulator_dtype
    sums = _Sums(
        grads=jax.tree.map(
            lambda g: _weighted(g, w, g.dtype if acc is None else acc), grads),
        value=_weighted(value, w, _wide(value.dtype)),
        weight=() if w is None else w,
        aux=_aux_contribution(config.aux_reduction, aux, w),
    )
    stacked = aux if config.aux_reduction == "stack" else ()
    return _collectives.to_varying((sums, stacked), axes), (value, grads)

  if n == 1:
    (sums, stacked), (value, grads) = one(0, batch)
    stacked = jax.tree.map(lambda x: x[None], stacked)
  else:
    strided = _split.stride(batch, n)

    def body(carry, index):
      with jax.named_scope("jaxaccum/microbatch"):
        (sums, stacked), _ = one(index, _split.microbatch(strided, index))
        return jax.tree.map(jnp.add, carry, sums), stacked

    (shapes, _), (value, grads) = jax.eval_shape(
        lambda: one(0, _split.microbatch(strided, 0)))
    init = _collectives.to_varying(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), axes)
    sums, stacked = lax.scan(body, init, jnp.arange(n, dtype=jnp.int32))

  with jax.named_scope("jaxaccum/reduce"):
    return _finalize(config, sums, stacked, n, axes, value.dtype, grads)


def _aux_contribution(aux_reduction: str, aux: PyTree, w: jax.Array | None) -> PyTree:
  """What one micro-batch adds to the aux sums (``()`` for ``"stack"``)."""
  if aux_reduction == "mean":
    return jax.tree.map(lambda a: _weighted(a, w, _wide(a.dtype)),
                        jax.tree.map(jnp.asarray, aux))
  if aux_reduction == "sum":
    return jax.tree.map(
        lambda a: a.astype(jnp.int32) if a.dtype == jnp.bool_ else a,
        jax.tree.map(jnp.asarray, aux))
  return ()


def _finalize(config: _Config, sums: _Sums, stacked: PyTree, n: int,
              axes: tuple[Hashable, ...], value_dtype, grads_like: PyTree):
  """Reduces the sums across devices (one psum) and forms the results."""
  sums, stacked = _collectives.psum((sums, stacked), axes)
  weighted = config.weight_fn is not None
  devices = _collectives.axis_size(axes)
  if weighted:
    total = sums.weight
  else:
    total = jnp.asarray(n * devices, _wide(sums.value.dtype))

  def mean(x):
    return _ratio(x, total.astype(x.dtype)) if weighted else x / total.astype(x.dtype)

  finish = mean if config.reduction == "mean" else (lambda x: x)
  grads = jax.tree.map(lambda s, g: finish(s).astype(g.dtype), sums.grads, grads_like)
  value = finish(sums.value).astype(value_dtype)
  if not config.has_aux:
    return value, grads
  if config.aux_reduction == "mean":
    aux = jax.tree.map(mean, sums.aux)
  elif config.aux_reduction == "sum":
    aux = sums.aux
  elif devices == 1:
    aux = stacked
  else:
    aux = jax.tree.map(
        lambda a: a.astype(_wide(a.dtype)) / jnp.asarray(devices, _wide(a.dtype)),
        stacked)
  return (value, aux), grads


def _data_parallel(config: _Config, args: tuple, kwargs: dict,
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
    return _accumulate(config, local_args, kwargs, axes, rng_salt=salt,
                       num_microbatches=n)

  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(),
                       axis_names=frozenset(axes))(*args)
