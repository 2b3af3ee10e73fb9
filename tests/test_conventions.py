"""optax.microbatching's calling conventions, and the errors of a first hour.

- Batch arguments are bound to ``fun``'s signature, as ``jax.jit`` binds
  ``static_argnums`` / ``static_argnames``: a batch named by position may be
  passed by keyword, and the reverse.
- ``in_axes``: the batch axis of each batch argument.
- ``num_real_microbatches``: only the first ``n`` micro-batches are computed
  (the others not at all), ``n`` may be traced (no recompilation), and the
  result equals the full batch of the rows ``r`` with ``r % N < n``.
- Mistakes a new user makes get errors that name the option to fix.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxaccum
from _models import assert_rel_close, mlp_batch, mlp_init, mlp_loss

PARAMS = mlp_init(jax.random.key(0))
X, Y = mlp_batch(jax.random.key(1), 32)
N = 4


def loss_xy(params, x, y):
  return mlp_loss(params, (x, y))


def test_batch_by_position_passed_by_keyword():
  def loss(params, batch):
    return mlp_loss(params, batch)

  grad_fn = jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=N))
  got = grad_fn(PARAMS, batch=(X, Y))
  assert_rel_close(got, jax.value_and_grad(loss)(PARAMS, (X, Y)), 1e-5)


def test_batch_by_name_passed_by_position():
  grad_fn = jaxaccum.value_and_grad(loss_xy, num_microbatches=N, batch_argnames=("x", "y"))
  got = jax.jit(grad_fn)(PARAMS, X, Y)
  assert_rel_close(got, jax.value_and_grad(loss_xy)(PARAMS, X, Y), 1e-5)
  mixed = jax.jit(grad_fn)(PARAMS, X, y=Y)
  assert_rel_close(mixed, got, 1e-6)


def test_in_axes_time_major():
  """``[T, B, F]`` inputs split along axis 1, ``[B]`` targets along axis 0."""
  xs = jnp.stack([X, 2 * X, -X])  # T = 3

  def loss(params, xs, y):
    return jnp.mean(jnp.stack([mlp_loss(params, (x, y)) for x in xs]))

  grad_fn = jaxaccum.value_and_grad(loss, num_microbatches=N, batch_argnums=(1, 2),
                                    in_axes=(1, 0))
  got = jax.jit(grad_fn)(PARAMS, xs, Y)
  assert_rel_close(got, jax.value_and_grad(loss)(PARAMS, xs, Y), 1e-5)
  with pytest.raises(ValueError, match="in_axes"):
    jaxaccum.value_and_grad(loss, num_microbatches=N, batch_argnums=(1, 2), in_axes=(1,))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_real_microbatches_equal_their_rows(n):
  grad_fn = jaxaccum.value_and_grad(loss_xy, num_microbatches=N, batch_argnums=(1, 2),
                                    num_real_microbatches=n)
  rows = np.arange(X.shape[0]) % N < n
  want = jax.value_and_grad(loss_xy)(PARAMS, X[rows], Y[rows])
  assert_rel_close(jax.jit(grad_fn)(PARAMS, X, Y), want, 1e-5)


def test_traced_real_microbatches_skip_the_rest_without_recompiling():
  calls = []

  def loss(params, x, y):
    jax.debug.callback(lambda: calls.append(1))
    return loss_xy(params, x, y)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, x, y, n):
    return jaxaccum.value_and_grad(loss, num_microbatches=N, batch_argnums=(1, 2),
                                   num_real_microbatches=n)(params, x, y)

  for n in (1, 3, 2):
    calls.clear()
    got = step(PARAMS, X, Y, jnp.int32(n))
    jax.effects_barrier()
    assert len(calls) == n  # the other micro-batches are not computed
    rows = np.arange(X.shape[0]) % N < n
    assert_rel_close(got, jax.value_and_grad(loss_xy)(PARAMS, X[rows], Y[rows]), 1e-5)
  # A traced count the loop cannot honour is NaN, never a plausible number.
  value, grads = step(PARAMS, X, Y, jnp.int32(N + 1))
  assert np.isnan(value) and all(np.isnan(g).all() for g in jax.tree.leaves(grads))


def test_static_real_microbatches_above_n():
  with pytest.raises(ValueError, match="num_real_microbatches"):
    jaxaccum.value_and_grad(loss_xy, num_microbatches=2, num_real_microbatches=3)
  grad_fn = jaxaccum.value_and_grad(loss_xy, microbatch_size=16, batch_argnums=(1, 2),
                                    num_real_microbatches=3)
  with pytest.raises(ValueError, match="num_real_microbatches=3"):
    grad_fn(PARAMS, X, Y)  # N = 2


def test_unsplit_argument_with_the_batch_size_names_batch_argnums():
  grad_fn = jaxaccum.value_and_grad(loss_xy, num_microbatches=N)
  with pytest.raises(TypeError, match=r"batch_argnums.*\(1, 2\)") as info:
    jax.jit(grad_fn)(PARAMS, X, Y)
  assert "positional argument 2" in str(info.value)


def test_keyword_only_batch_names_batch_argnames():
  def loss(params, *, batch):
    return mlp_loss(params, batch)

  with pytest.raises(ValueError, match="batch_argnames"):
    jaxaccum.value_and_grad(loss, num_microbatches=N)(PARAMS, batch=(X, Y))
  fixed = jaxaccum.value_and_grad(loss, num_microbatches=N, batch_argnames="batch")
  assert_rel_close(fixed(PARAMS, batch=(X, Y)),
                   jax.value_and_grad(lambda p: loss(p, batch=(X, Y)))(PARAMS), 1e-5)


def test_closure_over_data_says_the_batch_must_be_an_argument():
  with pytest.raises(ValueError, match="must be an argument of fun"):
    jaxaccum.value_and_grad(lambda p: mlp_loss(p, (X, Y)), num_microbatches=N)(PARAMS)


def test_varying_parameters_inside_shard_map_without_axis_name():
  """Parameters cast to device-varying keep the gradients local."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  grad_fn = jaxaccum.value_and_grad(loss_xy, num_microbatches=2, batch_argnums=(1, 2))

  def local(params, x, y):
    params = jax.tree.map(lambda a: jaxaccum._compat.pcast_to_varying(a, ("data",)), params)
    value, grads = grad_fn(params, x, y)
    return value[None], jax.tree.map(lambda g: g[None], grads)

  step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                               out_specs=P("data")))
  x = jax.device_put(X, NamedSharding(mesh, P("data")))
  y = jax.device_put(Y, NamedSharding(mesh, P("data")))
  values, grads = jax.device_get(step(jax.device_put(PARAMS, NamedSharding(mesh, P())), x, y))
  for d in range(8):
    rows = slice(4 * d, 4 * d + 4)
    want = jax.value_and_grad(loss_xy)(PARAMS, X[rows], Y[rows])
    assert_rel_close((values[d], jax.tree.map(lambda g: g[d], grads)), want, 1e-5)


@pytest.mark.parametrize("spec, match", [
    (P("dta", None), r"param_specs.*\['dta'\]"),
    (P(None, None, "data"), r"param_specs.*3 entries"),
])
def test_bad_param_specs(spec, match):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  grad_fn = jaxaccum.value_and_grad(mlp_loss, num_microbatches=2, data_axis="data",
                                    mesh=mesh, param_specs=spec)
  with pytest.raises(ValueError, match=match):
    jax.jit(grad_fn)(PARAMS, (X, Y))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_data_axis_with_in_axes_and_traced_real_microbatches(axis_type):
  """Under data_axis each device splits its rows the same way: the real rows
  are still those with ``r % N < n``, and a batch axis 1 stays sharded."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  xs = jnp.stack([X, -X])  # [T, B, F]

  def loss(params, xs, y):
    return jnp.mean(jnp.stack([loss_xy(params, x, y) for x in xs]))

  with jax.set_mesh(mesh):
    params = jax.device_put(PARAMS, NamedSharding(mesh, P()))
    xs_s = jax.device_put(xs, NamedSharding(mesh, P(None, "data")))
    y_s = jax.device_put(Y, NamedSharding(mesh, P("data")))

    @jax.jit
    def step(params, xs, y, n):
      return jaxaccum.value_and_grad(loss, num_microbatches=2, batch_argnums=(1, 2),
                                     in_axes=(1, 0), data_axis="data",
                                     num_real_microbatches=n)(params, xs, y)

    for n in (1, 2):
      got = step(params, xs_s, y_s, jnp.int32(n))
      rows = np.arange(X.shape[0]) % 2 < n
      assert_rel_close(got, jax.value_and_grad(loss)(PARAMS, xs[:, rows], Y[rows]), 1e-5)


@pytest.mark.parametrize("n", [0, N + 1])
def test_traced_real_microbatches_out_of_range_leave_no_number(n):
  def loss(params, x, y):
    value = loss_xy(params, x, y)
    return value, {"sum": value, "rows": jnp.sum(x, axis=1)}

  @jax.jit
  def step(params, x, y, n):
    return jaxaccum.value_and_grad(
        loss, num_microbatches=N, batch_argnums=(1, 2), has_aux=True, with_stats=True,
        aux_reduction={"sum": "sum", "rows": "concat"}, num_real_microbatches=n)(params, x, y)

  result = step(PARAMS, X, Y, jnp.int32(n))
  floats = [x for x in jax.tree.leaves(result) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(np.isnan(x).all() for x in floats)


def test_concrete_array_real_microbatches_is_checked_like_an_int():
  with pytest.raises(ValueError, match="num_real_microbatches"):
    jaxaccum.value_and_grad(loss_xy, num_microbatches=2, num_real_microbatches=jnp.int32(3))
  with pytest.raises(ValueError, match="num_real_microbatches"):
    jaxaccum.value_and_grad(loss_xy, num_microbatches=2, num_real_microbatches=jnp.int32(0))


def test_batch_argnames_naming_the_differentiated_argument():
  def loss(w, x):
    return jnp.mean(w ** 2) * jnp.mean(x)

  grad_fn = jaxaccum.value_and_grad(loss, num_microbatches=2, batch_argnames="w")
  with pytest.raises(ValueError, match=r"argnums=0.*each argument plays one role"):
    grad_fn(jnp.arange(8.0), jnp.ones(8))


def test_defer_reduction_with_stats_is_an_error():
  with pytest.raises(ValueError, match="defer_reduction.*with_stats"):
    jaxaccum.value_and_grad(loss_xy, num_microbatches=2, data_axis="data",
                            defer_reduction=True, with_stats=True)
