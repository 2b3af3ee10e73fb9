"""The in-step core: one call of ``value_and_grad`` / ``grad``, read top-down.

- ``options``: every option defined once (name, default, check, description);
  the validated :class:`~jaxaccum._core.options.Options` of one function.
- ``accumulate``: the public ``value_and_grad`` and ``grad``, the jit around
  a call, the result's nesting.
- ``microbatch``: a call's plan (batch arguments, ``N``), the strided split,
  the micro-step.
- ``loop``: the micro-step traced once, one ``lax.scan``, one reduction.
- ``reducers``: what a micro-batch contributes and how the sums finish.
- ``dtypes``, ``stats``: accumulator dtypes and weights; noise statistics.

The core never imports flax; devices are reached through the strategy
protocol of :mod:`jaxaccum._devices.parallel`.
"""
