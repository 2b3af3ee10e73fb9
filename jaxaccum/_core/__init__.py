"""The in-step core: one call of ``value_and_grad`` / ``grad``, read top-down.

- ``options``: every option defined once (name, default, check, description),
  the rules between options, and the validated
  :class:`~jaxaccum._core.options.Options` of one function; ``checks``: the
  check of each kind of value, each message written once.
- ``accumulate``: the public ``value_and_grad`` and ``grad``, the jit around
  a call, the result's nesting.
- ``microbatch``: a call's plan (batch arguments, ``N``), the strided split,
  the micro-step.
- ``loop``: the call's multi-device strategy, the micro-step traced once,
  one ``lax.scan``, one reduction.
- ``reducers``: what a micro-batch contributes and how the sums finish.
- ``dtypes``, ``stats``: accumulator dtypes and weights; noise statistics.

The core never imports flax. The loop talks to devices through the strategy
protocol of :mod:`jaxaccum._devices.parallel`; the options hold the
data-parallel plan as a :class:`jaxaccum.DataAxis`.
"""
