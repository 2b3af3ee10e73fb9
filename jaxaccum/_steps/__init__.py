"""Across steps: ``multi_steps``, an optax transformation run once a cycle.

- ``multi_steps``: the transformation (init, update, the cycle's end).
- ``state``: :class:`jaxaccum.MultiStepsState`, what ``multi_steps`` returns,
  ``has_updated``.
- ``cycle``: with ``data_axis``, the accumulator of per-device partial sums
  and its one reduction a cycle.
"""
