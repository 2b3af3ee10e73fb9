"""One gradient reduction per accumulation cycle, on 8 simulated CPU devices.

For ``axis_name`` under ``jax.pmap`` and ``jax.shard_map`` and for
``data_axis`` under plain ``jax.jit``: the result equals
``jax.value_and_grad`` on the whole (global) batch, and the compiled step has
no collective inside the micro-batch loop, at least one all-reduce after it,
and nothing that moves batch rows between devices. For
``multi_steps(axis_name=...)``: the parameters equal plain optax on the
full batch over several cycles, and the only all-reduce sits in the branch
that ends a cycle.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxaccum
from jaxaccum import _compat
from _models import (assert_rel_close, mlp_apply, mlp_batch, mlp_init, mlp_loss,
                     standard_promotion)

D = 8  # devices
N = 4  # micro-batches per device
B = 64  # global batch: 8 rows per device, 2 per micro-batch
MESH = jax.make_mesh((D,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
NONE = jaxaccum.CollectivesByKind()


def masked_loss(params, batch):
  """Squared error averaged over the rows with ``mask == 1`` only, and its aux.

  A micro-batch with no unmasked row gives ``0 / 0 = NaN``.
  """
  x, y, mask = batch
  err = jnp.sum(jnp.square(mlp_apply(params, x) - y), axis=-1)
  return jnp.sum(err * mask) / jnp.sum(mask), jnp.sum(err * mask) / jnp.sum(mask)


def mean_loss(params, batch):
  x, y, _ = batch
  err = jnp.sum(jnp.square(mlp_apply(params, x) - y), axis=-1)
  return jnp.mean(err), jnp.mean(jnp.abs(mlp_apply(params, x) - y))


def num_rows(batch):
  return jnp.sum(batch[2])


def _problem():
  params = mlp_init(jax.random.key(0))
  x, y = mlp_batch(jax.random.key(1), B)
  # Devices hold different numbers of unmasked rows (device 0: none at all,
  # so its micro-batches have weight zero and a NaN loss): a per-device mean
  # of weighted means would differ from the global token mean.
  per_device = np.array([0, 1, 2, 3, 4, 5, 6, 8])
  mask = (np.arange(B // D)[None, :] < per_device[:, None]).reshape(B).astype(np.float32)
  return params, (x, y, jnp.asarray(mask))


# mode -> (loss, options, how the full-batch reference is scaled)
MODES = {
    "mean": (mean_loss, {}, 1.0),
    "sum": (mean_loss, {"reduction": "sum"}, float(N * D)),
    "weighted": (masked_loss, {"weight_fn": num_rows}, 1.0),
}


def _reference(mode, params, batch):
  loss, _, scale = MODES[mode]
  (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
  return (value * scale, aux), jax.tree.map(lambda g: g * scale, grads)


def _accumulated(mode, **options):
  loss, mode_options, _ = MODES[mode]
  return jaxaccum.value_and_grad(loss, num_microbatches=N, has_aux=True,
                                 **mode_options, **options)


def _pmap_step(mode):
  return jax.pmap(_accumulated(mode, axis_name="data"), axis_name="data", in_axes=(None, 0))


def _shard_map_step(mode):
  # The user's parameters come in invariant (P()): the same on every device.
  return jax.jit(jax.shard_map(_accumulated(mode, axis_name="data"), mesh=MESH,
                               in_specs=(P(), P("data")), out_specs=P()))


def _data_axis_step(mode):
  return jax.jit(_accumulated(mode, data_axis="data", mesh=MESH))


def _per_device(batch):
  return jax.tree.map(lambda x: x.reshape(D, B // D, *x.shape[1:]), batch)


def _sharded(tree, spec):
  return jax.device_put(tree, NamedSharding(MESH, spec))


def _run(kind, mode, params, batch):
  """The step of ``kind`` and the arguments it is compiled and run with."""
  if kind == "pmap":
    return _pmap_step(mode), (params, _per_device(batch))
  step = _shard_map_step(mode) if kind == "shard_map" else _data_axis_step(mode)
  return step, (_sharded(params, P()), _sharded(batch, P("data")))


def assert_one_reduction_after_the_loop(counts):
  assert counts.inside_loops == NONE, counts
  assert counts.outside_loops.all_reduce >= 1, counts
  assert counts.total.moving_data == 0, counts


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", ["pmap", "shard_map", "data_axis"])
def test_equals_the_full_batch_with_one_reduction_after_the_loop(kind, mode):
  params, batch = _problem()
  step, args = _run(kind, mode, params, batch)
  out = step(*args)
  if kind == "pmap":
    # Every device holds the same reduced result.
    for leaf in jax.tree.leaves(out):
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    out = jax.tree.map(lambda x: x[0], out)
  (value, aux), grads = out
  (ref_value, ref_aux), ref_grads = _reference(mode, params, batch)
  assert_rel_close(grads, ref_grads)
  assert_rel_close(value, ref_value)
  assert_rel_close(aux, ref_aux)
  assert_one_reduction_after_the_loop(jaxaccum.count_collectives(step, *args))


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_data_axis_with_the_ambient_mesh(axis_type):
  mesh = jax.make_mesh((D,), ("data",),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  params, batch = _problem()
  (ref_value, _), ref_grads = _reference("weighted", params, batch)
  step = jax.jit(_accumulated("weighted", data_axis="data"))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    (value, _), grads = step(params, batch)
    counts = jaxaccum.count_collectives(step, params, batch)
  assert_rel_close(grads, ref_grads)
  assert_rel_close(value, ref_value)
  assert_one_reduction_after_the_loop(counts)


def test_plain_jit_split_of_a_sharded_batch_moves_no_rows():
  # Without data_axis GSPMD reduces inside the loop, but the strided split
  # itself never gathers or permutes the batch.
  params, batch = _problem()
  step = jax.jit(_accumulated("mean"))
  args = (_sharded(params, P()), _sharded(batch, P("data")))
  counts = jaxaccum.count_collectives(step, *args)
  assert counts.total.moving_data == 0, counts
  (_, _), grads = step(*args)
  assert_rel_close(grads, _reference("mean", params, batch)[1])


# Across-step accumulation: K calls per cycle, each on B rows split over the
# devices; the reference is optax on the K * B rows of the cycle.
K = 3
CYCLES = 2


def _cycle_batches():
  return [mlp_batch(jax.random.key(10 + i), B) for i in range(K * CYCLES)]


def _inner():
  return standard_promotion(optax.adam(1e-2))


def _reference_params(params, batches):
  opt = _inner()
  state = opt.init(params)
  for c in range(CYCLES):
    full = jax.tree.map(lambda *xs: jnp.concatenate(xs), *batches[c * K:(c + 1) * K])
    updates, state = opt.update(jax.grad(mlp_loss)(params, full), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _train_step(opt, params, state, batch):
  grads = jax.grad(mlp_loss)(params, batch)
  updates, state = opt.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def assert_reduction_only_when_the_cycle_ends(step, *args):
  counts = jaxaccum.count_collectives(step, *args)
  assert counts.inside_loops == NONE, counts
  assert counts.outside_loops.all_reduce >= 1, counts
  # Every all-reduce runs only in a branch of the conditional ...
  assert counts.in_conditionals == counts.outside_loops, counts
  # ... and that branch is the one that ends the cycle (lax.cond's true
  # branch is branch 1).
  text = step.lower(*args).compile().as_text()
  reductions = re.findall(r".* all-reduce\(.*", text)
  assert reductions
  for line in reductions:
    assert "branch_1_fun/jaxaccum/multi_steps_update" in line, line


def test_multi_steps_under_pmap():
  params = mlp_init(jax.random.key(0))
  batches = _cycle_batches()
  opt = jaxaccum.multi_steps(_inner(), K, axis_name="data")
  step = jax.pmap(functools.partial(_train_step, opt), axis_name="data")
  # pmap: parameters and the whole state replicated, one copy per device.
  replicate = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (D, *x.shape)), tree)
  p, state = replicate(params), replicate(opt.init(params))
  for i, batch in enumerate(batches):
    p, state = step(p, state, _per_device(batch))
    assert bool(jnp.all(jaxaccum.has_updated(state))) == ((i + 1) % K == 0)
  for leaf in jax.tree.leaves(p):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  assert_rel_close(jax.tree.map(lambda x: x[0], p), _reference_params(params, batches))
  assert_reduction_only_when_the_cycle_ends(step, p, state, _per_device(batches[0]))


def _local_state_spec(axis):
  """shard_map specs of a MultiStepsState: the accumulators are per device."""
  return jaxaccum.MultiStepsState(
      mini_step=P(), gradient_step=P(), inner_opt_state=P(), acc_grads=P(axis),
      acc_weight=P(axis), skip_state=P(), updated=P())


def test_multi_steps_under_shard_map():
  params = mlp_init(jax.random.key(0))
  batches = _cycle_batches()
  opt = jaxaccum.multi_steps(_inner(), K, axis_name="data")
  spec = _local_state_spec("data")

  def step(params, state, batch):
    # Gradients of device-varying parameters stay local (no psum per call);
    # the accumulators carry a leading device axis of local size 1.
    grads = jax.grad(mlp_loss)(_compat.pcast_to_varying(params, ("data",)), batch)
    local = lambda t: jax.tree.map(lambda x: x[0], t)
    state = state._replace(acc_grads=local(state.acc_grads), acc_weight=local(state.acc_weight))
    updates, state = opt.update(grads, state, params)
    stacked = lambda t: jax.tree.map(lambda x: x[None], t)
    state = state._replace(acc_grads=stacked(state.acc_grads),
                           acc_weight=stacked(state.acc_weight))
    return optax.apply_updates(params, updates), state

  sharded_step = jax.jit(jax.shard_map(step, mesh=MESH, in_specs=(P(), spec, P("data")),
                                       out_specs=(P(), spec)))
  state = opt.init(params)
  per_device = lambda t: jax.tree.map(lambda x: jnp.zeros((D, *x.shape), x.dtype), t)
  state = state._replace(acc_grads=per_device(state.acc_grads),
                         acc_weight=per_device(state.acc_weight))
  p = params
  for batch in batches:
    p, state = sharded_step(p, state, _sharded(batch, P("data")))
  assert_rel_close(p, _reference_params(params, batches))
  assert_reduction_only_when_the_cycle_ends(
      sharded_step, p, state, _sharded(batches[0], P("data")))


def test_multi_steps_weights_are_summed_across_devices():
  # Per-device weights differ: the cycle's gradient is the weighted mean over
  # every (device, call) pair, not a mean of per-device weighted means.
  opt = jaxaccum.multi_steps(optax.sgd(1.0), 2, axis_name="data")

  def step(params, state, grads, weight):
    return opt.update(grads, state, params, weight=weight)

  grads = jax.random.normal(jax.random.key(3), (2, D, 3))
  weights = jnp.arange(2 * D, dtype=jnp.float32).reshape(2, D) % 5
  pstep = jax.pmap(step, axis_name="data", in_axes=(None, 0, 0, 0))
  state = jax.tree.map(lambda x: jnp.broadcast_to(x, (D, *x.shape)), opt.init(jnp.zeros(3)))
  for call in range(2):
    updates, state = pstep(jnp.zeros(3), state, grads[call], weights[call])
  expected = -jnp.sum(weights[..., None] * grads, axis=(0, 1)) / jnp.sum(weights)
  for d in range(D):
    np.testing.assert_allclose(updates[d], expected, rtol=1e-5)


def test_multi_steps_skip_decision_is_shared_by_all_devices():
  # A NaN on one device only: every device skips that call, so all of them
  # end the cycle on the same later call (a device that ended it alone would
  # wait in the all-reduce for the others forever).
  opt = jaxaccum.multi_steps(optax.sgd(1.0), 2, axis_name="data",
                             should_skip_update_fn=optax.skip_not_finite)

  def step(params, state, grads):
    return opt.update(grads, state, params)

  grads = jax.random.normal(jax.random.key(4), (3, D, 3))
  poisoned = grads.at[1, 3, 0].set(jnp.nan)
  pstep = jax.pmap(step, axis_name="data", in_axes=(None, 0, 0))
  state = jax.tree.map(lambda x: jnp.broadcast_to(x, (D, *x.shape)), opt.init(jnp.zeros(3)))
  updated = []
  for call in range(3):
    updates, state = pstep(jnp.zeros(3), state, poisoned[call])
    updated.append(np.asarray(jaxaccum.has_updated(state)))
  np.testing.assert_array_equal(np.stack(updated), [[False] * D, [False] * D, [True] * D])
  expected = -(jnp.sum(grads[0], 0) + jnp.sum(grads[2], 0)) / (2 * D)
  for d in range(D):
    np.testing.assert_allclose(updates[d], expected, rtol=1e-5)
