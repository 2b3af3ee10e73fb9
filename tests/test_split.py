"""How a batch is split into micro-batches, and what is rejected.

Micro-batch ``i`` of ``N`` holds rows ``i, i + N, i + 2N, ...`` (a strided
split); ``microbatch_size`` is the same split named by its size; invalid sizes,
batches and options raise errors that name the offending values; and the split
of a batch sharded over devices moves no row between devices.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxaccum
from _models import assert_trees_equal, mlp_batch, mlp_init, mlp_loss


def _row_ids_loss(w, batch):
  """A loss whose aux is the batch's row ids, to see which rows a call got."""
  ids, x = batch
  return jnp.mean(x * w), ids


@pytest.mark.parametrize("n", [1, 2, 3, 4, 12])
def test_microbatch_i_holds_rows_i_plus_multiples_of_n(n):
  ids = jnp.arange(12, dtype=jnp.int32)
  x = jnp.arange(12.0)
  f = jaxaccum.value_and_grad(_row_ids_loss, num_microbatches=n, has_aux=True,
                              aux_reduction="stack")
  (_, stacked), _ = jax.jit(f)(jnp.float32(1.0), (ids, x))
  expected = np.stack([np.arange(i, 12, n) for i in range(n)])
  assert stacked.dtype == jnp.int32
  np.testing.assert_array_equal(stacked, expected)


def test_every_row_is_used_exactly_once():
  # The gradient of sum(x * w) is sum(x): any dropped or repeated row shows.
  x = 2.0 ** jnp.arange(12, dtype=jnp.float32)
  g = jaxaccum.grad(lambda w, x: jnp.sum(x * w), num_microbatches=4,
                    reduction="sum")(jnp.float32(0.0), x)
  assert float(g) == float(jnp.sum(x))


def test_nested_batch_pytrees_split_alike():
  ids = jnp.arange(8, dtype=jnp.int32)
  batch = {"a": (ids, ids * 10), "b": [ids[:, None] * jnp.ones((1, 3), jnp.int32)]}

  def loss(w, batch):
    return w * 0.0, batch

  f = jaxaccum.value_and_grad(loss, num_microbatches=2, has_aux=True,
                              aux_reduction="stack")
  (_, stacked), _ = f(jnp.float32(1.0), batch)
  rows = np.stack([np.arange(0, 8, 2), np.arange(1, 8, 2)])
  np.testing.assert_array_equal(stacked["a"][0], rows)
  np.testing.assert_array_equal(stacked["a"][1], rows * 10)
  np.testing.assert_array_equal(stacked["b"][0], np.repeat(rows[..., None], 3, -1))


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16])
def test_microbatch_size_equals_matching_num_microbatches(size):
  params = mlp_init(jax.random.key(0))
  batch = mlp_batch(jax.random.key(1), 16)
  by_size = jax.jit(jaxaccum.value_and_grad(mlp_loss, microbatch_size=size))(params, batch)
  by_count = jax.jit(jaxaccum.value_and_grad(mlp_loss, num_microbatches=16 // size))(
      params, batch)
  assert_trees_equal(by_size, by_count)


# --- Validation: errors name the offending values. ---


def _loss(w, batch):
  return jnp.mean(batch * w)


W = jnp.float32(1.0)


@pytest.mark.parametrize("jit", [False, True])
def test_batch_not_divisible_by_num_microbatches(jit):
  f = jaxaccum.value_and_grad(_loss, num_microbatches=4)
  f = jax.jit(f) if jit else f
  with pytest.raises(ValueError, match=r"10.*num_microbatches=4"):
    f(W, jnp.ones(10))


def test_batch_not_divisible_by_microbatch_size():
  f = jaxaccum.value_and_grad(_loss, microbatch_size=3)
  with pytest.raises(ValueError, match=r"10.*microbatch_size=3"):
    f(W, jnp.ones(10))


def test_batch_smaller_than_num_microbatches():
  f = jaxaccum.value_and_grad(_loss, num_microbatches=8)
  with pytest.raises(ValueError, match=r"4.*num_microbatches=8"):
    f(W, jnp.ones(4))


@pytest.mark.parametrize("jit", [False, True])
def test_leaves_with_different_leading_sizes(jit):
  f = jaxaccum.value_and_grad(lambda w, b: jnp.mean(b[0] * w) + jnp.mean(b[1] * w),
                              num_microbatches=2)
  f = jax.jit(f) if jit else f
  with pytest.raises(ValueError, match=r"different leading sizes.*\b8\b.*\b6\b"):
    f(W, (jnp.ones(8), jnp.ones(6)))


def test_different_leading_sizes_across_batch_arguments():
  f = jaxaccum.value_and_grad(lambda w, x, y: jnp.mean(x * w) + jnp.mean(y * w),
                              num_microbatches=2, batch_argnums=(1, 2))
  with pytest.raises(ValueError, match=r"different leading sizes.*\b4\b.*\b6\b"):
    f(W, jnp.ones(4), jnp.ones(6))


@pytest.mark.parametrize("name", ["num_microbatches", "microbatch_size"])
@pytest.mark.parametrize("value", [0, -2])
def test_sizes_below_one(name, value):
  with pytest.raises(ValueError, match=re.escape(f"{name}={value}")):
    jaxaccum.value_and_grad(_loss, **{name: value})


@pytest.mark.parametrize("fn", [jaxaccum.value_and_grad, jaxaccum.grad])
def test_neither_size_option(fn):
  with pytest.raises(ValueError,
                     match=r"num_microbatches=None.*microbatch_size=None"):
    fn(_loss)


def test_both_size_options():
  with pytest.raises(ValueError, match=r"num_microbatches=2.*microbatch_size=4"):
    jaxaccum.value_and_grad(_loss, num_microbatches=2, microbatch_size=4)


@pytest.mark.parametrize("value", [2.0, "2", True])
def test_non_int_num_microbatches(value):
  with pytest.raises((TypeError, ValueError), match=re.escape(f"num_microbatches={value!r}")):
    jaxaccum.value_and_grad(_loss, num_microbatches=value)


@pytest.mark.parametrize("leaf", [[1.0, 2.0], 3.0, 3])
def test_non_array_batch_leaf(leaf):
  # A list is a pytree: its leaves are Python scalars.
  f = jaxaccum.value_and_grad(lambda w, b: jnp.mean(b[0] * w), num_microbatches=2)
  kind = type(jax.tree.leaves(leaf)[0]).__name__
  with pytest.raises(TypeError, match=rf"\[1\].* is a {kind}, not an array"):
    f(W, (jnp.ones(4), leaf))


def test_scalar_batch_leaf():
  f = jaxaccum.value_and_grad(_loss, num_microbatches=1)
  with pytest.raises(ValueError, match="scalar"):
    f(W, jnp.float32(2.0))


def test_empty_batch():
  f = jaxaccum.value_and_grad(lambda w, b: w * 1.0, num_microbatches=1)
  with pytest.raises(ValueError, match="no arrays"):
    f(W, ())


@pytest.mark.parametrize("argnums, batch_argnums", [(1, 1), ((0, 1), 1), (0, (0, 2))])
def test_overlapping_argnums_and_batch_argnums(argnums, batch_argnums):
  with pytest.raises(ValueError, match=r"batch_argnums.*argnums.*overlap|overlap.*"
                     + re.escape(f"batch_argnums={batch_argnums!r}")):
    jaxaccum.value_and_grad(_loss, num_microbatches=2, argnums=argnums,
                            batch_argnums=batch_argnums)


def test_overlap_error_names_both_values():
  with pytest.raises(ValueError) as info:
    jaxaccum.value_and_grad(_loss, num_microbatches=2, argnums=(0, 1), batch_argnums=1)
  assert "batch_argnums=1" in str(info.value)
  assert "(0, 1)" in str(info.value)


def test_overlapping_rng_argnums():
  with pytest.raises(ValueError, match=r"overlap.*rng_argnums"):
    jaxaccum.value_and_grad(_loss, num_microbatches=2, rng_argnums=1)
  with pytest.raises(ValueError, match=r"overlap.*rng_argnums"):
    jaxaccum.value_and_grad(_loss, num_microbatches=2, argnums=(0, 2), rng_argnums=2)


@pytest.mark.parametrize("option, value", [("reduction", "max"), ("aux_reduction", "median")])
def test_unknown_reductions(option, value):
  with pytest.raises(ValueError, match=re.escape(f"{option}={value!r}")):
    jaxaccum.value_and_grad(_loss, num_microbatches=2, **{option: value})


def test_batch_argnums_past_the_call():
  f = jaxaccum.value_and_grad(_loss, num_microbatches=2, batch_argnums=2)
  with pytest.raises(ValueError, match="batch_argnums=2"):
    f(W, jnp.ones(4))


@pytest.mark.parametrize("weight_fn", [lambda x: x[:, 0], lambda x: jnp.sum(x, 0)])
def test_non_scalar_weight(weight_fn):
  # Weights of shape (2,) broadcast silently against gradients of shape (2,).
  f = jaxaccum.value_and_grad(lambda w, x: jnp.mean(x @ w), num_microbatches=2,
                              weight_fn=weight_fn)
  with pytest.raises(ValueError, match=r"weight_fn.*scalar.*\(2,\)"):
    f(jnp.ones(2), jnp.ones((4, 2)))


# --- The split moves no row between devices. ---


def _collectives_moving_data(hlo: str) -> list[str]:
  return re.findall(r"all-gather|all-to-all|collective-permute", hlo)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_split_of_a_sharded_batch_moves_no_rows(axis_type):
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  params = mlp_init(jax.random.key(0))
  x, y = mlp_batch(jax.random.key(1), 64)
  rows = NamedSharding(mesh, P("data"))
  batch = (jax.device_put(x, rows), jax.device_put(y, rows))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  f = jax.jit(jaxaccum.value_and_grad(mlp_loss, num_microbatches=4))
  hlo = f.lower(params, batch).compile().as_text()
  assert not _collectives_moving_data(hlo)
  got = f(params, batch)
  ref = jax.jit(jax.value_and_grad(mlp_loss))(params, batch)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)


def test_contiguous_split_of_a_sharded_batch_would_move_rows():
  # The check above can fail: contiguous micro-batches are each held by 2 of
  # the 8 devices, so XLA moves rows.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  params = jax.device_put(mlp_init(jax.random.key(0)), NamedSharding(mesh, P()))
  batch = jax.device_put(mlp_batch(jax.random.key(1), 64), NamedSharding(mesh, P("data")))

  def contiguous(params, batch):
    parts = jax.tree.map(lambda a: a.reshape(4, 16, *a.shape[1:]), batch)

    def body(acc, part):
      return acc + mlp_loss(params, part), None

    return lax.scan(body, jnp.float32(0.0), parts)[0]

  hlo = jax.jit(contiguous).lower(params, batch).compile().as_text()
  assert _collectives_moving_data(hlo)
