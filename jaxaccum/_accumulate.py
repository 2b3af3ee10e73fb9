"""In-step gradient accumulation: the public ``value_and_grad`` and ``grad``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import traceback_util

from jaxaccum import _loop, _parallel
from jaxaccum._options import Options
from jaxaccum._result import Layout

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
    reduction: str = "mean",
    aux_reduction: Any = "mean",
    accumulator_dtype: jax.typing.DTypeLike | None = jnp.float32,
    rng_argnums: int | Sequence[int] = (),
    axis_name: AxisName = None,
    data_axis: AxisName = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    state_argnums: int | Sequence[int] = (),
    state_policy: str | Sequence[str] = "sequential",
    with_stats: bool = False,
    skip_nonfinite: bool = False,
    fsdp_gather: str = "once",
    param_specs: Any = None,
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
      sharing one leading axis of size ``B``. Default ``1``, or none when
      ``batch_argnames`` is given.
    batch_argnames: keyword argument(s) holding batch pytrees, split like
      ``batch_argnums`` (``grad_fn(params, batch=b)``). Every other keyword
      argument is passed whole to every micro-batch.
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    weight_fn: called as ``weight_fn(*micro_batch_args, **micro_batch_kwargs)``
      (the batch arguments only), returns the non-negative scalar weight of
      one micro-batch (e.g. its number of non-padding tokens). The result is
      then ``sum_i w_i f_i / sum_i w_i``; a micro-batch of weight zero
      contributes nothing, even a NaN loss, and if every weight is zero the
      value and gradients are zero. A NaN or negative weight makes the value
      and gradients NaN.
    reduction: ``"mean"`` (over micro-batches, weighted by ``weight_fn``) or
      ``"sum"`` (``sum_i w_i f_i``; ``w_i = 1`` without ``weight_fn``).
    aux_reduction: how each aux leaf is combined: ``"mean"`` (weighted by
      ``weight_fn`` when given; integer leaves come back as float32),
      ``"sum"`` (unweighted), ``"stack"`` (a new leading axis of size ``N``,
      micro-batch ``i`` at index ``i``), or ``"concat"`` for per-example
      outputs such as logits: the rows back in the full batch's order and
      shape, equal to the full-batch aux. A pytree of these names that is a
      prefix of the aux picks per leaf, e.g. ``{"logits": "concat",
      "accuracy": "mean"}``.
    accumulator_dtype: the least precise floating dtype gradients are summed
      in (float32: bf16 gradients are summed in float32, float64 and complex
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
      axis (or these axes): the gradients are reduced across its devices once,
      after the loop, and come back with the parameters' sharding. On
      Explicit axes the loss runs as written under plain ``jit`` (parameters
      cast to ``reduced``, their gradients accumulated ``unreduced``); a loss
      that cannot take reduced parameters (an elementwise op between one and
      the sharded batch, such as a bias add), ``with_stats`` and
      ``skip_nonfinite`` run in a ``jax.shard_map`` over the data axes (with
      the reduction of ``axis_name``). Other mesh axes (tensor parallel) are
      never gathered. See ``docs/sharded.md`` for every layout.
    mesh: the mesh for ``data_axis``; defaults to the ambient mesh
      (``jax.set_mesh``).
    state_argnums: positional argument(s) holding mutable model state, such as
      Flax Linen ``batch_stats``, threaded through the loop. ``fun`` then
      returns ``(loss, new_state)`` (``(loss, (aux, new_state))`` with
      ``has_aux``; a tuple of new states for a tuple ``state_argnums``), and the
      result carries the final state where ``jax.value_and_grad(fun,
      has_aux=True)`` would: ``((value, state), grads)``. Under
      ``axis_name`` / ``data_axis`` the final state is averaged over devices.
    state_policy: per state argument (or one for all): ``"sequential"``
      (default): micro-batch ``i`` sees the state left by micro-batch
      ``i - 1``, the same as ``N`` small forward passes; ``"mean"``: every
      micro-batch starts from the input state and the result is the mean of
      the ``N`` new states (integer leaves: floor of the mean). Neither gives
      the full batch's BatchNorm running averages, since every micro-batch is
      normalized with its own statistics. ``"mean"``: they move as far per
      step as with the full batch; the running mean equals the full batch's
      in the first BatchNorm layer only (ResNet18: deeper layers differ by up
      to 4e-2 relative at ``N=2``, 1e-1 at ``N=8``, growing with depth), and
      the running variance is lower (the mean of the micro-batch variances).
      ``"sequential"``: with momentum ``m`` they move about
      ``(1 - m**N) / (1 - m)`` times as far per step (3.4 at ``N=4``,
      ``m=0.9``); momentum ``m ** (1 / N)`` brings that back to about 1.
      Measured in ``benchmarks/batchnorm_policies.py``; see ``docs/flax.md``.
    with_stats: also return an :class:`jaxaccum.AccumulationStats` (gradient
      noise scale, skipped micro-batches): the function then returns
      ``(result, stats)``. Costs one squared norm per micro-batch.
    skip_nonfinite: leave out of the sums every micro-batch whose loss or
      gradients hold a NaN or an infinity (its weight becomes zero, so the mean
      is over the others; its sequential state update is dropped). If every
      micro-batch of positive weight is left out, value and gradients are NaN,
      so ``optax.apply_if_finite`` or ``should_skip_update_fn`` skip the step.
      The default propagates non-finite values, so nothing is hidden silently.
    fsdp_gather: with ``data_axis``, for parameters sharded over a data axis
      (FSDP, HSDP): ``"once"`` gathers them before the loop and reduces the
      unsharded gradient sum once after it, into the parameters' sharding
      (fewest bytes, nothing gradient-sized in the loop); ``"per_microbatch"``
      gathers them in every micro-batch and reduce-scatters every micro-batch's
      gradient into a sharded accumulator (least memory, ``N`` times the
      bytes). Replica axes (HSDP) are reduced once after the loop either way.
    param_specs: with ``data_axis`` on Auto mesh axes, where a sharding is
      invisible inside ``jit``: the differentiated arguments' partition specs
      (a ``PartitionSpec`` or a pytree prefix of them; a tuple of one per
      argument for a sequence ``argnums``), e.g. ``P("data", None)`` for FSDP.
      Without it they are taken as replicated over the data axes. On
      Explicit axes the specs are read from the arguments' types.

  Called outside :func:`jax.jit`, the returned function compiles itself once
  per shapes and dtypes of the array arguments (and values of the non-array
  ones, which it treats as static): like any jitted function, Python state
  that ``fun`` reads (a global, an attribute, a mutated numpy array) is
  frozen at the first call. With one micro-batch it calls ``fun`` eagerly,
  bit-identical to :func:`jax.value_and_grad`.

  Returns:
    A function with the signature of ``fun`` returning what
    ``jax.value_and_grad(fun, argnums, has_aux)`` returns: ``(value, grads)`` or
    ``((value, aux), grads)``.

  Raises:
    TypeError: an option of the wrong type (checked here), or at call time a
      batch leaf that is not an array.
    ValueError: an option of a wrong value (checked here), or at call time a
      batch whose leading size is not divisible by ``N`` or whose leaves'
      leading sizes differ.

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
  return functools.wraps(fun)(_public(fun, options, _layout(options).value_and_grad))


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
    reduction: str = "mean",
    aux_reduction: Any = "mean",
    accumulator_dtype: jax.typing.DTypeLike | None = jnp.float32,
    rng_argnums: int | Sequence[int] = (),
    axis_name: AxisName = None,
    data_axis: AxisName = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    state_argnums: int | Sequence[int] = (),
    state_policy: str | Sequence[str] = "sequential",
    with_stats: bool = False,
    skip_nonfinite: bool = False,
    fsdp_gather: str = "once",
    param_specs: Any = None,
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
  return functools.wraps(fun)(_public(fun, options, _layout(options).grad))


def _keywords(names: dict[str, Any]) -> dict[str, Any]:
  """The public keyword arguments among a function's locals."""
  return {k: v for k, v in names.items() if k != "fun"}


def _layout(options: Options) -> Layout:
  return Layout(options.has_aux, len(options.state_argnums), options.state_is_tuple,
                options.with_stats)


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
  parallel = _parallel.for_options(options)

  def accumulate(args, kwargs):
    return _loop.accumulate(options, grad_fn, parallel, args, kwargs)

  @functools.partial(jax.jit, static_argnums=0)
  def compiled(static, arrays):
    return accumulate(*_Static.merge(static, arrays))

  def call(*args, **kwargs):
    if options.positions and max(options.positions) >= len(args):
      raise ValueError(
          f"{options.describe_positions()} must name positional arguments, but the "
          f"function was called with {len(args)}")
    if options.axis_name or _traced((args, kwargs)) or (
        not options.data_axis and _loop.num_microbatches(options, args, kwargs) == 1):
      return accumulate(args, kwargs)
    static, arrays = _Static.split((args, kwargs))
    if static is None:
      return accumulate(args, kwargs)
    return compiled(static, arrays)

  return call


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
