"""No silent wrong numbers: a value the library cannot honour is an error
where it is static and NaN where it is traced; every bad option a clear error."""

import inspect
import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccum
from _models import assert_rel_close, mlp_batch, mlp_init, mlp_loss

PARAMS = mlp_init(jax.random.key(0))
BATCH = mlp_batch(jax.random.key(1), 8)


def _weighted(weights):
  """value_and_grad on 2 micro-batches whose weights are ``weights``."""
  x, y = BATCH
  w = jnp.repeat(jnp.asarray(weights, jnp.float32)[None], 4, axis=0).reshape(-1)
  return jax.jit(jaxaccum.value_and_grad(
      mlp_loss, num_microbatches=2, batch_argnums=1,
      weight_fn=lambda b: b[2][0]))(PARAMS, (x, y, w))


def _loss_ignoring_weights(params, batch):
  return mlp_loss(params, batch[:2])


@pytest.mark.parametrize("weights", [[1.0, np.nan], [1.0, -0.5], [-1.0, -2.0]])
def test_nan_or_negative_weights_give_nan(weights):
  x, y = BATCH
  w = jnp.tile(jnp.asarray(weights, jnp.float32), 4)
  value, grads = jax.jit(jaxaccum.value_and_grad(
      _loss_ignoring_weights, num_microbatches=2, weight_fn=lambda b: b[2][0]))(
          PARAMS, (x, y, w))
  assert np.isnan(float(value))
  assert all(np.isnan(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_zero_weights_still_give_zero():
  x, y = BATCH
  w = jnp.zeros(8)
  value, grads = jaxaccum.value_and_grad(
      _loss_ignoring_weights, num_microbatches=2, weight_fn=lambda b: b[2][0])(
          PARAMS, (x, y, w))
  assert float(value) == 0
  assert all((np.asarray(g) == 0).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("dtype, error", [(jnp.int32, ValueError), (jnp.bool_, ValueError),
                                          ("foo", TypeError)])
def test_accumulator_dtype_rejected_at_construction(dtype, error):
  with pytest.raises(error, match="accumulator_dtype="):
    jaxaccum.value_and_grad(mlp_loss, num_microbatches=2, accumulator_dtype=dtype)


@pytest.mark.parametrize("options, error, pattern", [
    (dict(argnums=0.0), TypeError, "argnums=0.0"),
    (dict(argnums=()), ValueError, r"argnums=\(\)"),
    (dict(num_microbatches="2"), TypeError, "num_microbatches='2'"),
    (dict(state_policy=1, state_argnums=2), TypeError, "state_policy=1"),
    (dict(state_policy=None, state_argnums=2), TypeError, "state_policy=None"),
    (dict(state_policy="mean"), ValueError, "state_policy='mean'.*without state_argnums"),
    (dict(state_policy="median", state_argnums=2), ValueError, "state_policy='median'"),
    (dict(weight_fn=3), TypeError, "weight_fn=3"),
    (dict(has_aux="yes"), TypeError, "has_aux='yes'"),
    (dict(reduction=None), TypeError, "reduction=None"),
    (dict(mesh=object()), ValueError, "mesh= is only used with data_axis="),
])
def test_invalid_options(options, error, pattern):
  options = {"num_microbatches": 2, **options}
  for fn in (jaxaccum.value_and_grad, jaxaccum.grad):
    with pytest.raises(error, match=pattern):
      fn(mlp_loss, **options)


def test_numpy_integers_are_accepted_everywhere():
  got = jaxaccum.value_and_grad(mlp_loss, num_microbatches=np.int64(2),
                                argnums=np.int32(0), batch_argnums=(np.int64(1),))(
                                    PARAMS, BATCH)
  assert_rel_close(got, jax.value_and_grad(mlp_loss)(PARAMS, BATCH))


def test_grad_has_an_explicit_signature():
  params = inspect.signature(jaxaccum.grad).parameters
  assert list(params) == list(inspect.signature(jaxaccum.value_and_grad).parameters)


def test_empty_batch_with_microbatch_size():
  x, y = BATCH
  with pytest.raises(ValueError, match="leading size 0"):
    jaxaccum.value_and_grad(mlp_loss, microbatch_size=2)(PARAMS, (x[:0], y[:0]))


def test_not_divisible_message_names_the_batch_argument():
  loss = lambda batch, params: mlp_loss(params, batch)
  with pytest.raises(ValueError, match=r"not divisible by num_microbatches=3.*batch_argnums=\(0,\)"):
    jaxaccum.value_and_grad(loss, num_microbatches=3, argnums=1, batch_argnums=0)(
        BATCH, PARAMS)


def test_state_argnums_with_a_bare_loss():
  f = jaxaccum.value_and_grad(lambda p, b, s: mlp_loss(p, b), num_microbatches=2,
                              state_argnums=2)
  with pytest.raises(TypeError, match=re.escape("state_argnums=(2,), fun must return "
                                                "(loss, new_state)")):
    f(PARAMS, BATCH, jnp.zeros(3))


def test_axis_name_outside_pmap_names_the_option_and_data_axis():
  f = jaxaccum.value_and_grad(mlp_loss, num_microbatches=2, axis_name="batch")
  with pytest.raises(ValueError, match="axis_name='batch'.*data_axis="):
    f(PARAMS, BATCH)


def test_python_scalars_do_not_recompile():
  @chex.assert_max_traces(n=1)
  def loss(params, batch, scale, *, shift):
    return scale * mlp_loss(params, batch) + shift

  f = jaxaccum.value_and_grad(loss, num_microbatches=2)
  first = f(PARAMS, BATCH, 2.0, shift=1.0)
  for _ in range(3):
    again = f(PARAMS, BATCH, 2.0, shift=1.0)  # a retrace would exceed the limit
  assert_rel_close(again, first)
  # Another value is another (static) program, with the right result.
  chex.clear_trace_counter()
  assert_rel_close(f(PARAMS, BATCH, 3.0, shift=0.0)[0],
                   3.0 * mlp_loss(PARAMS, BATCH))


def test_python_flags_in_fun_still_work():
  def loss(params, batch, train):
    return mlp_loss(params, batch) * (2.0 if train else 1.0)

  f = jaxaccum.value_and_grad(loss, num_microbatches=2)
  assert_rel_close(f(PARAMS, BATCH, True)[0], 2 * f(PARAMS, BATCH, False)[0])


def test_errors_point_at_the_users_frame():
  f = jaxaccum.value_and_grad(mlp_loss, num_microbatches=3)
  with pytest.raises(ValueError) as info:
    f(PARAMS, BATCH)
  package = os.path.dirname(jaxaccum.__file__)
  frames = [e.path for e in info.traceback]
  assert not any(str(p).startswith(package) for p in frames), frames


@pytest.mark.parametrize("policy, expected", [("sequential", 2.0), ("mean", 1.0)])
def test_a_python_number_as_state(policy, expected):
  def loss(params, batch, count):
    return mlp_loss(params, batch), count + 1.0

  (_, count), _ = jaxaccum.value_and_grad(loss, num_microbatches=2, state_argnums=2,
                                          state_policy=policy)(PARAMS, BATCH, 0.0)
  assert float(count) == expected


@pytest.mark.parametrize("bad_weight", [np.nan, -1.0])
def test_a_bad_weight_stays_nan_when_its_micro_batch_is_skipped(bad_weight):
  x, y = BATCH
  w = jnp.tile(jnp.asarray([1.0, bad_weight], jnp.float32), 4)
  poison = jnp.tile(jnp.asarray([0.0, np.nan], jnp.float32), 4)

  def loss(params, batch):
    return mlp_loss(params, batch[:2]) + batch[3][0]

  value, grads = jaxaccum.value_and_grad(
      loss, num_microbatches=2, skip_nonfinite=True, weight_fn=lambda b: b[2][0])(
          PARAMS, (x, y, w, poison))
  assert np.isnan(float(value))
  assert all(np.isnan(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_all_skipped_gives_nan_mean_aux():
  x, y = BATCH
  poison = jnp.full(8, np.nan)

  def loss(params, batch):
    value = mlp_loss(params, batch[:2]) + batch[2][0]
    return value, {"accuracy": jnp.float32(1.0)}

  (value, aux), _ = jaxaccum.value_and_grad(
      loss, num_microbatches=2, skip_nonfinite=True, has_aux=True)(PARAMS, (x, y, poison))
  assert np.isnan(float(value)) and np.isnan(float(aux["accuracy"]))
