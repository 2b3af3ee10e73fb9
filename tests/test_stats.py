"""Noise-scale statistics (``with_stats=True``) and ``jaxaccum.noise_scale_ema``.

Linear regression with a known per-example gradient distribution: loss
``l = 0.5 (x . w - y)^2`` with ``x ~ N(0, I_d)``, ``y = x . w* + s eps``,
``eps ~ N(0, 1)``. With ``r = w - w*`` the per-example gradient is
``g = x (x . r) - s eps x``, so (Gaussian fourth moments,
``E[x x^T A x x^T] = 2A + tr(A) I`` for symmetric ``A``)::

  G = E[g] = r                                  |G|^2     = |r|^2
  Sigma = E[g g^T] - G G^T = r r^T + (|r|^2 + s^2) I
                                                tr(Sigma) = (d + 1)|r|^2 + d s^2
  B_simple = tr(Sigma) / |G|^2 = d + 1 + d s^2 / |r|^2

and a gradient averaged over ``b`` examples has ``E|G_b|^2 = |G|^2 + tr(Sigma) / b``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxaccum

D_IN = 8
NOISE = 1.0
W_STAR = jnp.arange(D_IN, dtype=jnp.float32) / D_IN
R = jnp.full((D_IN,), 1 / np.sqrt(D_IN), jnp.float32)  # |r|^2 = 1
W = W_STAR + R
SQ_NORM = 1.0
TRACE = (D_IN + 1) * SQ_NORM + D_IN * NOISE**2  # 17
B_SIMPLE = TRACE / SQ_NORM


def loss(w, batch):
  x, y = batch
  return 0.5 * jnp.mean(jnp.square(x @ w - y))


def make_batch(key, size):
  kx, ke = jax.random.split(key)
  x = jax.random.normal(kx, (size, D_IN))
  return x, x @ W_STAR + NOISE * jax.random.normal(ke, (size,))


@functools.cache
def _many_stats(batch_size, n, steps, seed=0):
  """Stats at ``W`` of ``steps`` independent random batches (float64 numpy)."""
  accumulated = jaxaccum.value_and_grad(loss, num_microbatches=n, with_stats=True)
  stats = jax.jit(jax.vmap(lambda key: accumulated(W, make_batch(key, batch_size))[1]))(
      jax.random.split(jax.random.key(seed), steps))
  return jaxaccum.AccumulationStats(*(np.asarray(s, np.float64) for s in stats))


@pytest.mark.parametrize("batch_size,n", [(256, 16), (128, 4)])
def test_estimates_average_to_the_analytic_values(batch_size, n):
  # 2000 batches: the means' standard errors are 0.4% to 0.7% (measured), so
  # 3% is more than four of them.
  stats = _many_stats(batch_size, n, 2000)
  g2, trace = stats.sq_norm_estimate.mean(), stats.trace_estimate.mean()
  np.testing.assert_allclose(g2, SQ_NORM, rtol=0.03)
  np.testing.assert_allclose(trace, TRACE, rtol=0.03)
  np.testing.assert_allclose(trace / g2, B_SIMPLE, rtol=0.03)
  # The ingredients: squared norms of means over b and B examples.
  b = batch_size // n
  np.testing.assert_allclose(stats.microbatch_sq_norm.mean(), SQ_NORM + TRACE / b, rtol=0.03)
  np.testing.assert_allclose(stats.grad_sq_norm.mean(), SQ_NORM + TRACE / batch_size,
                             rtol=0.03)
  assert (stats.microbatch_size == b).all() and (stats.num_microbatches == n).all()
  assert (stats.effective_batch_size == batch_size).all()
  assert (stats.num_skipped == 0).all()


def test_one_step_noise_scale_scatters_widely():
  # Why a smoother: a single step's ratio is far noisier than the averages.
  ratios = _many_stats(256, 16, 2000).noise_scale
  assert np.std(ratios) > 0.2 * B_SIMPLE


def test_single_microbatch_gives_nan_estimates():
  stats = _single_microbatch_stats()
  for value in (stats.sq_norm_estimate, stats.trace_estimate, stats.noise_scale):
    assert np.isnan(float(value))
  assert np.isfinite(float(stats.grad_sq_norm))


# --- Device split: the same row groups give the same statistics. ---

DEVICES = 8
MESH = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_data_axis_split_gives_the_single_device_statistics():
  # With data_axis, each device splits its B / 8 rows into N micro-batches:
  # 8 N gradients of B / (8 N) rows each. One device with 8 N micro-batches,
  # on the rows reordered so that its micro-batch d N + j is micro-batch j of
  # device d, averages exactly the same gradients.
  size, n = 64, 2
  batch = make_batch(jax.random.key(3), size)
  sharded = jax.device_put(batch, NamedSharding(MESH, P("data")))
  (value, grads), stats = jax.jit(jaxaccum.value_and_grad(
      loss, num_microbatches=n, with_stats=True, data_axis="data", mesh=MESH))(W, sharded)

  total, block = DEVICES * n, size // DEVICES
  order = np.empty(size, np.int64)
  for m in range(total):  # single-device micro-batch m: rows m, m + total, ...
    device, j = divmod(m, n)
    order[m::total] = device * block + j + n * np.arange(size // total)
  reordered = jax.tree.map(lambda a: a[order], batch)
  (ref_value, ref_grads), ref = jax.jit(jaxaccum.value_and_grad(
      loss, num_microbatches=total, with_stats=True))(W, reordered)

  np.testing.assert_allclose(grads, ref_grads, rtol=1e-5)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for field in ("microbatch_sq_norm", "grad_sq_norm", "sq_norm_estimate",
                "trace_estimate", "noise_scale"):
    np.testing.assert_allclose(getattr(stats, field), getattr(ref, field), rtol=1e-4,
                               err_msg=field)
  assert int(stats.microbatch_size) == int(ref.microbatch_size) == size // total
  assert int(stats.effective_batch_size) == int(ref.effective_batch_size) == size
  assert int(stats.num_microbatches) == n and int(ref.num_microbatches) == total
  assert int(stats.num_skipped) == 0


# --- The smoother. ---


def _stats(sq_norm, trace):
  """AccumulationStats with these estimates (update reads only those two)."""
  sq_norm, trace = jnp.asarray(sq_norm, jnp.float32), jnp.asarray(trace, jnp.float32)
  zeros, ints = jnp.zeros_like(sq_norm), jnp.zeros(sq_norm.shape, jnp.int32)
  return jaxaccum.AccumulationStats(
      microbatch_sq_norm=zeros, grad_sq_norm=zeros, sq_norm_estimate=sq_norm,
      trace_estimate=trace, noise_scale=trace / sq_norm, microbatch_size=ints + 1,
      num_microbatches=ints + 2, effective_batch_size=ints + 2, num_skipped=ints)


@functools.cache
def _single_microbatch_stats():
  return jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=1, with_stats=True))(
      W, make_batch(jax.random.key(0), 16))[1]


def test_smoother_state_is_a_pytree_of_scalars():
  state = jaxaccum.noise_scale_ema().init()
  assert isinstance(state, jaxaccum.NoiseScaleState)
  assert state.count.dtype == jnp.int32
  assert state.sq_norm.dtype == state.trace.dtype == jnp.float32
  assert len(jax.tree.leaves(state)) == 3 and all(x.shape == () for x in state)


def test_first_update_returns_the_step_estimates():
  smoother = jaxaccum.noise_scale_ema(0.99)
  b_simple, state = smoother.update(smoother.init(), _stats(2.0, 30.0))
  assert float(b_simple) == 15.0
  assert (int(state.count), float(state.sq_norm), float(state.trace)) == (1, 2.0, 30.0)


def test_bias_corrected_averages():
  decay = 0.9
  xs = [(2.0, 30.0), (1.0, 10.0), (4.0, 12.0), (0.5, 20.0)]
  smoother = jaxaccum.noise_scale_ema(decay)
  state = smoother.init()
  for t, x in enumerate(xs, 1):
    b_simple, state = smoother.update(state, _stats(*x))
    weights = decay ** np.arange(t - 1, -1, -1, dtype=np.float64)
    sq_norm, trace = (weights @ np.array(xs[:t])) / weights.sum()
    np.testing.assert_allclose([state.sq_norm, state.trace], [sq_norm, trace], rtol=1e-6)
    np.testing.assert_allclose(b_simple, trace / sq_norm, rtol=1e-6)
    assert int(state.count) == t


def test_constant_estimates_are_not_shrunk_towards_zero():
  smoother = jaxaccum.noise_scale_ema(0.999)
  state = smoother.init()
  for _ in range(5):
    b_simple, state = smoother.update(state, _stats(3.0, 12.0))
  # Without bias correction the average would be 1 - 0.999^5 = 0.5% of 3.
  np.testing.assert_allclose([state.sq_norm, state.trace, b_simple], [3.0, 12.0, 4.0],
                             rtol=1e-6)


def test_decay_zero_keeps_the_last_step():
  smoother = jaxaccum.noise_scale_ema(0)
  state = smoother.init()
  for x in [(2.0, 30.0), (4.0, 12.0)]:
    b_simple, state = smoother.update(state, _stats(*x))
  assert (float(state.sq_norm), float(state.trace), float(b_simple)) == (4.0, 12.0, 3.0)


def test_nan_estimates_leave_the_state_unchanged():
  smoother = jaxaccum.noise_scale_ema(0.9)
  b_simple, state = smoother.update(smoother.init(), _stats(jnp.nan, jnp.nan))
  assert np.isnan(float(b_simple)) and int(state.count) == 0
  _, state = smoother.update(state, _stats(2.0, 30.0))
  for stats in (_single_microbatch_stats(), _stats(jnp.nan, 5.0), _stats(1.0, jnp.inf)):
    b_simple, after = smoother.update(state, stats)
    jax.tree.map(np.testing.assert_array_equal, after, state)
    assert float(b_simple) == 15.0


def test_update_under_jit_and_scan_matches_eager():
  smoother = jaxaccum.noise_scale_ema(0.95)
  xs = _stats(jnp.linspace(0.5, 2.0, 6), jnp.linspace(10.0, 40.0, 6))
  eager, state = [], smoother.init()
  for i in range(6):
    b_simple, state = smoother.update(state, jax.tree.map(lambda a: a[i], xs))
    eager.append(float(b_simple))

  @jax.jit
  def run(xs):
    def step(state, x):
      b_simple, state = smoother.update(state, x)
      return state, b_simple

    return jax.lax.scan(step, jax.jit(smoother.init)(), xs)

  jitted_state, jitted = run(xs)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), jitted_state, state)
  assert jitted_state.count.dtype == jnp.int32


def test_smoothed_noise_scale_approaches_the_analytic_value():
  # Per-step estimates from 2000 real batches through the smoother: the
  # average over the last ~1 / (1 - decay) steps is within 10% of 17,
  # where single steps scatter by more than 20%.
  stats = _many_stats(256, 16, 2000)
  smoother = jaxaccum.noise_scale_ema(0.995)
  sequence = jaxaccum.AccumulationStats(*(jnp.asarray(s, jnp.float32) for s in stats))

  @jax.jit
  def run(sequence):
    return jax.lax.scan(lambda s, x: smoother.update(s, x)[::-1], smoother.init(), sequence)

  state, b_simple = run(sequence)
  assert int(state.count) == 2000
  np.testing.assert_allclose(b_simple[-1], B_SIMPLE, rtol=0.1)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, float("nan"), np.float64(1.0)])
def test_invalid_decay(decay):
  with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\)"):
    jaxaccum.noise_scale_ema(decay)


@pytest.mark.parametrize("decay", ["0.9", None, True, 0.9j])
def test_decay_that_is_not_a_number(decay):
  with pytest.raises(TypeError, match=r"decay must be a number in \[0, 1\)"):
    jaxaccum.noise_scale_ema(decay)


@pytest.mark.parametrize("decay", [1 - 1e-9, 1 - 2.0 ** -25, np.float64(1 - 1e-12)])
def test_decay_that_rounds_to_one_in_float32(decay):
  # Below 1 as a Python float, 1.0 as the float32 the averages are kept in.
  with pytest.raises(ValueError, match=r"rounds to 1.0 in float32.*at most 0.99999994"):
    jaxaccum.noise_scale_ema(decay)


def test_largest_decay_keeps_the_averages_finite():
  smoother = jaxaccum.noise_scale_ema(1 - 2.0 ** -24)
  state = smoother.init()
  for x in [(2.0, 30.0), (4.0, 12.0), (1.0, 10.0)]:
    b_simple, state = smoother.update(state, _stats(*x))
  assert np.isfinite(float(b_simple))
  np.testing.assert_allclose([state.sq_norm, state.trace], [7 / 3, 52 / 3], rtol=1e-5)


def test_update_checks_its_state_and_stats():
  smoother = jaxaccum.noise_scale_ema(0.9)
  state = smoother.init()
  with pytest.raises(TypeError, match="stats has no sq_norm_estimate, trace_estimate.*with_stats=True"):
    smoother.update(state, None)
  with pytest.raises(TypeError, match=r"state must be the NoiseScaleState from init\(\).*got tuple"):
    smoother.update((0, 0.0, 0.0), _stats(1.0, 2.0))
  with pytest.raises(TypeError, match="stats.trace_estimate must be a real number"):
    smoother.update(state, _stats(1.0, 2.0)._replace(trace_estimate="2.0"))
  with pytest.raises(TypeError, match="stats.sq_norm_estimate must be a real number"):
    smoother.update(state, _stats(1.0, 2.0)._replace(sq_norm_estimate=True))
