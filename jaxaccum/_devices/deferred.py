"""Gradients whose cross-device reduction is deferred to the cycle's end.

``jaxaccum.value_and_grad(..., data_axis=A, defer_reduction=True)`` returns
them and ``jaxaccum.multi_steps(..., data_axis=A)`` takes them: it adds them
to its accumulator on every call and reduces the accumulator across the
devices of ``A`` once, on the call that completes the cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class DeferredGrads:
  """Per-device partial sums of gradients, not yet reduced over ``axes``.

  A pytree, so it passes through ``jax.jit``. Its structure is not the
  parameters', so ``optax.apply_updates`` (and ``optax.MultiSteps``, or a
  ``multi_steps`` without ``data_axis``) given one fails rather than apply
  partial sums. An optax transformation that maps over leaves does not notice
  it: one that takes a global norm (``clip_by_global_norm``) placed before
  ``multi_steps`` in an ``optax.chain`` would take the norm of the partial
  sums. Put such transformations in ``multi_steps``' inner optimizer, which
  sees the reduced gradient.

  Attributes:
    partials: a pytree of the parameters' structure; each leaf has shape
      ``(D, *param.shape)``, where ``D`` is the number of devices along
      ``axes``, is sharded over ``axes`` along its leading dimension (its other
      dimensions keep the parameter's non-data sharding), and holds device
      ``d``'s partial sum at index ``d``, in the accumulator dtype. The sum
      over the leading axis is the reduced gradient the same call would
      return without ``defer_reduction``.
    axes: the mesh axes the reduction is deferred over (static).

  Example:

    >>> import jax, jax.numpy as jnp, jaxaccum
    >>> g = jaxaccum.DeferredGrads({"w": jnp.ones((2, 3))}, ("data",))
    >>> jax.tree.map(lambda p: p.sum(0), g.partials)["w"].tolist()
    [2.0, 2.0, 2.0]
  """

  partials: Any
  axes: tuple[Hashable, ...]


jax.tree_util.register_dataclass(DeferredGrads, data_fields=["partials"],
                                 meta_fields=["axes"])
