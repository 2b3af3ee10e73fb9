"""Compiled memory of one gradient step: accumulation holds one micro-batch.

Deterministic figures from ``memory_analysis()`` of the compiled step of the
tests' tiny transformer (nothing is run, only compiled), so the test needs no
accelerator and no timing.
"""

import jax
import pytest

import jaxaccum
from _models import token_batch, transformer_init, transformer_loss

ROWS = 256
PARAMS = transformer_init(jax.random.key(0))
BATCH = jax.eval_shape(lambda: token_batch(jax.random.key(1), ROWS))


def _temp(value_and_grad):
  compiled = jax.jit(value_and_grad).lower(PARAMS, BATCH).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def full_temp():
  return _temp(jax.value_and_grad(transformer_loss))


def test_batch_is_activation_dominated(full_temp):
  # Otherwise no micro-batching could cut the temporaries much.
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(PARAMS))
  assert full_temp > 20 * param_bytes, (full_temp, param_bytes)


def test_eight_microbatches_cut_step_temp_memory(full_temp):
  temp8 = _temp(jaxaccum.value_and_grad(transformer_loss, num_microbatches=8))
  assert temp8 <= 0.3 * full_temp, (
      f"N=8 step temp {temp8} B is {temp8 / full_temp:.2f}x the full-batch "
      f"{full_temp} B, more than 0.3x")
