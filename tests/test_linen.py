"""``jaxaccum.linen``: weighted cycles through ``TrainState``, fp16 loss scaling.

References are the unmodified full-batch Flax steps: ``jax.grad`` of the
token-mean loss on the whole batch, and ``DynamicScale.value_and_grad`` with
Flax's skip of a non-finite step (``jnp.where(is_fin, new, old)``).
"""

import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from flax.training.dynamic_scale import DynamicScale

import jaxaccum
from _models import (assert_rel_close, assert_trees_equal, num_tokens, rel_error,
                     standard_promotion, token_batch, transformer_init, transformer_loss)

K = 4


@pytest.mark.slow
def test_linen_is_imported_on_first_use():
  code = ("import sys, jaxaccum; assert 'jaxaccum.linen' not in sys.modules; "
          "jaxaccum.linen.TrainState; assert 'jaxaccum.linen' in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


# --- weighted cycles through TrainState ----------------------------------------


def _record_grads():
  """An inner optimizer whose state is the gradient it was given (trace, decay 0)."""
  return optax.chain(optax.trace(decay=0.0), optax.scale(-0.5))


def _token_batches():
  # 8 rows, lengths from 0 (all padding) to 8: the calls' token counts differ,
  # and call 1 (rows 2, 3) is all padding: its loss is 0/0 = NaN.
  full = token_batch(jax.random.key(7), 8, lengths=[8, 3, 0, 0, 5, 8, 1, 6])
  calls = [jax.tree.map(lambda a: a[2 * j:2 * j + 2], full) for j in range(K)]
  return full, calls


def _tree_rel_error(actual, expected):
  """``|actual - expected|_2 / |expected|_2`` over the whole tree, in float64."""
  diff = [np.asarray(a, np.float64) - np.asarray(e, np.float64)
          for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)]
  norm = lambda leaves: np.sqrt(sum(np.sum(np.square(x)) for x in leaves))
  return norm(diff) / norm([np.asarray(e, np.float64) for e in jax.tree.leaves(expected)])


def _weighted_run(state, calls, weighted):
  @jax.jit
  def step(state, batch):
    grads = jax.grad(transformer_loss)(state.params, batch)
    if weighted:
      return state.apply_gradients(grads=grads, weight=num_tokens(batch))
    return state.apply_gradients(grads=grads)

  for batch in calls:
    state = step(state, batch)
  return state


def test_train_state_weight_gives_the_full_batch_token_mean():
  params = transformer_init(jax.random.key(0))
  full, calls = _token_batches()
  assert np.isnan(float(jax.jit(transformer_loss)(params, calls[1])))
  reference = jax.jit(jax.grad(transformer_loss))(params, full)
  tx = jaxaccum.multi_steps(_record_grads(), K)
  state = jaxaccum.linen.TrainState.create(apply_fn=None, params=params, tx=tx)
  state = _weighted_run(state, calls, weighted=True)
  cycle_grads = state.opt_state.inner_opt_state[0].trace
  assert _tree_rel_error(cycle_grads, reference) <= 1e-6
  # Leaf by leaf too (a zero-gradient leaf, the attention key bias, holds
  # float32 rounding noise only: rel_error floors its norm).
  assert rel_error(cycle_grads, reference) <= 1e-5
  expected = jax.tree.map(lambda p, g: p - 0.5 * g, params, reference)
  assert_rel_close(state.params, expected, 1e-6)
  assert int(state.step) == K and int(state.optimizer_step) == 1


def test_without_weight_the_cycle_is_not_the_token_mean():
  # The premise of the test above: equal weights give another gradient (and
  # here NaN, from the all-padding call).
  params = transformer_init(jax.random.key(0))
  full, calls = _token_batches()
  calls = [calls[0], calls[2], calls[3], calls[0]]
  reference = jax.jit(jax.grad(transformer_loss))(params, jax.tree.map(
      lambda *a: jnp.concatenate(a), *calls))
  tx = jaxaccum.multi_steps(_record_grads(), K)
  state = jaxaccum.linen.TrainState.create(apply_fn=None, params=params, tx=tx)
  state = _weighted_run(state, calls, weighted=False)
  assert _tree_rel_error(state.opt_state.inner_opt_state[0].trace, reference) > 1e-3
  # Flax's own TrainState cannot take the weight at all.
  flax_state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  with pytest.raises(TypeError):
    flax_state.apply_gradients(grads=params, weight=1.0)


def test_train_state_without_weight_is_flax_train_state():
  params = {"w": jnp.arange(3.0)}
  grads = {"w": jnp.array([0.5, -1.0, 2.0])}
  tx = standard_promotion(optax.adam(0.1))
  ours = jaxaccum.linen.TrainState.create(apply_fn=None, params=params, tx=tx)
  theirs = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  ours, theirs = ours.apply_gradients(grads=grads), theirs.apply_gradients(grads=grads)
  assert_trees_equal(ours.params, theirs.params)
  assert_trees_equal(ours.opt_state, theirs.opt_state)
  assert ours.tx is tx
  # Without multi_steps every call is an optimizer step.
  assert int(ours.optimizer_step) == int(ours.step) == 1


def test_optimizer_step_counts_cycles():
  tx = jaxaccum.multi_steps(optax.sgd(0.1), 3)
  state = jaxaccum.linen.TrainState.create(apply_fn=None, params={"w": jnp.zeros(2)}, tx=tx)
  step = jax.jit(lambda s: s.apply_gradients(grads={"w": jnp.ones(2)}, weight=2.0))
  for _ in range(7):
    state = step(state)
  assert int(state.step) == 7
  assert int(state.optimizer_step) == 2 == int(state.opt_state.gradient_step)
  assert state.tx is tx


BAD_WEIGHTS = [float("nan"), -1.0, -2, np.float32(-0.5), np.array(float("nan")), float("inf")]


@pytest.mark.parametrize("weight", BAD_WEIGHTS, ids=repr)
def test_static_nan_or_negative_weight_is_an_error(weight):
  grads = {"w": jnp.ones(2)}
  state = jaxaccum.linen.TrainState.create(
      apply_fn=None, params={"w": jnp.zeros(2)}, tx=jaxaccum.multi_steps(optax.sgd(0.1), 2))
  with pytest.raises(ValueError, match="weight"):
    state.apply_gradients(grads=grads, weight=weight)
  with pytest.raises(ValueError, match="weight"):  # a Python number is static under jit
    jax.jit(lambda s: s.apply_gradients(grads=grads, weight=weight))(state)
  # Raised before the loss scale is touched: a NaN cycle would halve it instead.
  with pytest.raises(ValueError, match="weight"):
    jaxaccum.linen.apply_scaled_gradients(state, grads=grads, dynamic_scale=DynamicScale(),
                                          weight=weight)


def test_traced_nan_weight_makes_the_cycle_nan():
  grads = {"w": jnp.ones(2)}
  state = jaxaccum.linen.TrainState.create(
      apply_fn=None, params={"w": jnp.zeros(2)}, tx=jaxaccum.multi_steps(optax.sgd(0.1), 2))
  step = jax.jit(lambda s, w: s.apply_gradients(grads=grads, weight=w))
  state = step(step(state, jnp.float32(1.0)), jnp.float32(jnp.nan))
  assert np.all(np.isnan(np.asarray(state.params["w"])))
  ds = DynamicScale()
  scaled = jax.jit(lambda s, ds, w: jaxaccum.linen.apply_scaled_gradients(
      s, grads=grads, dynamic_scale=ds, weight=w))
  state = jaxaccum.linen.TrainState.create(
      apply_fn=None, params={"w": jnp.zeros(2)}, tx=jaxaccum.multi_steps(optax.sgd(0.1), 2))
  state, ds, _ = scaled(state, ds, jnp.float32(1.0))
  state, ds, is_fin = scaled(state, ds, jnp.float32(jnp.nan))
  assert not bool(is_fin) and float(ds.scale) == DynamicScale().scale / 2


# --- fp16 dynamic loss scaling ------------------------------------------------------


class Half(nn.Module):
  """A float16 MLP with float32 parameters (Flax's imagenet half-precision setup)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, dtype=jnp.float16)(x))
    return nn.Dense(2, dtype=jnp.float16)(x)


MODEL = Half()
B = 16
# Low enough that only the planted row overflows float16, at every scale reached.
SCALE = 2.0**10


def _half_loss(params, batch):
  x, y = batch
  out = MODEL.apply({"params": params}, x)
  return jnp.mean(jnp.square(out.astype(jnp.float32) - y))


def _half_batches(count, overflow_at=None):
  """Batches; ``overflow_at=(batch, row)``: that row overflows float16."""
  batches = []
  for i in range(count):
    kx, ky = jax.random.split(jax.random.key(20 + i))
    x = jax.random.normal(kx, (B, 4))
    y = jax.random.normal(ky, (B, 2))
    if overflow_at is not None and overflow_at[0] == i:
      x = x.at[overflow_at[1]].set(6e4)
    batches.append((x, y))
  return batches


def _inner():
  return optax.sgd(0.05, momentum=0.9)


def _where(keep, new, old):
  return jax.tree.map(functools.partial(jnp.where, keep), new, old)


@jax.jit
def _reference_step(params, opt_state, ds, batch):
  """Flax's full-batch DynamicScale step."""
  ds, is_fin, loss, grads = ds.value_and_grad(_half_loss)(params, batch)
  updates, new_opt_state = _inner().update(grads, opt_state, params)
  params = _where(is_fin, optax.apply_updates(params, updates), params)
  return params, _where(is_fin, new_opt_state, opt_state), ds, is_fin, grads


def _reference_run(params, batches, ds):
  opt_state, out = _inner().init(params), []
  for batch in batches:
    params, opt_state, ds, is_fin, grads = _reference_step(params, opt_state, ds, batch)
    out.append((params, ds, bool(is_fin), grads))
  return out


def _params():
  return MODEL.init(jax.random.key(1), jnp.zeros((1, 4)))["params"]


def _same_scale(ds, ref_ds):
  assert float(ds.scale) == float(ref_ds.scale)
  assert int(ds.fin_steps) == int(ref_ds.fin_steps)


def test_dynamic_scale_in_one_step_equals_the_full_batch_step():
  params = _params()
  batches = _half_batches(5, overflow_at=(2, 5))
  ds0 = DynamicScale(growth_interval=1, scale=SCALE)
  reference = _reference_run(params, batches, ds0)
  assert [r[2] for r in reference] == [True, True, False, True, True]

  @jax.jit
  def step(params, opt_state, ds, batch):
    grad_fn = jaxaccum.linen.dynamic_scale_value_and_grad(ds, _half_loss, num_microbatches=K)
    ds, is_fin, loss, grads = grad_fn(params, batch)
    updates, new_opt_state = _inner().update(grads, opt_state, params)
    params = _where(is_fin, optax.apply_updates(params, updates), params)
    return params, _where(is_fin, new_opt_state, opt_state), ds, is_fin, grads

  ds, opt_state, scales = ds0, _inner().init(params), []
  for batch, (ref_params, ref_ds, ref_fin, ref_grads) in zip(batches, reference):
    params, opt_state, ds, is_fin, grads = step(params, opt_state, ds, batch)
    scales.append(float(ds.scale))
    assert bool(is_fin) == ref_fin
    _same_scale(ds, ref_ds)
    if ref_fin:
      assert_rel_close(grads, ref_grads, 2e-3)
    assert_rel_close(params, ref_params, 2e-3)
  # Grows after growth_interval finite steps; the overflowing micro-batch
  # halves it once.
  assert scales == [SCALE, 2 * SCALE, SCALE, SCALE, 2 * SCALE]


def test_dynamic_scale_across_steps_decides_once_per_cycle():
  params = _params()
  batches = _half_batches(4, overflow_at=(1, 5))  # row 5: the cycle's call 1 of 4
  ds0 = DynamicScale(growth_interval=1, scale=SCALE)
  reference = _reference_run(params, batches, ds0)
  assert [r[2] for r in reference] == [True, False, True, True]

  @jax.jit
  def call(state, ds, batch):
    _, grads = jaxaccum.linen.scaled_value_and_grad(ds, _half_loss)(state.params, batch)
    return jaxaccum.linen.apply_scaled_gradients(state, grads=grads, dynamic_scale=ds)

  tx = jaxaccum.multi_steps(_inner(), K)
  state = jaxaccum.linen.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)
  ds = ds0
  for batch, (ref_params, ref_ds, ref_fin, _) in zip(batches, reference):
    before = state
    for j in range(K):
      start_scale = ds.scale
      state, ds, is_fin = call(state, ds, jax.tree.map(lambda a: a[j::K], batch))
      if j < K - 1:  # no decision within a cycle, even after an overflow
        assert bool(is_fin) and float(ds.scale) == float(start_scale)
    assert bool(is_fin) == ref_fin
    assert bool(jaxaccum.has_updated(state.opt_state)) == ref_fin
    _same_scale(ds, ref_ds)
    if ref_fin:
      assert_rel_close(jax.tree.map(jnp.subtract, state.params, before.params),
                       jax.tree.map(jnp.subtract, ref_params, before.params), 5e-3)
    else:  # the whole cycle is skipped; the next one starts empty
      assert_trees_equal(state.params, before.params)
      assert_trees_equal(state.opt_state.inner_opt_state, before.opt_state.inner_opt_state)
      assert int(state.opt_state.gradient_step) == int(before.opt_state.gradient_step)
      assert not np.any(np.asarray(state.opt_state.acc_grads["Dense_0"]["kernel"]))
  assert int(state.optimizer_step) == 3 and int(state.step) == 4 * K


def test_apply_scaled_gradients_without_multi_steps_is_the_flax_step():
  params = _params()
  batches = _half_batches(3, overflow_at=(1, 0))
  reference = _reference_run(params, batches, DynamicScale(growth_interval=1, scale=SCALE))

  @jax.jit
  def step(state, ds, batch):
    _, grads = jaxaccum.linen.scaled_value_and_grad(ds, _half_loss)(state.params, batch)
    return jaxaccum.linen.apply_scaled_gradients(state, grads=grads, dynamic_scale=ds)

  state = train_state.TrainState.create(apply_fn=MODEL.apply, params=params, tx=_inner())
  ds = DynamicScale(growth_interval=1, scale=SCALE)
  for batch, (ref_params, ref_ds, ref_fin, _) in zip(batches, reference):
    state, ds, is_fin = step(state, ds, batch)
    assert bool(is_fin) == ref_fin
    _same_scale(ds, ref_ds)
    assert_rel_close(state.params, ref_params, 1e-6)


def test_dynamic_scale_helpers_validate_their_arguments():
  with pytest.raises(TypeError, match="DynamicScale"):
    jaxaccum.linen.dynamic_scale_value_and_grad(2.0, _half_loss, num_microbatches=2)
  with pytest.raises(TypeError, match="num_microbatches, not microbatch_size"):
    jaxaccum.linen.scaled_value_and_grad(DynamicScale(), _half_loss, microbatch_size=2)
