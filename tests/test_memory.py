"""Compiled memory of one gradient step: accumulation holds one micro-batch.

Deterministic figures from ``memory_analysis()`` of the compiled step of the
tests' tiny transformer (nothing is run, only compiled), so the test needs no
accelerator and no timing.
"""

import collections

import jax
import jax.numpy as jnp
import pytest

import jaxaccum
from jaxaccum._tools import hlo_parser
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


def _while_body_and_temp(value_and_grad):
  compiled = jax.jit(value_and_grad).lower(PARAMS, BATCH).compile()
  module = hlo_parser.parse(compiled.as_text())
  whiles = [i for c in hlo_parser.reachable(module) for i in module.computations[c]
            if i.opcode == "while"]
  assert len(whiles) == 1
  body = module.computations[dict(whiles[0].calls)["body"]]
  return collections.Counter(i.opcode for i in body), compiled.memory_analysis().temp_size_in_bytes


def test_loop_is_as_lean_as_a_hand_written_scan():
  """The compiled while body matches a plain scan over jax.value_and_grad op
  for op (the scanned micro-batch index adds at most one tuple element), and
  so does the step's temporary memory."""
  n = 8

  def scan(params, batch):
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:])
                         .swapaxes(0, 1), batch)

    def body(acc, mb):
      return jax.tree.map(jnp.add, acc, jax.value_and_grad(transformer_loss)(params, mb)), None

    zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros([]), params))
    (value, grads), _ = jax.lax.scan(body, zeros, micro)
    return value / n, jax.tree.map(lambda g: g / n, grads)

  ours, ours_temp = _while_body_and_temp(
      jaxaccum.value_and_grad(transformer_loss, num_microbatches=n))
  plain, plain_temp = _while_body_and_temp(scan)
  extra = ours - plain
  assert sum(extra.values()) <= 1 and set(extra) <= {"get-tuple-element"}, extra
  assert not plain - ours, plain - ours
  assert ours_temp <= plain_temp * 1.001 + 1024, (ours_temp, plain_temp)
