"""jaxaccum: exact gradient accumulation for JAX, optax and Flax."""

from jaxaccum._accumulate import grad, value_and_grad
from jaxaccum._multi_steps import MultiStepsState, has_updated, multi_steps

__version__ = "0.1.0"

__all__ = [
    "MultiStepsState",
    "grad",
    "has_updated",
    "multi_steps",
    "value_and_grad",
]
