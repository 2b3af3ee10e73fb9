"""Gradient statistics that accumulation gets for free: the noise scale.

With ``N`` micro-batch gradients of ``b`` rows each and their mean over
``B_big`` rows, McCandlish et al. (2018, "An Empirical Model of Large-Batch
Training", Appendix A) give unbiased estimates of the true gradient's squared
norm ``|G|^2`` and of the trace of the per-example gradient covariance
``tr(Sigma)``; their ratio is the simple noise scale ``B_simple``, the batch size
beyond which larger batches stop paying off.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class AccumulationStats(NamedTuple):
  """Statistics of one accumulated gradient (``with_stats=True``).

  Attributes:
    microbatch_sq_norm: mean over the micro-batch gradients (on every device,
      skipped ones left out) of their squared L2 norm, ``|G_small|^2``.
    grad_sq_norm: squared L2 norm of the accumulated gradient, ``|G_big|^2``.
    sq_norm_estimate: unbiased estimate of the true gradient's ``|G|^2``.
    trace_estimate: unbiased estimate of ``tr(Sigma)``, the trace of the
      per-example gradient covariance.
    noise_scale: the simple noise scale ``B_simple = tr(Sigma) / |G|^2``.
    microbatch_size: rows behind each micro-batch gradient, ``B_small`` (per
      device under ``axis_name`` / ``data_axis``).
    num_microbatches: micro-batches per device, ``N``.
    effective_batch_size: rows in the whole accumulated batch, over all
      devices.
    num_skipped: micro-batches left out by ``skip_nonfinite``, over all
      devices.

  The estimates are NaN when there is a single micro-batch gradient
  (``B_small == B_big``), and assume every row weighs the same (with a
  ``weight_fn`` they are approximate).

  Example:

    >>> import jax.numpy as jnp, jaxaccum
    >>> loss = lambda w, x: jnp.mean((x - w) ** 2)
    >>> f = jaxaccum.value_and_grad(loss, num_microbatches=4, with_stats=True)
    >>> (value, grads), stats = f(jnp.float32(0.0), jnp.arange(8.0))
    >>> int(stats.num_microbatches), int(stats.microbatch_size)
    (4, 2)
  """

  microbatch_sq_norm: jax.Array
  grad_sq_norm: jax.Array
  sq_norm_estimate: jax.Array
  trace_estimate: jax.Array
  noise_scale: jax.Array
  microbatch_size: jax.Array
  num_microbatches: jax.Array
  effective_batch_size: jax.Array
  num_skipped: jax.Array


def sq_norm(tree) -> jax.Array:
  """Squared L2 norm of a pytree, summed in float32."""
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)),
             start=jnp.zeros([], jnp.float32))


def noise_estimates(small_sq: jax.Array, big_sq: jax.Array, b_small: jax.Array,
                    b_big: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Unbiased ``|G|^2``, ``tr(Sigma)`` and their ratio ``B_simple``.

  Args:
    small_sq: mean squared norm of gradients over ``b_small`` examples.
    big_sq: squared norm of the gradient over ``b_big`` examples.
    b_small: examples behind each small gradient.
    b_big: examples behind the big gradient (``> b_small``).

  Returns:
    ``(sq_norm_estimate, trace_estimate, noise_scale)``; NaN where
    ``b_big == b_small``.
  """
  b_small = b_small.astype(jnp.float32)
  b_big = b_big.astype(jnp.float32)
  differs = b_big > b_small
  gap = jnp.where(differs, b_big - b_small, jnp.ones_like(b_big))
  g2 = (b_big * big_sq - b_small * small_sq) / gap
  trace = (small_sq - big_sq) / jnp.where(differs, 1 / b_small - 1 / b_big, jnp.ones_like(b_big))
  nan = jnp.full_like(g2, jnp.nan)
  g2 = jnp.where(differs, g2, nan)
  trace = jnp.where(differs, trace, nan)
  return g2, trace, trace / g2
