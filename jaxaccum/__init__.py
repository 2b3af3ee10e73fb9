"""jaxaccum: exact gradient accumulation for JAX, optax and Flax.

The package is laid out by concern; each folder's ``__init__`` gives its
reading order:

- ``_core``: in-step accumulation, ``value_and_grad`` and ``grad`` (options,
  plan and split, the loop, the reducers).
- ``_devices``: where the loop runs and reduces (one device, ``axis_name``,
  ``data_axis`` strategies, ``PartitionSpec`` helpers, ``DeferredGrads``).
- ``_steps``: across steps, ``multi_steps`` (its state, the data-axis cycle).
- ``_tools``: the planner, collectives in compiled programs, noise scale.
- ``nnx`` and ``linen`` (internals in ``_flax``): Flax adapters, imported on
  first use, so the core never imports flax, an optional dependency
  (``pip install 'jaxaccum[flax]'``).
- ``_compat``: every detail that differs between supported jax versions.
"""

import os as _os

from jax._src import traceback_util as _traceback_util

from jaxaccum._core.accumulate import grad, value_and_grad
from jaxaccum._devices.data_axis import DataAxis
from jaxaccum._devices.deferred import DeferredGrads
from jaxaccum._tools.collectives import CollectiveCounts, CollectivesByKind, count_collectives
from jaxaccum._steps.multi_steps import multi_steps
from jaxaccum._steps.state import MultiStepsState, has_updated
from jaxaccum._tools.noise_scale import NoiseScaleSmoother, NoiseScaleState, noise_scale_ema
from jaxaccum._tools.planner import MicrobatchPlan, plan_microbatches, plan_step
from jaxaccum._core.stats import AccumulationStats

__version__ = "0.3.0"

__all__ = [
    "AccumulationStats",
    "CollectiveCounts",
    "CollectivesByKind",
    "DataAxis",
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
