"""``skip_nonfinite=True``: a micro-batch with a NaN or infinity is left out.

With micro-batch ``i`` of ``N`` holding rows ``i, i + N, ...`` (per device
under ``data_axis``), one NaN row poisons exactly one micro-batch. The result
must then equal ``jax.value_and_grad`` over the rows of the other micro-batches
concatenated, and ``stats.num_skipped`` must count the poisoned ones.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxaccum
from _models import assert_rel_close, mlp_apply, mlp_batch, mlp_init, mlp_loss

N = 8
B = 64


@functools.cache
def _problem():
  return mlp_init(jax.random.key(0)), mlp_batch(jax.random.key(1), B)


def _poison(batch, rows):
  x, y = batch
  return x.at[np.asarray(rows)].set(jnp.nan), y


def _rows_except(batch, rows):
  keep = np.setdiff1d(np.arange(B), rows)
  return jax.tree.map(lambda a: a[keep], batch)


@functools.cache
def _skipping(loss=mlp_loss, **options):
  return jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=N, skip_nonfinite=True,
                                         with_stats=True, **options))


def _assert_close_1e6(actual, expected):
  assert_rel_close(actual, expected, 1e-6)


@pytest.mark.parametrize("poisoned_row", [0, 13, 63])
def test_one_poisoned_microbatch_gives_the_mean_of_the_other_seven(poisoned_row):
  params, batch = _problem()
  (value, grads), stats = _skipping()(params, _poison(batch, [poisoned_row]))
  # Micro-batch poisoned_row % N holds every row congruent to it mod N.
  bad_rows = np.arange(poisoned_row % N, B, N)
  ref_value, ref_grads = jax.value_and_grad(mlp_loss)(params, _rows_except(batch, bad_rows))
  _assert_close_1e6((value, grads), (ref_value, ref_grads))
  assert int(stats.num_skipped) == 1
  assert np.isfinite(float(stats.noise_scale))


def test_infinite_loss_is_skipped_too():
  params, batch = _problem()
  x, y = batch
  poisoned = (x, y.at[5].set(jnp.inf))
  (value, grads), stats = _skipping()(params, poisoned)
  ref = jax.value_and_grad(mlp_loss)(params, _rows_except(batch, np.arange(5, B, N)))
  _assert_close_1e6((value, grads), ref)
  assert int(stats.num_skipped) == 1


def test_all_poisoned_gives_nan_and_counts_all():
  # Zero gradients would let the optimizer step on its momentum unnoticed;
  # NaN makes optax.apply_if_finite / should_skip_update_fn skip the step.
  params, batch = _problem()
  (value, grads), stats = _skipping()(params, _poison(batch, np.arange(N)))
  for g in jax.tree.leaves(grads):
    assert np.isnan(np.asarray(g)).all()
  assert np.isnan(float(value))
  assert int(stats.num_skipped) == N


def test_default_propagates_nan():
  params, batch = _problem()
  value, grads = jax.jit(jaxaccum.value_and_grad(mlp_loss, num_microbatches=N))(
      params, _poison(batch, [3]))
  assert np.isnan(float(value))
  assert all(np.isnan(np.asarray(g)).any() for g in jax.tree.leaves(grads))


# --- With weight_fn: the mean over the good micro-batches is token-weighted. ---


def masked_loss(params, batch):
  """Squared error averaged over rows weighted by ``mask``."""
  x, y, mask = batch
  err = jnp.sum(jnp.square(mlp_apply(params, x) - y), axis=-1)
  return jnp.sum(err * mask) / jnp.sum(mask)


def num_rows(batch):
  return jnp.sum(batch[2])


def test_weight_fn_gives_the_weighted_mean_of_the_good_microbatches():
  params, (x, y) = _problem()
  # Micro-batches of very different weights: an unweighted mean of their
  # means would differ from the weighted mean over the good rows (weights
  # 2, 3, 5, 6, 8, 8, 8, 8; none zero, whose 0/0 loss would count as skipped).
  mask = jnp.asarray((np.arange(B) % 5 <= np.arange(B) % 8).astype(np.float32))
  batch = (x, y, mask)
  poisoned = (x.at[2].set(jnp.nan), y, mask)
  (value, grads), stats = _skipping(masked_loss, weight_fn=num_rows)(params, poisoned)
  ref = jax.value_and_grad(masked_loss)(params, _rows_except(batch, np.arange(2, B, N)))
  _assert_close_1e6((value, grads), ref)
  assert int(stats.num_skipped) == 1
  unweighted = _skipping(masked_loss)(params, poisoned)[0]
  assert not np.allclose(np.asarray(unweighted[0]), np.asarray(ref[0]), rtol=1e-3)


# --- Under data_axis on 8 devices: the count is reduced across devices. ---

D = 8
MESH = jax.make_mesh((D,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _device_microbatch_rows(row, n):
  """Global rows of the micro-batch holding ``row`` with ``n`` per device."""
  block = B // D
  start = row // block * block
  return np.arange(start + (row - start) % n, start + block, n)


@pytest.mark.parametrize("poisoned", [[9], [9, 60], list(range(0, B, 4))])
def test_data_axis_skips_per_device_and_counts_over_devices(poisoned):
  n = 2  # per device: 8 rows, 2 micro-batches of 4, 16 micro-batches in all
  params, batch = _problem()
  poisoned_batch = jax.device_put(_poison(batch, poisoned), NamedSharding(MESH, P("data")))
  (value, grads), stats = _skipping_data(n)(params, poisoned_batch)
  bad = np.unique(np.concatenate([_device_microbatch_rows(r, n) for r in poisoned]))
  expected_skipped = len(bad) // (B // (D * n))
  assert int(stats.num_skipped) == expected_skipped
  if len(bad) == B:
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))
    return
  ref = jax.value_and_grad(mlp_loss)(params, _rows_except(batch, bad))
  _assert_close_1e6((value, grads), ref)


@functools.cache
def _skipping_data(n):
  return jax.jit(jaxaccum.value_and_grad(
      mlp_loss, num_microbatches=n, skip_nonfinite=True, with_stats=True,
      data_axis="data", mesh=MESH))


@pytest.mark.parametrize("skip", [False, True])
def test_all_padding_microbatch_is_neither_skipped_nor_a_nan_statistic(skip):
  params, (x, y) = _problem()
  # Micro-batch 0 of 8 (rows 0, 8, ...) is all padding: weight 0, loss 0 / 0.
  mask = jnp.asarray((np.arange(B) % N != 0).astype(np.float32))
  _, stats = jax.jit(jaxaccum.value_and_grad(
      masked_loss, num_microbatches=N, weight_fn=num_rows, with_stats=True,
      skip_nonfinite=skip))(params, (x, y, mask))
  assert int(stats.num_skipped) == 0
  assert np.isfinite(float(stats.microbatch_sq_norm))
  assert np.isfinite(float(stats.noise_scale))
