"""The version shims behave alike on every supported jax / flax."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxaccum import _compat

D = 8
MESH = jax.make_mesh((D,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def _replicated_out(f):
  return jax.jit(jax.shard_map(f, mesh=MESH, in_specs=P(), out_specs=P(), check_vma=True))


def test_pcast_to_varying_marks_values_as_device_varying():
  x = jnp.arange(3.0)
  np.testing.assert_array_equal(_replicated_out(lambda a: a * 2.0)(x), x * 2.0)
  # A device-varying value cannot leave shard_map as a replicated output.
  with pytest.raises(ValueError):
    _replicated_out(lambda a: _compat.pcast_to_varying(a, ("x",)))(x)


def test_pcast_to_varying_keeps_the_values():
  x = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
  f = jax.shard_map(lambda t: jax.tree.map(lambda v: v[None], _compat.pcast_to_varying(t, ("x",))),
                    mesh=MESH, in_specs=P(), out_specs=P("x"), check_vma=True)
  out = jax.jit(f)(x)
  for k, v in x.items():
    np.testing.assert_array_equal(out[k], np.broadcast_to(v, (D, *v.shape)))


def test_enable_x64_computes_in_float64():
  with _compat.enable_x64(True):
    assert jnp.ones(2, jnp.float64).dtype == jnp.float64
  assert jnp.zeros(2).dtype == jnp.float32


def test_nnx_merge_copy_gives_fresh_variables():
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  merged = _compat.nnx_merge_copy(graphdef, params)
  merged.kernel[...] = merged.kernel[...] + 1.0
  np.testing.assert_array_equal(model.kernel[...], params["kernel"][...])
  assert not np.array_equal(model.kernel[...], merged.kernel[...])


def test_has_reduced_specs_means_gradients_stay_unreduced():
  if not _compat.has_reduced_specs():
    pytest.skip("this jax has no reduced / unreduced shardings")
  mesh = jax.make_mesh((D,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  w = jax.device_put(jnp.arange(1.0, 3.0), NamedSharding(mesh, P(reduced={"x"})))
  data = jnp.arange(2.0 * D).reshape(D, 2)
  x = jax.device_put(data, NamedSharding(mesh, P("x")))
  grad = jax.jit(jax.grad(lambda w, x: (x @ w).sum()))(w, x)
  assert "x" in jax.typeof(grad).sharding.spec.unreduced
  summed = jax.jit(lambda g: jax.sharding.reshard(g, NamedSharding(mesh, P())))(grad)
  np.testing.assert_allclose(summed, data.sum(0))


def test_has_reduced_specs_ignores_the_callers_context():
  expected = _compat.has_reduced_specs()
  mesh = jax.make_mesh((D,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  _compat.has_reduced_specs.cache_clear()
  with jax.set_mesh(mesh):
    assert _compat.has_reduced_specs() == expected
  _compat.has_reduced_specs.cache_clear()
  seen = []
  jax.jit(lambda x: seen.append(_compat.has_reduced_specs()) or x)(1.0)
  assert seen == [expected]


def test_deprecation_warnings_from_jaxaccum_fail_the_suite():
  # pyproject's filterwarnings turns them into errors for every jaxaccum module.
  with pytest.raises(DeprecationWarning):
    warnings.warn_explicit("old API", DeprecationWarning, "_loop.py", 1,
                           module="jaxaccum._core.loop")
