"""Training code as it is written: per-example aux, batches by keyword.

Flax train steps return logits as aux for their metrics and pass batches by
keyword; the accumulated step must give what the full-batch step gives.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxaccum
from _models import assert_rel_close, mlp_apply, mlp_batch, mlp_init, mlp_loss

B = 16
PARAMS = mlp_init(jax.random.key(0))
BATCH = mlp_batch(jax.random.key(1), B)


def loss_with_metrics(params, batch):
  """Mean squared error; aux: per-example logits and errors, batch metrics."""
  x, y = batch
  logits = mlp_apply(params, x)
  err = jnp.sum(jnp.square(logits - y), axis=-1)
  metrics = {"mse": jnp.mean(err), "positive": jnp.sum(logits[:, 0] > 0)}
  return jnp.mean(err), {"logits": logits, "err": err, "metrics": metrics}


REDUCTIONS = {"logits": "concat", "err": "concat", "metrics": {"mse": "mean", "positive": "sum"}}


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_concat_and_a_pytree_of_reductions_equal_the_full_batch_aux(n):
  (ref_value, ref_aux), ref_grads = jax.jit(
      jax.value_and_grad(loss_with_metrics, has_aux=True))(PARAMS, BATCH)
  (value, aux), grads = jax.jit(jaxaccum.value_and_grad(
      loss_with_metrics, num_microbatches=n, has_aux=True,
      aux_reduction=REDUCTIONS))(PARAMS, BATCH)
  assert aux["logits"].shape == ref_aux["logits"].shape == (B, 2)
  np.testing.assert_allclose(aux["logits"], ref_aux["logits"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(aux["err"], ref_aux["err"], rtol=1e-6, atol=1e-6)
  assert_rel_close(aux["metrics"]["mse"], ref_aux["metrics"]["mse"])
  assert int(aux["metrics"]["positive"]) == int(ref_aux["metrics"]["positive"])
  assert_rel_close((value, grads), (ref_value, ref_grads))


def test_a_prefix_names_one_reduction_for_a_subtree():
  (_, aux), _ = jaxaccum.value_and_grad(
      loss_with_metrics, num_microbatches=4, has_aux=True,
      aux_reduction={"logits": "concat", "err": "stack", "metrics": "sum"})(PARAMS, BATCH)
  _, ref_aux = loss_with_metrics(PARAMS, BATCH)
  # "stack": micro-batch i (rows i, i + 4, ...) at index i.
  np.testing.assert_allclose(aux["err"], ref_aux["err"].reshape(B // 4, 4).T, rtol=1e-6)
  np.testing.assert_allclose(aux["logits"], ref_aux["logits"], rtol=1e-6, atol=1e-6)


def test_concat_under_data_axis_gives_the_global_rows_in_order():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x, y = mlp_batch(jax.random.key(2), 64)
  batch = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  (_, aux), _ = jax.jit(jaxaccum.value_and_grad(
      loss_with_metrics, num_microbatches=2, has_aux=True, aux_reduction=REDUCTIONS,
      data_axis="data", mesh=mesh))(PARAMS, batch)
  _, ref_aux = loss_with_metrics(PARAMS, (x, y))
  np.testing.assert_allclose(aux["logits"], ref_aux["logits"], rtol=1e-6, atol=1e-6)
  assert int(aux["metrics"]["positive"]) == int(ref_aux["metrics"]["positive"])


def test_concat_of_a_batch_level_leaf_is_a_clear_error():
  f = jaxaccum.value_and_grad(loss_with_metrics, num_microbatches=4, has_aux=True,
                              aux_reduction="concat")
  with pytest.raises(ValueError, match=r"concat.*aux\['metrics'\]\['mse'\].*shape \(\)"):
    f(PARAMS, BATCH)


@pytest.mark.parametrize("spec", [{"logits": "concat"}, {"nope": "mean", "logits": "mean",
                                                         "err": "mean", "metrics": "mean"}])
def test_aux_reduction_that_does_not_fit_the_aux(spec):
  f = jaxaccum.value_and_grad(loss_with_metrics, num_microbatches=4, has_aux=True,
                              aux_reduction=spec)
  with pytest.raises(ValueError, match="aux_reduction=.*prefix"):
    f(PARAMS, BATCH)


@pytest.mark.parametrize("spec, error", [({"logits": "median"}, ValueError),
                                         ({"logits": 3}, TypeError), ({}, ValueError)])
def test_invalid_aux_reduction_pytree(spec, error):
  with pytest.raises(error, match="aux_reduction="):
    jaxaccum.value_and_grad(loss_with_metrics, num_microbatches=4, aux_reduction=spec)


# --- Batches passed by keyword. ---


def keyword_loss(params, *, batch, scale, offset=0.0):
  return scale * mlp_loss(params, batch) + offset


def test_batch_argnames_alone_replaces_batch_argnums():
  ref = jax.value_and_grad(keyword_loss)(PARAMS, batch=BATCH, scale=2.0, offset=1.0)
  f = jax.jit(jaxaccum.value_and_grad(keyword_loss, num_microbatches=4,
                                      batch_argnames="batch"))
  assert_rel_close(f(PARAMS, batch=BATCH, scale=2.0, offset=1.0), ref)


def test_batch_argnames_with_batch_argnums_and_weight_fn():
  def loss(params, x, *, y, mask):
    err = jnp.sum(jnp.square(mlp_apply(params, x) - y), axis=-1)
    return jnp.sum(err * mask) / jnp.sum(mask)

  x, y = BATCH
  mask = (jnp.arange(B) % 3 != 0).astype(jnp.float32)
  ref = jax.value_and_grad(loss)(PARAMS, x, y=y, mask=mask)
  got = jaxaccum.value_and_grad(
      loss, num_microbatches=4, batch_argnums=1, batch_argnames=("y", "mask"),
      weight_fn=lambda x, *, y, mask: jnp.sum(mask))(PARAMS, x, y=y, mask=mask)
  assert_rel_close(got, ref)


def test_missing_batch_keyword_is_a_clear_error():
  f = jaxaccum.value_and_grad(keyword_loss, num_microbatches=4, batch_argnames="batch")
  with pytest.raises(ValueError, match=r"batch_argnames=\('batch',\).*\['batch'\]"):
    f(PARAMS, scale=1.0)


@pytest.mark.parametrize("names", [3, ("a", 1)])
def test_batch_argnames_type(names):
  with pytest.raises(TypeError, match="batch_argnames"):
    jaxaccum.value_and_grad(keyword_loss, num_microbatches=4, batch_argnames=names)


@pytest.mark.parametrize("kind", ["mean", "stack"])
def test_floating_aux_keeps_its_dtype(kind):
  def loss(params, batch):
    value = mlp_loss(params, batch)
    return value, value.astype(jnp.bfloat16)

  (_, aux), _ = jaxaccum.value_and_grad(loss, num_microbatches=4, has_aux=True,
                                        aux_reduction=kind)(PARAMS, BATCH)
  (_, ref), _ = jax.value_and_grad(loss, has_aux=True)(PARAMS, BATCH)
  assert aux.dtype == ref.dtype == jnp.bfloat16


def test_stacked_floating_aux_keeps_its_dtype_under_pmap():
  def loss(params, batch):
    value = mlp_loss(params, batch)
    return value, value.astype(jnp.bfloat16)

  x, y = mlp_batch(jax.random.key(3), 64)
  batch = jax.tree.map(lambda a: a.reshape(8, 8, *a.shape[1:]), (x, y))
  f = jax.pmap(jaxaccum.value_and_grad(loss, num_microbatches=2, has_aux=True,
                                       aux_reduction="stack", axis_name="i"),
               axis_name="i", in_axes=(None, 0))
  (_, aux), _ = f(PARAMS, batch)
  assert aux.dtype == jnp.bfloat16 and aux.shape == (8, 2)
