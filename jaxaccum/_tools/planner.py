"""Choosing the number of micro-batches from compiled memory estimates.

Tools such as Composer or Hugging Face Accelerate find a batch size that fits
by running the step, catching the out-of-memory error and halving. Here each
candidate step is only lowered and compiled, and XLA's own buffer assignment
(``compiled.memory_analysis()``) gives its peak device memory; nothing runs,
so nothing can run out of memory, and the inputs may be
:class:`jax.ShapeDtypeStruct` placeholders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxaccum._core import accumulate
from jaxaccum._core import microbatch
from jaxaccum._core import checks
from jaxaccum._core import options as _options
from jaxaccum._devices import data_axis as _data_axis


class MicrobatchPlan(NamedTuple):
  """The result of :func:`jaxaccum.plan_microbatches` / :func:`jaxaccum.plan_step`.

  Attributes:
    num_microbatches: the smallest candidate ``N`` whose estimated peak fits
      the budget.
    microbatch_size: rows per micro-batch, ``B / N`` (over all devices, as
      ``microbatch_size=`` of :func:`jaxaccum.value_and_grad` counts them).
    estimates: estimated peak bytes per device, ``{N: bytes}``, for each
      candidate that was compiled (sorted by ``N``).
    memory_budget: the budget in bytes the estimates were compared with.

  Example:

    >>> import jaxaccum
    >>> plan = jaxaccum.MicrobatchPlan(4, 8, {2: 900, 4: 500}, 600)
    >>> plan.num_microbatches, plan.estimates[plan.num_microbatches] <= plan.memory_budget
    (4, True)
  """

  num_microbatches: int
  microbatch_size: int
  estimates: dict[int, int]
  memory_budget: int


def plan_microbatches(
    fun: Callable[..., Any],
    *args: Any,
    memory_budget: int | float | None = None,
    candidates: Sequence[int] | None = None,
    **options: Any,
) -> MicrobatchPlan:
  """The fewest micro-batches whose accumulated gradient fits in memory.

  Compiles ``jax.jit(jaxaccum.value_and_grad(fun, num_microbatches=N,
  **options))`` for candidate counts ``N`` and estimates each one's peak
  device memory from ``compiled.memory_analysis()`` as::

    argument + output + temp - alias   (bytes)

  (inputs, results and XLA's scratch buffers; aliased bytes are input buffers
  reused as outputs, counted once). Nothing is executed. The candidates are
  searched by bisection, so only about ``log2(#candidates)`` of them are
  compiled. The plan always fits the budget; it is the smallest fitting ``N``
  when the estimate does not grow with ``N``, as holds wherever activations
  dominate (more micro-batches, fewer live at once). Where they do not, the
  estimates are nearly flat, e.g. ``N = 2`` may need a few KiB more than
  ``N = 1`` for its accumulator, and a larger ``N`` than needed may be chosen.

  The estimate covers this one computation: buffers the program does not take
  as arguments (an optimizer state alive between steps, say) are not in it.
  To count them, plan the whole training step with :func:`jaxaccum.plan_step`.

  Args:
    fun: the loss, as for :func:`jaxaccum.value_and_grad`.
    *args: positional arguments of ``fun``: arrays, or
      :class:`jax.ShapeDtypeStruct` (with ``sharding=`` for ``data_axis``) to
      plan without allocating. Keyword arguments of ``fun`` are not taken;
      bind them with :func:`functools.partial`.
    memory_budget: bytes available per device. Defaults to
      ``jax.devices()[0].memory_stats()["bytes_limit"]`` where the backend
      reports it (GPU, TPU); elsewhere (CPU) it must be given.
    candidates: the counts ``N`` to choose from; default: every divisor of the
      batch size ``B`` (of ``B / D`` with ``data_axis`` over ``D`` devices).
    **options: the options of :func:`jaxaccum.value_and_grad` except
      ``num_microbatches`` and ``microbatch_size``.

  Returns:
    A :class:`jaxaccum.MicrobatchPlan`.

  Raises:
    ValueError: no budget given and none reported, a budget that is not a
      positive number, invalid candidates, ``num_microbatches`` or
      ``microbatch_size`` among the options, or even the largest candidate
      over budget (the message names its estimate and the budget).

  Example:

    >>> import jax, jax.numpy as jnp, jaxaccum
    >>> def loss(w, batch):
    ...   return jnp.mean(jnp.tanh(batch @ w) ** 2)
    >>> w, batch = jnp.ones((16, 1024)), jnp.ones((256, 16))  # 1 MiB of activations
    >>> plan = jaxaccum.plan_microbatches(loss, w, batch, memory_budget=500_000)
    >>> plan.num_microbatches, plan.microbatch_size
    (8, 32)
    >>> sorted(plan.estimates)  # compiled: 3 of the 9 divisors of 256
    [4, 8, 16]
    >>> plan.estimates[4] > 500_000 >= plan.estimates[8]
    True
    >>> grads = jaxaccum.grad(loss, num_microbatches=plan.num_microbatches)(w, batch)
  """
  for name in ("num_microbatches", "microbatch_size"):
    if name in options:
      raise ValueError(
          f"plan_microbatches chooses {name}; do not pass it (got {name}={options[name]!r})")
  # Validates the options before any compilation.
  opts = _options.Options.create(num_microbatches=1, **options)
  if opts.batch_argnames:
    raise ValueError(
        f"plan_microbatches takes positional arguments only; it got "
        f"batch_argnames={opts.batch_argnames}: bind keyword arguments with "
        "functools.partial, or plan the step with plan_step")
  if max(opts.batch_argnums) >= len(args):
    raise ValueError(
        f"batch_argnums={options.get('batch_argnums', 1)!r} names a positional argument "
        f"but {len(args)} were given")
  size = _batch_size(tuple(args[i] for i in opts.batch_argnums))
  if size == 0:
    raise ValueError(
        f"the batch (batch_argnums={opts.batch_argnums}) has leading size 0: there "
        "are no rows to split, so no number of micro-batches to plan")
  devices = _data_axis.data_devices(opts.data)
  if size % devices:
    raise ValueError(
        f"batch size {size} is not divisible by the {devices} devices of "
        f"data_axis={options['data_axis']!r}")
  return _plan(lambda n: jax.jit(accumulate.value_and_grad(fun, num_microbatches=n,
                                                             **options)),
               args, size, size // devices, memory_budget, candidates)


def plan_step(
    make_step: Callable[[int], Callable[..., Any]],
    *args: Any,
    batch_size: int,
    memory_budget: int | float | None = None,
    candidates: Sequence[int] | None = None,
) -> MicrobatchPlan:
  """The fewest micro-batches for which a whole training step fits in memory.

  Like :func:`jaxaccum.plan_microbatches`, but for a step you build:
  ``make_step(N)`` returns the step function using ``N`` micro-batches (a
  :func:`jax.jit`-wrapped one keeps its ``donate_argnums``, whose buffers the
  estimate then counts once; a plain function is wrapped in ``jax.jit``). It
  is compiled with ``args``, so the parameters, the optimizer state and its
  update are all in the estimate ``argument + output + temp - alias``.

  Args:
    make_step: ``N -> step``; called only for the candidates compiled.
    *args: positional arguments of the step (arrays or
      :class:`jax.ShapeDtypeStruct`).
    batch_size: rows in the batch the step receives, ``B``.
    memory_budget: bytes per device; default as in
      :func:`jaxaccum.plan_microbatches`.
    candidates: the counts ``N`` to choose from; default: the divisors of
      ``batch_size`` (pass those of ``B / D`` for a step with ``data_axis``
      over ``D`` devices).

  Returns:
    A :class:`jaxaccum.MicrobatchPlan`.

  Raises:
    ValueError: as for :func:`jaxaccum.plan_microbatches`, or a
      ``batch_size`` that is not a positive int.

  Example:

    >>> import jax, jax.numpy as jnp, jaxaccum, optax
    >>> def loss(w, batch):
    ...   return jnp.mean(jnp.tanh(batch @ w) ** 2)
    >>> tx = optax.sgd(0.1)
    >>> def make_step(n):
    ...   @jax.jit
    ...   def step(w, opt_state, batch):
    ...     grads = jaxaccum.grad(loss, num_microbatches=n)(w, batch)
    ...     updates, opt_state = tx.update(grads, opt_state)
    ...     return optax.apply_updates(w, updates), opt_state
    ...   return step
    >>> w, batch = jnp.ones((64, 256)), jnp.ones((64, 64))
    >>> plan = jaxaccum.plan_step(make_step, w, tx.init(w), batch, batch_size=64,
    ...                           memory_budget=2**40)
    >>> plan.num_microbatches
    1
  """
  try:
    positive = checks.index("batch_size", batch_size) >= 1
  except TypeError:
    raise TypeError(f"batch_size must be a positive int, got {batch_size=!r}") from None
  if not positive:
    raise ValueError(f"batch_size must be a positive int, got {batch_size=!r}")

  def compile_target(n):
    step = make_step(n)
    return step if hasattr(step, "lower") else jax.jit(step)

  return _plan(compile_target, args, int(batch_size), int(batch_size), memory_budget,
               candidates)


def _plan(make: Callable[[int], Any], args: tuple, size: int, divisible: int,
          memory_budget, candidates) -> MicrobatchPlan:
  """Bisects the sorted candidates for the smallest ``N`` within the budget."""
  budget = _budget(memory_budget)
  counts = _candidates(candidates, divisible)
  estimates = {}

  def fits(n: int) -> bool:
    estimates[n] = _estimate(make(n).lower(*args).compile())
    return estimates[n] <= budget

  # Invariant: every count below counts[lo] is over budget, and counts[hi]
  # (when hi < len) fits.
  lo, hi = 0, len(counts)
  while lo < hi:
    mid = (lo + hi) // 2
    if fits(counts[mid]):
      hi = mid
    else:
      lo = mid + 1
  estimates = dict(sorted(estimates.items()))
  if lo == len(counts):
    best = min(estimates, key=estimates.get)
    raise ValueError(
        f"no candidate fits memory_budget={budget} bytes: the smallest estimate is "
        f"{estimates[best]} bytes, at num_microbatches={best} (estimates: {estimates})")
  n = counts[lo]
  return MicrobatchPlan(num_microbatches=n, microbatch_size=size // n,
                        estimates=estimates, memory_budget=budget)


def _estimate(compiled) -> int:
  """Peak bytes of a compiled program: argument + output + temp - alias."""
  m = compiled.memory_analysis()
  if m is None:
    raise ValueError(f"the {jax.default_backend()} backend reports no memory analysis "
                     "for compiled programs, so there is nothing to plan with")
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def _budget(memory_budget) -> int:
  if memory_budget is None:
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit is None:
      raise ValueError(
          f"device {device} reports no memory limit (memory_stats() has no "
          "'bytes_limit'); pass memory_budget= in bytes")
    return int(limit)
  if isinstance(memory_budget, bool) or not isinstance(
      memory_budget, (int, float, np.integer, np.floating)):
    raise TypeError(f"memory_budget must be a positive number of bytes, got "
                    f"{memory_budget=!r}")
  if not 0 < memory_budget < float("inf"):
    raise ValueError(f"memory_budget must be a positive number of bytes, finite, got "
                     f"{memory_budget=!r}")
  return int(memory_budget)


def _candidates(candidates, divisible: int) -> list[int]:
  """Sorted unique counts, each a positive divisor of ``divisible``."""
  if candidates is None:
    return [n for n in range(1, divisible + 1) if divisible % n == 0]
  counts = list(candidates)
  bad = [n for n in counts if not isinstance(n, (int, np.integer)) or isinstance(n, bool)
         or n < 1 or divisible % n]
  if not counts or bad:
    raise ValueError(f"candidates must be non-empty positive divisors of {divisible} "
                     f"(the rows each device splits), got {candidates=!r}; bad: {bad}")
  return sorted({int(n) for n in counts})


def _batch_size(batch: tuple) -> int:
  """The batch's leading size; leaves may be :class:`jax.ShapeDtypeStruct`."""
  # A zero-stride view stands in for each leaf, so the checks (and messages)
  # of value_and_grad apply without allocating.
  stand_ins = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), np.int8), x.shape)
                           if isinstance(x, jax.ShapeDtypeStruct) else x, batch)
  return microbatch.batch_size(microbatch.Batch(stand_ins, {}), (0,) * len(batch))
