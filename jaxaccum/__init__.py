"""jaxaccum: exact gradient accumulation for JAX, optax and Flax.

Modules, one concept each:

- ``_options``: the options of an accumulated function, validated once.
- ``_split``: checking a batch and splitting it into strided micro-batches.
- ``_microstep``: one micro-batch's call of ``fun``, weighed.
- ``_reducers``: one reducer per accumulated quantity (value, gradients,
  weight, aux, states, statistics): what a micro-batch contributes, and how
  the reduced sum becomes the result.
- ``_loop``: zeros, one ``lax.scan``, the cross-device reduction, finalize.
- ``_parallel``: the multi-device strategies the loop talks to
  (``axis_name``, ``data_axis``), and ``_sharded``: sharded parameters
  (FSDP, tensor parallel) under ``data_axis``.
- ``_result``: how the result is nested for the user.
- ``_dtypes``: accumulator dtypes and weight rules, shared with
  ``_multi_steps`` (accumulation across optimizer steps, with its input
  checks; its state in ``_multi_steps_state``, the data-axis cycle under
  plain ``jit`` in ``_multi_steps_sharded``).
- ``_hlo`` (over the parser ``_hlo_text``), ``_planner``, ``_noise_scale``,
  ``_stats``: collectives in compiled programs, choosing ``N`` from compiled
  memory, noise-scale statistics.

Data flow of one call: options -> micro-step -> reducers -> one reduction ->
result. ``jaxaccum.nnx`` (Flax NNX adapters) and ``jaxaccum.linen`` (Flax
Linen adapters) are imported on first use, so the core never imports flax.
"""

import os as _os

from jax._src import traceback_util as _traceback_util

from jaxaccum._accumulate import grad, value_and_grad
from jaxaccum._deferred import DeferredGrads
from jaxaccum._hlo import CollectiveCounts, CollectivesByKind, count_collectives
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
