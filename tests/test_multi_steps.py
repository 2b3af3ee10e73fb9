"""``jaxaccum.multi_steps``: k micro-step gradients equal one full-batch step.

References are the inner optimizer fed the full-batch gradient, a Python loop,
and ``optax.MultiSteps``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jaxaccum
from jaxaccum import _compat
from _models import (assert_rel_close, assert_trees_equal, mlp_batch, mlp_init,
                     mlp_loss, rel_error, standard_promotion)

K = 4
CYCLES = 3


def _loss(params, batch):
  # Scaled so that the global-norm clipping of the inner optimizer is active.
  return 20.0 * mlp_loss(params, batch)


def _inner():
  schedule = optax.warmup_cosine_decay_schedule(0.02, 0.05, warmup_steps=1, decay_steps=6)
  return standard_promotion(optax.chain(
      optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1)))


def _optax_multisteps(inner, every_k_schedule, **kwargs):
  """``optax.MultiSteps``, traced under standard promotion (it mixes int32 and
  float32 where strict promotion refuses)."""
  return standard_promotion(optax.MultiSteps(inner, every_k_schedule, **kwargs)
                            .gradient_transformation())


def _micro(batch, i, n):
  return jax.tree.map(lambda a: a[i::n], batch)


def _full_batches():
  return [mlp_batch(jax.random.key(100 + c), 16) for c in range(CYCLES)]


def _zero(tree):
  return all(not np.any(np.asarray(x)) for x in jax.tree.leaves(tree))


def _train_step(tx):
  """A jitted step ``(params, state, batch) -> (params, state, grads, updates)``."""
  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(_loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, grads, updates

  return step


def _reference_run(inner, params, batches):
  """The inner optimizer fed one full-batch gradient per cycle."""
  step = _train_step(inner)
  state = inner.init(params)
  out = []
  for batch in batches:
    params, state, grads, _ = step(params, state, batch)
    out.append((params, grads))
  return out


def test_k_microsteps_equal_one_full_batch_step_of_the_inner_optimizer():
  inner = _inner()
  opt = jaxaccum.multi_steps(inner, K)
  params = mlp_init(jax.random.key(0))
  batches = _full_batches()
  reference = _reference_run(inner, params, batches)
  # The premise: clipping is active.
  assert float(optax.tree.norm(reference[0][1])) > 1.0

  step = _train_step(opt)
  state = opt.init(params)
  for cycle, batch in enumerate(batches):
    for j in range(K):
      before = params
      params, state, _, updates = step(params, state, _micro(batch, j, K))
      if j < K - 1:
        assert _zero(updates), (cycle, j)
        assert_trees_equal(params, before)
        assert not jaxaccum.has_updated(state)
      else:
        assert not _zero(updates)
        assert jaxaccum.has_updated(state)
    assert int(state.gradient_step) == cycle + 1
    assert_rel_close(params, reference[cycle][0], 1e-5)


def _counting(tx, calls):
  """``tx`` whose update reports every time it runs (not when traced)."""
  def update(updates, state, params=None, **extra):
    jax.debug.callback(lambda: calls.append(1))
    return tx.update(updates, state, params, **extra)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def test_inner_update_runs_once_per_cycle():
  calls = []
  opt = jaxaccum.multi_steps(_counting(_inner(), calls), K)
  params = mlp_init(jax.random.key(0))
  update = jax.jit(opt.update)
  state = opt.init(params)
  grads = jax.grad(_loss)(params, mlp_batch(jax.random.key(1), 8))
  for call in range(CYCLES * K):
    _, state = update(grads, state, params)
    jax.effects_barrier()
    assert len(calls) == (call + 1) // K, call
  assert len(calls) == CYCLES


def _random_grads(count, shape=(3,), seed=0):
  keys = jax.random.split(jax.random.key(seed), count)
  return [{"w": jax.random.normal(k, shape), "b": jax.random.normal(k, (2,))} for k in keys]


def _params(shape=(3,)):
  return {"w": jnp.ones(shape), "b": jnp.zeros(2)}


@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_parity_with_optax_multisteps_sgd_momentum(use_grad_mean):
  inner = optax.sgd(0.1, momentum=0.9)
  ours = jaxaccum.multi_steps(inner, 3, use_grad_mean=use_grad_mean)
  theirs = _optax_multisteps(inner, 3, use_grad_mean=use_grad_mean)
  params = _params()
  s1, s2 = ours.init(params), theirs.init(params)
  up1, up2 = jax.jit(ours.update), jax.jit(theirs.update)
  p1 = p2 = params
  for g in _random_grads(10):
    u1, s1 = up1(g, s1, p1)
    u2, s2 = up2(g, s2, p2)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(u1["b"], u2["b"], rtol=1e-6, atol=1e-7)
    assert bool(jaxaccum.has_updated(s1)) == bool(optax.MultiSteps.has_updated(None, s2))
    assert int(s1.mini_step) == int(s2.mini_step)
    assert int(s1.gradient_step) == int(s2.gradient_step)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  assert_rel_close(p1, p2, 1e-6)
  assert int(s1.gradient_step) == 3


def test_every_k_one_is_the_inner_optimizer():
  inner = optax.sgd(0.1, momentum=0.9)
  opt = jaxaccum.multi_steps(inner, 1)
  s1, s2 = opt.init(_params()), inner.init(_params())
  for g in _random_grads(3):
    u1, s1 = opt.update(g, s1)
    u2, s2 = inner.update(g, s2)
    # Compiled inside lax.cond, the inner update may round differently.
    assert_rel_close(u1, u2, 1e-6)
    assert jaxaccum.has_updated(s1)
  assert_rel_close(s1.inner_opt_state, s2, 1e-6)


def test_use_grad_mean_false_sums():
  opt = jaxaccum.multi_steps(optax.sgd(1.0), 3, use_grad_mean=False)
  grads = _random_grads(3)
  state = opt.init(_params())
  for g in grads:
    updates, state = opt.update(g, state)
  expected = jax.tree.map(lambda *g: -sum(g), *grads)
  assert_rel_close(updates, expected, 1e-6)


def test_weight_gives_the_weighted_mean():
  opt = jaxaccum.multi_steps(optax.sgd(1.0), 3)
  grads = _random_grads(3)
  weights = [1.0, 3.0, 0.5]
  state = opt.init(_params())
  update = jax.jit(opt.update)
  for g, w in zip(grads, weights):
    updates, state = update(g, state, weight=jnp.float32(w))
  expected = jax.tree.map(
      lambda *g: -sum(w * x for w, x in zip(weights, g)) / sum(weights), *grads)
  assert_rel_close(updates, expected, 1e-6)
  # ...which is not the plain mean.
  assert rel_error(updates, jax.tree.map(lambda *g: -sum(g) / 3, *grads)) > 1e-2


def test_weight_zero_call_with_nan_gradients_adds_nothing():
  opt = jaxaccum.multi_steps(optax.sgd(1.0), 3)
  grads = _random_grads(3)
  nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads[0])
  state = opt.init(_params())
  for g, w in zip([grads[0], nan, grads[1]], [2.0, 0.0, 1.0]):
    updates, state = opt.update(g, state, weight=w)
  expected = jax.tree.map(lambda a, b: -(2 * a + b) / 3, grads[0], grads[1])
  assert_rel_close(updates, expected, 1e-6)


def test_callable_every_k_schedule():
  # The first cycle has 2 calls, every later one 3.
  def schedule(step):
    return jnp.where(step < 1, 2, 3)

  inner = optax.sgd(0.1, momentum=0.9)
  ours = jaxaccum.multi_steps(inner, schedule)
  theirs = _optax_multisteps(inner, schedule)
  grads = _random_grads(8)
  s1, s2 = ours.init(_params()), theirs.init(_params())
  ref_state = inner.init(_params())
  cycle = []
  emitted = []
  for call, g in enumerate(grads):
    u1, s1 = jax.jit(ours.update)(g, s1)
    u2, s2 = theirs.update(g, s2)
    cycle.append(g)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6, atol=1e-7)
    if jaxaccum.has_updated(s1):
      emitted.append(call)
      mean = jax.tree.map(lambda *g: sum(g) / len(g), *cycle)
      ref_updates, ref_state = inner.update(mean, ref_state)
      assert_rel_close(u1, ref_updates, 1e-6)
      cycle = []
    else:
      assert _zero(u1)
  assert emitted == [1, 4, 7]


def test_skip_not_finite_call_is_as_if_it_never_happened():
  opt = jaxaccum.multi_steps(_inner(), 3, should_skip_update_fn=optax.skip_not_finite)
  params = mlp_init(jax.random.key(0))
  grads = [jax.grad(_loss)(params, mlp_batch(jax.random.key(s), 8)) for s in range(6)]
  nan = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[0])
  update = jax.jit(opt.update)

  def run(sequence):
    state, p, outs = opt.init(params), params, []
    for g in sequence:
      updates, state = update(g, state, p)
      p = optax.apply_updates(p, updates)
      outs.append((updates, bool(jaxaccum.has_updated(state))))
    return p, state, outs

  p_ref, s_ref, out_ref = run(grads)
  # NaN calls where the first cycle would end and where the second begins.
  p, s, outs = run(grads[:2] + [nan] + grads[2:3] + [nan] + grads[3:])
  assert _zero(outs[2][0]) and _zero(outs[4][0])
  assert int(s.skip_state["num_not_finite"]) == 0  # the last call was finite
  del outs[4], outs[2]
  for (u, flag), (u_ref, flag_ref) in zip(outs, out_ref, strict=True):
    assert_trees_equal(u, u_ref)
    assert flag == flag_ref
  assert_trees_equal(p, p_ref)
  assert_trees_equal(s._replace(skip_state=()), s_ref._replace(skip_state=()))


def test_has_updated():
  opt = jaxaccum.multi_steps(optax.sgd(1.0), 3)
  state = opt.init(_params())
  assert jaxaccum.has_updated(state).dtype == jnp.bool_
  assert not jaxaccum.has_updated(state)
  flags = []
  for g in _random_grads(7):
    _, state = jax.jit(opt.update)(g, state)
    flags.append(bool(jax.jit(jaxaccum.has_updated)(state)))
  assert flags == [False, False, True, False, False, True, False]


def test_training_inside_jit_and_lax_scan_equals_full_batch_steps():
  inner = _inner()
  opt = jaxaccum.multi_steps(inner, K)
  params = mlp_init(jax.random.key(0))
  batches = _full_batches()
  reference = _reference_run(inner, params, batches)
  # Calls in order: cycle c's micro-batch j is call c * K + j.
  micro = jax.tree.map(lambda *b: jnp.stack(b),
                       *[_micro(b, j, K) for b in batches for j in range(K)])

  @jax.jit
  def train(params, micro):
    def step(carry, batch):
      params, state = carry
      grads = jax.grad(_loss)(params, batch)
      updates, state = opt.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), (params, jaxaccum.has_updated(state))

    return lax.scan(step, (params, opt.init(params)), micro)

  (params, state), (trajectory, flags) = train(params, micro)
  assert np.asarray(flags).tolist() == ([False] * (K - 1) + [True]) * CYCLES
  for c in range(CYCLES):
    at = jax.tree.map(lambda p: p[c * K + K - 1], trajectory)
    assert_rel_close(at, reference[c][0], 1e-5)
  assert int(state.gradient_step) == CYCLES and int(state.mini_step) == 0


def test_extra_args_reach_the_inner_optimizer():
  def init(params):
    return optax.EmptyState()

  def update(updates, state, params=None, *, scale):
    return jax.tree.map(lambda u: u * scale, updates), state

  opt = jaxaccum.multi_steps(optax.GradientTransformationExtraArgs(init, update), 2)
  state = opt.init(_params())
  grads = _random_grads(2)
  for g in grads:
    updates, state = opt.update(g, state, scale=jnp.float32(10.0))
  assert_rel_close(updates, jax.tree.map(lambda a, b: 5 * (a + b), *grads), 1e-6)


def test_bf16_gradients_float32_accumulator():
  # 64 calls of gradients near 1.5: a bf16 running sum loses most of them.
  values = jax.random.uniform(jax.random.key(0), (64, 8), minval=1.0, maxval=2.0)
  values = values.astype(jnp.bfloat16)
  ref = np.mean(np.asarray(values, np.float64), axis=0)
  errs = {}
  for acc in (jnp.float32, jnp.bfloat16):
    opt = jaxaccum.multi_steps(optax.sgd(-1.0), 64, accumulator_dtype=acc)
    state = opt.init(jnp.zeros(8, jnp.bfloat16))
    assert state.acc_grads.dtype == acc
    update = jax.jit(opt.update)
    for g in values:
      updates, state = update(g, state)
    assert updates.dtype == jnp.bfloat16
    errs[acc] = rel_error(updates, ref)
  assert errs[jnp.float32] <= 2.0**-8
  assert errs[jnp.bfloat16] > 4 * errs[jnp.float32], errs


@pytest.mark.parametrize("k", [0, -1, np.int64(0)])
def test_invalid_every_k(k):
  with pytest.raises(ValueError, match=re.escape(f"every_k_schedule={k!r}")):
    jaxaccum.multi_steps(optax.sgd(1.0), k)


@pytest.mark.parametrize("k", [True, 2.0, np.float32(4), "4", None, jnp.ones(2, jnp.int32)])
def test_every_k_of_a_wrong_type(k):
  with pytest.raises(TypeError, match="every_k_schedule="):
    jaxaccum.multi_steps(optax.sgd(1.0), k)


def test_float64_gradients_keep_their_precision():
  with _compat.enable_x64(True):
    opt = jaxaccum.multi_steps(optax.sgd(1.0), 2)
    params = jnp.zeros([], jnp.float64)
    state = opt.init(params)
    for _ in range(2):
      updates, state = opt.update(jnp.float64(1 + 1e-12), state, params)
    assert updates.dtype == jnp.float64
    assert float(updates) == -(1 + 1e-12)


# --- optax.MultiSteps drop-in -------------------------------------------------


def test_is_a_gradient_transformation_with_the_methods_of_optax_multisteps():
  inner = optax.sgd(0.1, momentum=0.9)
  ms = jaxaccum.multi_steps(inner, 2, False, optax.skip_not_finite)  # optax's order
  assert isinstance(ms, optax.GradientTransformationExtraArgs)
  assert isinstance(ms, optax.GradientTransformation)
  assert ms.inner_opt is inner
  init, update = ms
  assert (init, update) == (ms.init, ms.update)
  tx = ms.gradient_transformation()
  assert isinstance(tx, optax.GradientTransformation)
  state = tx.init(_params())
  flags = []
  for g in _random_grads(2):
    updates, state = tx.update(g, state)
    flags.append(bool(ms.has_updated(state)))
  assert flags == [False, True]
  # use_grad_mean=False, given positionally: the sum.
  grads = _random_grads(2)
  assert_rel_close(updates, jax.tree.map(lambda a, b: -0.1 * (a + b), *grads), 1e-6)


def test_usable_in_optax_chain():
  ms = jaxaccum.multi_steps(optax.sgd(1.0), 2)
  tx = optax.chain(optax.scale(2.0), ms)
  state = tx.init(_params())
  grads = _random_grads(2)
  for g in grads:
    updates, state = jax.jit(tx.update)(g, state)
  assert_rel_close(updates, jax.tree.map(lambda a, b: -(a + b), *grads), 1e-6)
  assert ms.gradient_transformation().init(_params()) is not None
  chained = optax.chain(ms.gradient_transformation(), optax.scale(1.0))
  assert chained.init(_params())[0].mini_step == 0


def test_usable_as_flax_train_state_tx_and_nnx_optimizer():
  from flax import nnx
  from flax.training import train_state

  ms = jaxaccum.multi_steps(optax.sgd(1.0), 2)
  grads = _random_grads(2)
  state = train_state.TrainState.create(apply_fn=None, params=_params(), tx=ms)
  step = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  for g in grads:
    state = step(state, g)
  expected = jax.tree.map(lambda p, a, b: p - (a + b) / 2, _params(), *grads)
  assert_rel_close(state.params, expected, 1e-6)

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ms, wrt=nnx.Param)
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  g = jax.tree.map(jnp.ones_like, before)
  for _ in range(2):
    optimizer.update(model, g)
  after = nnx.state(model, nnx.Param)
  assert_rel_close(after, jax.tree.map(lambda p: p - 1.0, before), 1e-6)


def test_numpy_integer_every_k_schedule():
  ms = jaxaccum.multi_steps(optax.sgd(1.0), np.int64(2))
  state = ms.init(_params())
  for g in _random_grads(2):
    _, state = ms.update(g, state)
  assert ms.has_updated(state)


@pytest.mark.parametrize("inner_name", ["adam", "sgd_momentum"])
@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float16])
def test_mixed_precision_equals_the_inner_optimizer_on_the_mean(inner_name, param_dtype):
  # Inner states that follow the parameter dtype, gradients in float32. The
  # reference is the definition: the inner optimizer on each cycle's float32
  # mean gradient, its state kept in its initial dtypes as optax.MultiSteps
  # keeps it (which before optax 0.2.6 also summed in the parameter dtype).
  inner = standard_promotion({"adam": optax.adam(0.1),
                              "sgd_momentum": optax.sgd(0.1, momentum=0.9)}[inner_name])
  params = jax.tree.map(lambda p: p.astype(param_dtype), _params())
  ours = jaxaccum.multi_steps(inner, 2)
  s1, ref_state = ours.init(params), inner.init(params)
  up1, inner_update = jax.jit(ours.update), jax.jit(inner.update)
  grads = _random_grads(6)
  for i, g in enumerate(grads):
    u1, s1 = up1(g, s1, params)
    if i % 2:
      mean = jax.tree.map(lambda a, b: (a + b) / 2, grads[i - 1], g)
      ref, new_state = inner_update(mean, ref_state, params)
      ref_state = jax.tree.map(lambda n, o: n.astype(o.dtype), new_state, ref_state)
    else:
      ref = jax.tree.map(jnp.zeros_like, u1)
    assert jax.tree.map(lambda x: x.dtype, u1) == jax.tree.map(lambda x: x.dtype, ref)
    assert_rel_close(u1, ref, 1e-6)
  dtypes = lambda tree: jax.tree.leaves(jax.tree.map(lambda x: x.dtype, tree))
  assert dtypes(s1.inner_opt_state) == dtypes(ours.init(params).inner_opt_state)
  assert_rel_close(s1.inner_opt_state, ref_state, 1e-6)


def test_resume_from_a_mid_cycle_optax_multisteps_state():
  inner = optax.sgd(0.1, momentum=0.9)
  ours = jaxaccum.multi_steps(inner, 3)
  theirs = _optax_multisteps(inner, 3)
  grads = _random_grads(8)
  s2 = theirs.init(_params())
  for g in grads[:4]:  # a cycle and one call of the next
    _, s2 = theirs.update(g, s2)
  assert int(s2.mini_step) == 1
  s1 = ours.state_from_optax(s2)
  assert jax.tree.structure(s1) == jax.tree.structure(ours.init(_params()))
  dtypes = lambda tree: jax.tree.leaves(jax.tree.map(lambda x: jnp.asarray(x).dtype, tree))
  assert dtypes(s1) == dtypes(ours.init(_params()))
  for g in grads[4:]:
    u1, s1 = jax.jit(ours.update)(g, s1)
    u2, s2 = theirs.update(g, s2)
    assert_rel_close(u1, u2, 1e-6)
    assert bool(ours.has_updated(s1)) == bool(optax.MultiSteps.has_updated(None, s2))
  assert int(s1.gradient_step) == int(s2.gradient_step) == 2


# --- no silent wrong numbers ------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, -0.5])
@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_weight_it_cannot_honour_gives_nan_updates(bad, use_grad_mean):
  opt = jaxaccum.multi_steps(optax.sgd(1.0), 3, use_grad_mean=use_grad_mean)
  state = opt.init(_params())
  update = jax.jit(opt.update)
  for g, w in zip(_random_grads(3), [1.0, bad, 2.0]):
    updates, state = update(g, state, weight=jnp.float32(w))
  assert opt.has_updated(state)
  assert all(np.all(np.isnan(u)) for u in jax.tree.leaves(updates))
  # The next cycle starts clean.
  for g in _random_grads(3, seed=1):
    updates, state = update(g, state, weight=jnp.float32(1.0))
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("bad", [float("nan"), -0.5, np.float32(np.nan), np.array(-1.0),
                                 float("inf")])
def test_static_weight_it_cannot_honour_is_an_error(bad):
  # A Python or numpy weight is known when tracing: an error, not NaN updates.
  opt = jaxaccum.multi_steps(optax.sgd(1.0), 2)
  with pytest.raises(ValueError, match=r"weight=.* must be a number >= 0"):
    opt.update(_random_grads(1)[0], opt.init(_params()), weight=bad)
  with pytest.raises(ValueError, match=r"weight=.* must be a number >= 0"):
    jax.jit(lambda g, s: opt.update(g, s, weight=bad))(_random_grads(1)[0], opt.init(_params()))


def test_non_scalar_weight_is_an_error():
  opt = jaxaccum.multi_steps(optax.sgd(1.0), 2)
  with pytest.raises(ValueError, match=r"weight must be a scalar, got shape \(3,\)"):
    opt.update(_random_grads(1)[0], opt.init(_params()), weight=jnp.ones(3))


@pytest.mark.parametrize("dtype, error", [(jnp.int32, ValueError), ("foo", TypeError),
                                          (jnp.bool_, ValueError)])
def test_bad_accumulator_dtype_is_rejected_at_construction(dtype, error):
  with pytest.raises(error, match="accumulator_dtype="):
    jaxaccum.multi_steps(optax.sgd(1.0), 2, accumulator_dtype=dtype)


@pytest.mark.parametrize("options, match", [
    ({"use_grad_mean": "yes"}, "use_grad_mean='yes'"),
    ({"should_skip_update_fn": 3}, "should_skip_update_fn=3 is not callable"),
    ({"axis_name": {"a": 1}}, "axis_name="),
])
def test_bad_options_are_type_errors(options, match):
  with pytest.raises(TypeError, match=match):
    jaxaccum.multi_steps(optax.sgd(1.0), 2, **options)


def test_uncalled_optimizer_is_a_type_error():
  with pytest.raises(TypeError, match=r"optax.adam\(1e-3\), not optax.adam"):
    jaxaccum.multi_steps(optax.adam, 2)


def test_axis_name_outside_pmap_is_a_clear_error():
  opt = jaxaccum.multi_steps(optax.sgd(1.0), 2, axis_name="data")
  with pytest.raises(ValueError, match="axis_name='data' is not bound"):
    jax.jit(opt.update)(_random_grads(1)[0], opt.init(_params()))


def test_schedule_returning_a_float_is_a_type_error():
  opt = jaxaccum.multi_steps(optax.sgd(1.0), lambda step: 2.7)
  with pytest.raises(TypeError, match="every_k_schedule returned 2.7"):
    opt.update(_random_grads(1)[0], opt.init(_params()))
  opt = jaxaccum.multi_steps(optax.sgd(1.0), lambda step: jnp.where(step < 1, 2.0, 3.0))
  with pytest.raises(TypeError, match="must return an integer"):
    jax.jit(opt.update)(_random_grads(1)[0], opt.init(_params()))


@pytest.mark.parametrize("k", [0, -2])
def test_schedule_returning_a_static_value_below_one_is_an_error(k):
  opt = jaxaccum.multi_steps(optax.sgd(1.0), lambda step: k)
  with pytest.raises(ValueError, match=f"every_k_schedule returned {k}"):
    jax.jit(opt.update)(_random_grads(1)[0], opt.init(_params()))


def test_schedule_returning_a_traced_value_below_one_gives_nan_updates():
  # Two regular cycles of 2 calls, then k = 0.
  opt = jaxaccum.multi_steps(optax.sgd(1.0), lambda step: jnp.where(step < 2, 2, 0))
  state = opt.init(_params())
  update = jax.jit(opt.update)
  for call, g in enumerate(_random_grads(5)):
    updates, state = update(g, state)
    finite = all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    assert finite == (call < 4), call
  assert opt.has_updated(state)


def test_has_updated_is_false_after_a_skipped_call_that_follows_a_cycle_end():
  inner = optax.sgd(1.0)
  ours = jaxaccum.multi_steps(inner, 2, should_skip_update_fn=optax.skip_not_finite)
  theirs = _optax_multisteps(inner, 2, should_skip_update_fn=optax.skip_not_finite)
  good = _random_grads(2)
  nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), good[0])
  s1, s2 = ours.init(_params()), theirs.init(_params())
  flags = []
  for g in [good[0], good[1], nan]:
    u1, s1 = jax.jit(ours.update)(g, s1)
    _, s2 = theirs.update(g, s2)
    flags.append((bool(ours.has_updated(s1)), bool(optax.MultiSteps.has_updated(None, s2))))
  assert _zero(u1)
  # optax.MultiSteps still says True after the skipped call; jaxaccum says False.
  assert flags == [(False, False), (True, True), (False, True)]
  assert int(s1.mini_step) == 0 and int(s1.gradient_step) == 1


def test_gradients_of_another_structure_are_a_clear_error():
  opt = jaxaccum.multi_steps(optax.sgd(1.0), 2)
  state = opt.init(jnp.zeros(3))
  with pytest.raises(ValueError, match="structure of the parameters"):
    opt.update({"a": jnp.ones(3)}, state)
