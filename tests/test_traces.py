"""The user's loss is traced once per compilation, on every path.

A Python counter in the loss counts its traces while ``jax.jit(...).lower``
builds the program. A hand-written ``lax.scan`` over ``jax.value_and_grad``
traces it once; so must every accumulated function. With ``data_axis`` on
Explicit axes, a loss that cannot take reduced parameters is traced once more
(the strategy tried first), never more.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxaccum

B = 16


class Counted:
  """A loss of ``(w, (x, y))`` that counts its traces."""

  def __init__(self, aux=False):
    self.traces = 0
    self.aux = aux

  def __call__(self, w, batch):
    self.traces += 1
    x, y = batch
    pred = jnp.tanh(x @ w["a"]) @ w["b"]
    loss = jnp.mean((pred - y) ** 2)
    return (loss, {"pred": pred, "err": loss}) if self.aux else loss


def _problem():
  w = {"a": jnp.ones((4, 8)) / 4, "b": jnp.ones((8,)) / 8}
  x = jax.random.normal(jax.random.key(0), (B, 4))
  return w, (x, jnp.sin(x[:, 0]))


PATHS = {
    "defaults": {},
    "microbatch_size": dict(num_microbatches=None, microbatch_size=4),
    "aux_mean": dict(has_aux=True),
    "aux_sum": dict(has_aux=True, aux_reduction="sum"),
    "aux_stack": dict(has_aux=True, aux_reduction="stack"),
    "aux_concat": dict(has_aux=True, aux_reduction={"pred": "concat", "err": "stack"}),
    "aux_tree": dict(has_aux=True, aux_reduction={"pred": "concat", "err": "mean"}),
    "weight_fn": dict(weight_fn=lambda b: jnp.sum(b[1] > 0)),
    "with_stats": dict(with_stats=True),
    "skip_nonfinite": dict(skip_nonfinite=True),
    "sum": dict(reduction="sum"),
    "real_microbatches": dict(num_real_microbatches=jnp.int32(2)),
    "one_microbatch": dict(num_microbatches=1),
}


@pytest.mark.parametrize("name", sorted(PATHS))
def test_traced_once(name):
  options = dict(num_microbatches=4) | PATHS[name]
  loss = Counted(aux=options.get("has_aux", False))
  w, batch = _problem()
  jax.jit(jaxaccum.value_and_grad(loss, **options)).lower(w, batch)
  assert loss.traces == 1


def test_state_argnums_traced_once():
  traces = []

  def loss(w, state, batch):
    traces.append(1)
    x, y = batch
    return jnp.mean((x @ w["a"] @ w["b"] - y) ** 2), state + 1

  w, batch = _problem()
  for policy in ("sequential", "mean"):
    traces.clear()
    grad_fn = jaxaccum.value_and_grad(loss, num_microbatches=4, batch_argnums=2,
                                      state_argnums=1, state_policy=policy)
    jax.jit(grad_fn).lower(w, jnp.float32(0), batch)
    assert len(traces) == 1, policy


def test_rng_argnums_traced_once():
  traces = []

  def loss(w, batch, key):
    traces.append(1)
    x, y = batch
    keep = jax.random.bernoulli(key, 0.5, x.shape)
    return jnp.mean((jnp.where(keep, x, 0) @ w["a"] @ w["b"] - y) ** 2)

  w, batch = _problem()
  jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=4, rng_argnums=2)).lower(
      w, batch, jax.random.key(0))
  assert len(traces) == 1


def test_outside_jit_traced_once_per_shape():
  loss = Counted()
  w, batch = _problem()
  grad_fn = jaxaccum.value_and_grad(loss, num_microbatches=4)
  grad_fn(w, batch)
  grad_fn(w, batch)
  assert loss.traces == 1


def test_axis_name_traced_once():
  loss = Counted()
  w, batch = _problem()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  grad_fn = jaxaccum.value_and_grad(loss, num_microbatches=2, axis_name="data")
  step = jax.shard_map(grad_fn, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
  jax.jit(step).lower(w, batch)
  assert loss.traces == 1


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_data_axis_traced_once(axis_type):
  loss = Counted()
  w, batch = _problem()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  w = jax.device_put(w, NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    grad_fn = jaxaccum.value_and_grad(loss, num_microbatches=2, data_axis="data")
    jax.jit(grad_fn).lower(w, batch)
  assert loss.traces == 1


def test_data_axis_fallback_traces_at_most_twice():
  """A bias add between a reduced parameter and the sharded batch is
  rejected on Explicit axes; the shard_map strategy then traces it again."""
  traces = []

  def loss(w, batch):
    traces.append(1)
    x, y = batch
    return jnp.mean((x @ w["a"] @ w["b"] + w["b"][0] - y) ** 2)

  w, batch = _problem()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  w = jax.device_put(w, NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    grad_fn = jaxaccum.value_and_grad(loss, num_microbatches=2, data_axis="data",
                                      skip_nonfinite=True)
    jax.jit(grad_fn).lower(w, batch)
  assert len(traces) == 1  # skip_nonfinite goes straight to shard_map
  traces.clear()
  with jax.set_mesh(mesh):
    grad_fn = jaxaccum.value_and_grad(loss, num_microbatches=2, data_axis="data")
    jax.jit(grad_fn).lower(w, batch)
  assert 1 <= len(traces) <= 2
