"""Internals of the Flax adapters ``jaxaccum.nnx`` and ``jaxaccum.linen``.

- ``nnx_args``: NNX objects among a loss's arguments, split into arrays and
  merged back.
- ``loss_scale``: fp16 ``DynamicScale`` over micro-batches, one decision a
  cycle (exported by ``jaxaccum.linen``).
"""
