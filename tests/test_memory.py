"""Compiled memory of one training step: accumulation holds one micro-batch.

Deterministic figures from ``memory_analysis()`` of the compiled step of the
benchmark's tiny GPT-2-shaped model (nothing is run, only compiled), so the
test needs no accelerator and no timing.
"""

import jax
import pytest

from benchmarks import gpt, variants

TINY = gpt.CONFIGS["tiny"]


def _temp(name, n):
  # optax's Adam mixes Python floats and int32 counts, which strict dtype
  # promotion (set by conftest.py) rejects; the figures do not depend on it.
  with jax.numpy_dtype_promotion("standard"):
    return variants.step_memory(name, TINY, n).temp_size_in_bytes


@pytest.fixture(scope="module")
def full_temp():
  return _temp("full", 1)


def test_tiny_config_is_activation_dominated(full_temp):
  # Otherwise no micro-batching could cut the temporaries much.
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(gpt.init_params(TINY)))
  assert full_temp > 20 * param_bytes, (full_temp, param_bytes)


def test_eight_microbatches_cut_step_temp_memory(full_temp):
  temp8 = _temp("jaxaccum", 8)
  assert temp8 <= 0.3 * full_temp, (
      f"N=8 step temp {temp8} B is {temp8 / full_temp:.2f}x the full-batch "
      f"{full_temp} B, more than 0.3x")
