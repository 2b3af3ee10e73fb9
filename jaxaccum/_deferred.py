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

  A pytree, so it passes through ``jax.jit``; its type keeps it from being
  mistaken for ordinary gradients: ``optax.apply_updates`` or an optax
  transformation other than :func:`jaxaccum.multi_steps` given one fails on
  its structure instead of computing from partial sums.

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
