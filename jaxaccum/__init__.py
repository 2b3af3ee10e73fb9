"""jaxaccum: exact gradient accumulation for JAX, optax and Flax.

Modules, one concept each, in the order one call of
:func:`value_and_grad` passes through them:

- ``_accumulate``: the public ``value_and_grad`` and ``grad``; a call's plan
  and strategy, the jit around it, the result's nesting.
- ``_options``: the options, validated once.
- ``_microbatch``: a call's plan (batch arguments, ``N``), the strided split,
  and the micro-step: one micro-batch's call of ``fun``, weighed.
- ``_loop``: the micro-step traced once, one ``lax.scan``, one reduction.
- ``_reducers``: one reducer per accumulated quantity (value, gradients,
  weight, aux, states, statistics): what a micro-batch contributes, and how
  the reduced sum becomes the result.
- ``_parallel``: the strategy protocol, one device and ``axis_name``;
  ``_sharded``: ``data_axis`` under plain ``jit`` (replicated, FSDP, tensor
  parallel and HSDP parameters; ``defer_reduction``).
- ``_dtypes``: accumulator dtypes and weight rules, shared with
  ``_multi_steps`` (accumulation across optimizer steps, with its input
  checks; its state in ``_multi_steps_state``, the data-axis cycle under
  plain ``jit`` in ``_multi_steps_sharded``) and ``_deferred`` (gradients
  reduced at the cycle's end).
- ``_collectives`` (over ``_hlo_parser``), ``_planner``, ``_noise_scale``,
  ``_stats``: collectives in compiled programs, choosing ``N`` from compiled
  memory, noise-scale statistics.

``jaxaccum.nnx`` (Flax NNX adapters, over ``_nnx_args``: NNX objects among
the arguments) and ``jaxaccum.linen`` (Flax Linen adapters) are imported on
first use, so the core never imports flax: flax is
an optional dependency (``pip install 'jaxaccum[flax]'``).
"""

import os as _os

from jax._src import traceback_util as _traceback_util

from jaxaccum._accumulate import grad, value_and_grad
from jaxaccum._deferred import DeferredGrads
from jaxaccum._collectives import CollectiveCounts, CollectivesByKind, count_collectives
from jaxaccum._multi_steps import multi_steps
from jaxaccum._multi_steps_state import MultiStepsState, has_updated
from jaxaccum._noise_scale import NoiseScaleSmoother, NoiseScaleState, noise_scale_ema
from jaxaccum._planner import MicrobatchPlan, plan_microbatches, plan_step
from jaxaccum._stats import AccumulationStats

__version__ = "0.1.0"

__all__ = [
    "AccumulationStats",
    "CollectiveCounts",
    "CollectivesByKind",
    "DeferredGrads",
    "MicrobatchPlan",
    "MultiStepsState",
    "NoiseScaleSmoother",
    "NoiseScaleState",
    "count_collectives",
    "grad",
    "has_updated",
    "linen",
    "multi_steps",
    "nnx",
    "noise_scale_ema",
    "plan_microbatches",
    "plan_step",
    "value_and_grad",
]

# A user's error shows the user's frame first, as it does for jax's own code.
_traceback_util.register_exclusion(_os.path.dirname(__file__))
del _os, _traceback_util


def __getattr__(name: str):
  if name in ("nnx", "linen"):
    import importlib  # pylint: disable=import-outside-toplevel

    return importlib.import_module(f"jaxaccum.{name}")
  raise AttributeError(f"module 'jaxaccum' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | {"nnx", "linen"})
