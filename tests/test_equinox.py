"""The Equinox recipe of docs/equinox.md: ``eqx.partition`` / ``eqx.combine``.

References are Equinox's own ``eqx.filter_value_and_grad`` on the whole
batch, and one optax step with its gradients.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxaccum
from _models import assert_rel_close, standard_promotion

eqx = pytest.importorskip("equinox")

N = 4
B = 32


def _problem():
  model = eqx.nn.MLP(in_size=8, out_size=1, width_size=16, depth=2, key=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (B, 8))
  return model, (x, jnp.sin(x[:, :1]))


def _model_loss(model, batch):
  x, y = batch
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def test_partitioned_model_equals_filter_value_and_grad():
  model, batch = _problem()
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def loss_fn(params, batch):
    return _model_loss(eqx.combine(params, static), batch)

  ref_loss, ref_grads = eqx.filter_jit(eqx.filter_value_and_grad(_model_loss))(model, batch)
  loss, grads = jax.jit(jaxaccum.value_and_grad(loss_fn, num_microbatches=N))(params, batch)
  # The same structure as Equinox's gradients: the model with None for non-arrays.
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  assert_rel_close((loss, grads), (ref_loss, ref_grads))


def test_optimizer_step_and_multi_steps_cycle_equal_the_full_batch_step():
  model, batch = _problem()
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def loss_fn(params, batch):
    return _model_loss(eqx.combine(params, static), batch)

  tx = standard_promotion(optax.adamw(1e-2))
  _, ref_grads = eqx.filter_jit(eqx.filter_value_and_grad(_model_loss))(model, batch)
  ref_updates, _ = tx.update(ref_grads, tx.init(params), params)
  expected = optax.apply_updates(params, ref_updates)

  grad_fn = jaxaccum.value_and_grad(loss_fn, num_microbatches=N)

  @jax.jit
  def train_step(params, opt_state, batch):
    _, grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  stepped, _ = train_step(params, tx.init(params), batch)
  assert_rel_close(stepped, expected)
  assert isinstance(eqx.combine(stepped, static), eqx.nn.MLP)

  ms = jaxaccum.multi_steps(tx, every_k_schedule=N)

  @jax.jit
  def micro_step(params, ms_state, micro):
    updates, ms_state = ms.update(jax.grad(loss_fn)(params, micro), ms_state, params)
    return optax.apply_updates(params, updates), ms_state

  cycled, ms_state = params, ms.init(params)
  for i in range(N):
    cycled, ms_state = micro_step(cycled, ms_state, jax.tree.map(lambda a: a[i::N], batch))
  assert jaxaccum.has_updated(ms_state)
  assert_rel_close(cycled, expected)
