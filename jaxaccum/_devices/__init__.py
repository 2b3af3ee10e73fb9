"""Devices and sharding: where the loop runs and where it reduces.

- ``parallel``: the strategy protocol the loop talks to; one device, and
  ``axis_name`` inside ``pmap`` / ``shard_map``.
- ``data_axis``: ``data_axis`` under plain ``jit``: the mesh, its devices,
  and the choice between the two strategies of ``data_strategies``.
- ``data_strategies``: Explicit axes (reduced / unreduced types) and a
  ``shard_map`` manual over the data axes.
- ``specs``: ``PartitionSpec`` and device-varying helpers, shared by all.
- ``deferred``: :class:`jaxaccum.DeferredGrads`, gradients reduced at the
  cycle's end by ``multi_steps``.
"""
