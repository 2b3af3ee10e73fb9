"""jaxaccum: exact gradient accumulation for JAX, optax and Flax.

``jaxaccum.nnx`` (Flax NNX adapters) and ``jaxaccum.linen`` (Flax Linen
adapters) are imported on first use, so the core never imports flax.
"""

import importlib

from jaxaccum._accumulate import grad, value_and_grad
from jaxaccum._hlo import CollectiveCounts, CollectivesByKind, count_collectives
from jaxaccum._multi_steps import MultiStepsState, has_updated, multi_steps
from jaxaccum._noise_scale import NoiseScaleSmoother, NoiseScaleState, noise_scale_ema
from jaxaccum._planner import MicrobatchPlan, plan_microbatches, plan_step
from jaxaccum._stats import AccumulationStats

__version__ = "0.1.0"

__all__ = [
    "AccumulationStats",
    "CollectiveCounts",
    "CollectivesByKind",
    "MicrobatchPlan",
    "MultiStepsState",
    "NoiseScaleSmoother",
    "NoiseScaleState",
    "count_collectives",
    "grad",
    "has_updated",
    "multi_steps",
    "noise_scale_ema",
    "plan_microbatches",
    "plan_step",
    "value_and_grad",
]


def __getattr__(name: str):
  if name in ("nnx", "linen"):
    return importlib.import_module(f"jaxaccum.{name}")
  raise AttributeError(f"module 'jaxaccum' has no attribute {name!r}")
