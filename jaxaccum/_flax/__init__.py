"""Internals of the Flax adapters ``jaxaccum.nnx`` and ``jaxaccum.linen``.

- ``nnx_args``: NNX objects among a loss's arguments, split into arrays and
  merged back.
"""
