"""Across steps: ``multi_steps``, an optax transformation run once a cycle.

- ``multi_steps``: the transformation (init, update, the cycle's end).
- ``config``: its options as typed fields, validated by the one option table.
- ``checks``: what ``update`` checks when it traces (schedule, skip,
  gradients' structure and form, weight).
- ``state``: :class:`jaxaccum.MultiStepsState`, what ``multi_steps`` returns,
  ``has_updated``.
- ``cycle``: with ``data_axis``, the accumulator of per-device partial sums
  and its one reduction a cycle.
- ``restore``: a restored state of another device count (or with / without
  ``data_axis``) converted to this transformation's form.
"""
