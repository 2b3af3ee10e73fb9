"""A ``multi_steps`` state saved mid-cycle with orbax resumes bit-exactly."""

import jax
import optax
import orbax.checkpoint as ocp
import pytest

import jaxaccum
from _models import assert_trees_equal, mlp_batch, mlp_init, mlp_loss, standard_promotion

K = 3


def _optimizer(skip):
  schedule = optax.linear_schedule(0.05, 0.01, transition_steps=4)
  inner = standard_promotion(optax.chain(
      optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1)))
  return jaxaccum.multi_steps(
      inner, K, should_skip_update_fn=optax.skip_not_finite if skip else None)


def _batches(count):
  return [mlp_batch(jax.random.key(50 + i), 8) for i in range(count)]


@pytest.mark.parametrize("skip", [False, True])
def test_resume_mid_cycle_is_bitwise_identical(tmp_path, skip):
  opt = _optimizer(skip)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(lambda p: 10.0 * mlp_loss(p, batch))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params0 = mlp_init(jax.random.key(0))
  batches = _batches(3 * K)
  stop = K + 1  # one full cycle, then one call into the second

  params, state = params0, opt.init(params0)
  for batch in batches:
    params, state = step(params, state, batch)
  uninterrupted = (params, state)

  params, state = params0, opt.init(params0)
  for batch in batches[:stop]:
    params, state = step(params, state, batch)
  assert int(state.mini_step) == 1 and int(state.gradient_step) == 1
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, {"params": params, "opt_state": state})
  del params, state

  fresh_params = mlp_init(jax.random.key(1))  # other values, same structure
  target = jax.eval_shape(lambda: {"params": fresh_params,
                                   "opt_state": opt.init(fresh_params)})
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, target)
  params, state = restored["params"], restored["opt_state"]
  assert isinstance(state, jaxaccum.MultiStepsState)
  assert int(state.mini_step) == 1
  for batch in batches[stop:]:
    params, state = step(params, state, batch)

  assert_trees_equal((params, state), uninterrupted)
  assert int(state.gradient_step) == 3


def test_sharded_data_axis_state_resumes_mid_cycle(tmp_path):
  # multi_steps(data_axis=) with FSDP parameters on an Explicit mesh: the
  # accumulator of per-device partial sums, saved mid-cycle and restored
  # onto the same shardings, resumes bit-exactly.
  from jax.sharding import NamedSharding, PartitionSpec as P

  import test_multi_steps_sharded as sharded

  ms, step, _, params0, calls, mesh = sharded._setup("FSDP", "Explicit")
  with jax.set_mesh(mesh):
    params, state = params0, ms.init(params0)
    for call in calls:
      params, state, _ = step(params, state, call)
    uninterrupted = (params, state)

    params, state = params0, ms.init(params0)
    for call in calls[:sharded.K + 1]:
      params, state, _ = step(params, state, call)
    assert int(state.mini_step) == 1 and int(state.gradient_step) == 1
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, {"params": params, "opt_state": state})
    del params, state

    target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"params": params0, "opt_state": ms.init(params0)})
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(path, target)
    params, state = restored["params"], restored["opt_state"]
    acc = state.acc_grads["w1"]
    assert acc.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, None)), acc.ndim)
    assert params["w1"].sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)
    for call in calls[sharded.K + 1:]:
      params, state, _ = step(params, state, call)
  assert_trees_equal((params, state), uninterrupted)
