"""``jaxaccum.plan_microbatches`` / ``plan_step``: compiled memory estimates.

Every estimate is ``argument + output + temp - alias`` of a compiled (never
run) step. The reference table compiles each divisor of the batch size once
on its own; the planner must agree with it, pick the smallest count within
the budget and compile only about ``log2`` of the candidates.
"""

import functools
import math

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxaccum
from _models import mlp_batch, mlp_init, mlp_loss, standard_promotion

B = 32
DIVISORS = [1, 2, 4, 8, 16, 32]
BIG = 2**40  # a budget everything fits


@functools.cache
def _problem():
  # Activations (B x 256 floats) outweigh the parameters, as in training.
  return mlp_init(jax.random.key(0), din=4, hidden=256), mlp_batch(jax.random.key(1), B)


@functools.cache
def _table():
  """``{N: estimate}``, each divisor compiled on its own."""
  params, batch = _problem()
  table = {}
  for n in DIVISORS:
    plan = jaxaccum.plan_microbatches(mlp_loss, params, batch, memory_budget=BIG,
                                      candidates=[n])
    assert list(plan.estimates) == [n]
    table[n] = plan.estimates[n]
  return table


def _plan(budget, **kwargs):
  params, batch = _problem()
  return jaxaccum.plan_microbatches(mlp_loss, params, batch, memory_budget=budget, **kwargs)


def test_estimates_decrease_with_the_number_of_microbatches():
  table = _table()
  values = [table[n] for n in DIVISORS]
  assert all(a > b for a, b in zip(values, values[1:])), table
  # Activations of 32 rows against those of one: a large saving.
  assert table[1] > 4 * table[32], table


def test_estimate_is_the_memory_analysis_formula():
  params, batch = _problem()
  compiled = jax.jit(jaxaccum.value_and_grad(mlp_loss, num_microbatches=8)).lower(
      params, batch).compile()
  m = compiled.memory_analysis()
  expected = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
              - m.alias_size_in_bytes)
  assert _table()[8] == expected


def test_budget_between_two_estimates_picks_the_larger_count():
  table = _table()
  small_n, large_n = 2, 4
  budget = (table[small_n] + table[large_n]) // 2
  plan = _plan(budget)
  assert plan.num_microbatches == large_n
  assert plan.microbatch_size == B // large_n
  assert plan.memory_budget == budget
  # The same estimates as the reference table, for the counts compiled.
  assert plan.estimates == {n: table[n] for n in plan.estimates}
  assert list(plan.estimates) == sorted(plan.estimates)
  # Bisection: at most ceil(log2(6 + 1)) = 3 of the 6 divisors compiled.
  assert len(plan.estimates) <= math.ceil(math.log2(len(DIVISORS) + 1))


def test_budget_equal_to_an_estimate_fits():
  table = _table()
  assert _plan(table[8], candidates=[1, 4, 8, 32]).num_microbatches == 8


def test_generous_budget_picks_one_microbatch():
  plan = _plan(float(BIG), candidates=[2, 1])
  assert (plan.num_microbatches, plan.microbatch_size) == (1, B)
  assert plan.memory_budget == BIG
  assert plan._fields == ("num_microbatches", "microbatch_size", "estimates",
                          "memory_budget")
  assert isinstance(plan.num_microbatches, int) and isinstance(plan.memory_budget, int)
  assert plan.estimates == {1: _table()[1], 2: _table()[2]}
  assert all(isinstance(v, int) for v in plan.estimates.values())


def test_too_small_a_budget_names_the_smallest_estimate_and_the_budget():
  table = _table()
  budget = table[32] - 1
  with pytest.raises(ValueError, match=rf"memory_budget={budget} bytes.*smallest "
                     rf"estimate is {table[32]} bytes, at num_microbatches=32"):
    # Bisection tries the largest count first here, and stops.
    _plan(budget, candidates=[16, 32])


def test_shape_dtype_structs_plan_like_arrays():
  params, batch = _problem()
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, batch))
  plan = jaxaccum.plan_microbatches(mlp_loss, *specs, memory_budget=BIG, candidates=[8])
  assert plan.estimates == {8: _table()[8]}


def test_no_budget_on_a_backend_without_a_memory_limit():
  if "bytes_limit" in (jax.devices()[0].memory_stats() or {}):
    pytest.skip("this backend reports a memory limit")
  with pytest.raises(ValueError, match="reports no memory limit.*pass memory_budget="):
    _plan(None)


def test_default_budget_is_the_device_bytes_limit(monkeypatch):
  class Device:
    def memory_stats(self):
      return {"bytes_limit": 123_456_789, "bytes_in_use": 0}

  monkeypatch.setattr(jaxaccum._tools.planner.jax, "devices", lambda: [Device()])
  plan = _plan(None, candidates=[4])
  assert plan.memory_budget == 123_456_789
  assert plan.num_microbatches == 4


@pytest.mark.parametrize("budget, error", [(0, ValueError), (-5, ValueError),
                                           (float("inf"), ValueError),
                                           ("1GB", TypeError), (True, TypeError)])
def test_invalid_budget(budget, error):
  with pytest.raises(error, match="memory_budget must be a positive number"):
    _plan(budget)


@pytest.mark.parametrize("candidates", [[], [3], [0, 2], [2.0]])
def test_invalid_candidates_are_named(candidates):
  with pytest.raises(ValueError, match=r"positive divisors of 32.*candidates="):
    _plan(BIG, candidates=candidates)


@pytest.mark.parametrize("name", ["num_microbatches", "microbatch_size"])
def test_planned_options_are_refused(name):
  with pytest.raises(ValueError, match=f"chooses {name}.*{name}=4"):
    _plan(BIG, **{name: 4})


def test_invalid_options_fail_before_compiling():
  with pytest.raises(ValueError, match="reduction="):
    _plan(BIG, reduction="max")
  with pytest.raises(ValueError, match=r"batch_argnums=5 names a positional argument "
                     "but 2 were given"):
    _plan(BIG, batch_argnums=5)


def test_plan_under_data_axis_counts_rows_per_device():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  params, (x, y) = _problem()
  batch = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  plan = functools.partial(jaxaccum.plan_microbatches, mlp_loss, params, batch,
                           data_axis="data", mesh=mesh)
  # The candidates are the divisors of the 4 rows each device holds: 1, 2, 4.
  with pytest.raises(ValueError, match=r"estimates: \{2: \d+, 4: \d+\}"):
    plan(memory_budget=1)
  with pytest.raises(ValueError, match="positive divisors of 4"):
    plan(memory_budget=BIG, candidates=[8])
  chosen = plan(memory_budget=BIG, candidates=[2])
  assert (chosen.num_microbatches, chosen.microbatch_size) == (2, B // 2)


# --- plan_step: the whole training step, optimizer state included. ---


def _make_step(tx, donate, calls):
  def make_step(n):
    calls.append(n)

    def step(params, opt_state, batch):
      loss, grads = jaxaccum.value_and_grad(mlp_loss, num_microbatches=n)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)) if donate else step

  return make_step


def _step_plan(donate, calls, **kwargs):
  params, batch = _problem()
  tx = standard_promotion(optax.adam(1e-3))
  return jaxaccum.plan_step(_make_step(tx, donate, calls), params, tx.init(params), batch,
                            batch_size=B, **kwargs)


@functools.cache
def _step_estimate(donate, n):
  return _step_plan(donate, [], memory_budget=BIG, candidates=[n]).estimates[n]


def test_plan_step_counts_optimizer_state_and_donation():
  params, _ = _problem()
  tx = standard_promotion(optax.adam(1e-3))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(tx.init(params)))
  plain, donated = _step_estimate(False, 4), _step_estimate(True, 4)
  # Adam's two moments are an argument and an output of the step.
  assert plain >= _table()[4] + state_bytes
  # Donated parameters and optimizer state are counted once.
  assert donated < plain


def test_plan_step_bisects_and_calls_make_step_per_compiled_count():
  calls = []
  budget = _step_estimate(False, 4)
  plan = _step_plan(False, calls, memory_budget=budget, candidates=[8, 2, 4])
  assert (plan.num_microbatches, plan.microbatch_size) == (4, B // 4)
  # Bisection over [2, 4, 8]: 4 fits, then 2 does not; 8 is never compiled.
  assert calls == [4, 2]
  assert list(plan.estimates) == [2, 4] and plan.estimates[4] == budget


@pytest.mark.parametrize("batch_size, error", [(0, ValueError), (2.5, TypeError),
                                               (None, TypeError)])
def test_plan_step_invalid_batch_size(batch_size, error):
  with pytest.raises(error, match="batch_size must be a positive int"):
    jaxaccum.plan_step(lambda n: (lambda x: jnp.sum(x)), jnp.ones(4),
                       batch_size=batch_size, memory_budget=BIG)


def test_empty_batch_is_a_clear_error():
  params, batch = mlp_init(jax.random.key(0)), mlp_batch(jax.random.key(1), 8)
  empty = jax.tree.map(lambda a: a[:0], batch)
  with pytest.raises(ValueError, match="leading size 0"):
    jaxaccum.plan_microbatches(mlp_loss, params, empty, memory_budget=BIG)
