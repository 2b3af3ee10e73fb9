"""``jaxaccum.value_and_grad`` / ``jaxaccum.grad`` against plain JAX references.

Every check compares with ``jax.value_and_grad`` on the whole batch or with a
hand-written Python loop over the strided micro-batches ``batch[i::N]``.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxaccum
from jaxaccum import _compat
from _models import (assert_rel_close, assert_trees_equal, mlp_batch, mlp_init,
                     mlp_loss, num_tokens, rel_error, token_batch, transformer_init,
                     transformer_loss)

MODELS = {
    "mlp": (mlp_init, mlp_loss, lambda key, b: mlp_batch(key, b)),
    "transformer": (transformer_init, transformer_loss, lambda key, b: token_batch(key, b)),
}


@functools.cache
def _setup(model, batch_size=16):
  init, loss, make_batch = MODELS[model]
  return loss, init(jax.random.key(0)), make_batch(jax.random.key(1), batch_size)


@functools.cache
def _jit_reference(loss, has_aux=False):
  return jax.jit(jax.value_and_grad(loss, has_aux=has_aux))


@functools.cache
def _jit_accumulated(loss, **options):
  """One jitted function per configuration, shared by the tests (compiling is
  what costs time here)."""
  return jax.jit(jaxaccum.value_and_grad(loss, **options))


def _micro(batch, i, n):
  """Micro-batch ``i`` of ``n``: rows ``i, i + n, ...``."""
  return jax.tree.map(lambda a: a[i::n], batch)


# --- Equivalence with jax.value_and_grad on the full batch. ---


@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_matches_full_batch_under_jit(model, n):
  loss, params, batch = _setup(model)
  got = _jit_accumulated(loss, num_microbatches=n)(params, batch)
  ref = _jit_reference(loss)(params, batch)
  assert_rel_close(got, ref, 1e-5)
  assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, ref)


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_matches_full_batch_inside_a_scan_over_training_steps(model):
  loss, params, _ = _setup(model)
  make_batch = MODELS[model][2]
  steps = 3
  batches = jax.tree.map(lambda *b: jnp.stack(b),
                         *[make_batch(jax.random.key(10 + s), 16) for s in range(steps)])
  grad_fns = {0: jax.value_and_grad(loss)}
  grad_fns.update({n: jaxaccum.value_and_grad(loss, num_microbatches=n) for n in (1, 2, 4, 8)})

  @jax.jit
  def train(params, batches):
    def step(params, batch):
      # Every variant sees the same parameters: the reference's trajectory.
      outs = {n: fn(params, batch) for n, fn in grad_fns.items()}
      params = jax.tree.map(lambda p, g: p - 0.1 * g, params, outs[0][1])
      return params, outs

    return lax.scan(step, params, batches)[1]

  outs = train(params, batches)
  for n in (1, 2, 4, 8):
    assert_rel_close(outs[n], outs[0], 1e-5)


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_one_microbatch_is_bit_identical_to_jax(model):
  loss, params, batch = _setup(model)
  got = _jit_accumulated(loss, num_microbatches=1)(params, batch)
  assert_trees_equal(got, _jit_reference(loss)(params, batch))


def test_one_microbatch_is_bit_identical_with_aux_and_eagerly():
  params = mlp_init(jax.random.key(0))
  batch = mlp_batch(jax.random.key(1), 16)

  def loss(params, batch):
    return mlp_loss(params, batch), {"pred": batch[0] @ params["w1"]}

  got = jaxaccum.value_and_grad(loss, num_microbatches=1, has_aux=True,
                                aux_reduction="sum")(params, batch)
  assert_trees_equal(got, jax.value_and_grad(loss, has_aux=True)(params, batch))
  got = jax.jit(jaxaccum.value_and_grad(loss, microbatch_size=16, has_aux=True,
                                        aux_reduction="sum"))(params, batch)
  assert_trees_equal(got, _jit_reference(loss, True)(params, batch))


def _masked_loss(w, batch):
  x, mask = batch
  return jnp.sum(jnp.tanh(x @ w) * mask) / jnp.sum(mask)


def test_one_microbatch_is_bit_identical_with_weight_fn():
  x = jax.random.normal(jax.random.key(0), (8, 3))
  w = jax.random.normal(jax.random.key(1), (3,))
  batch = (x, (jnp.arange(8) < 7).astype(jnp.float32))  # weight 7
  f = jaxaccum.value_and_grad(_masked_loss, num_microbatches=1,
                              weight_fn=lambda b: jnp.sum(b[1]))
  assert_trees_equal(jax.jit(f)(w, batch), _jit_reference(_masked_loss)(w, batch))


def test_microbatch_size_matches_full_batch():
  loss, params, batch = _setup("mlp")
  got = jax.jit(jaxaccum.value_and_grad(loss, microbatch_size=4))(params, batch)
  assert_rel_close(got, _jit_reference(loss)(params, batch), 1e-5)
  assert_trees_equal(got, _jit_accumulated(loss, num_microbatches=4)(params, batch))


# --- A property over random batch sizes, N and shapes. ---


def _linear_loss(params, batch):
  x, y = batch
  pred = jnp.tanh(x @ params["w"] + params["b"])
  return jnp.mean(jnp.square(pred - y))


@functools.cache
def _accumulated(n, reduction):
  return jax.jit(jaxaccum.value_and_grad(_linear_loss, num_microbatches=n,
                                         reduction=reduction))


_full = jax.jit(jax.value_and_grad(_linear_loss))


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True, database=None)
@hypothesis.given(
    n=st.sampled_from([1, 2, 3, 4, 8]),
    rows=st.integers(1, 3),
    din=st.sampled_from([1, 3]),
    dout=st.sampled_from([1, 2]),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_property_random_sizes(n, rows, din, dout, reduction, seed):
  kw, kx, ky = jax.random.split(jax.random.key(seed), 3)
  params = {"w": jax.random.normal(kw, (din, dout)), "b": jnp.zeros(dout)}
  batch = (jax.random.normal(kx, (n * rows, din)), jax.random.normal(ky, (n * rows, dout)))
  value, grads = _accumulated(n, reduction)(params, batch)
  ref_value, ref_grads = _full(params, batch)
  if reduction == "sum":
    # Micro-batches of equal size: the sum of their means is N times the mean.
    ref_value, ref_grads = jax.tree.map(lambda a: n * a, (ref_value, ref_grads))
  assert_rel_close((value, grads), (ref_value, ref_grads), 1e-5)


# --- Token-weighted accumulation on padded batches. ---

# Micro-batch i of 4 holds rows i and i + 4: 10, 6, 15 and 6 tokens.
LENGTHS = [8, 1, 7, 3, 2, 5, 8, 3]


@functools.cache
def _padded(lengths):
  return (transformer_init(jax.random.key(0)),
          token_batch(jax.random.key(2), len(lengths), list(lengths)))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_token_weighting_gives_the_full_batch_token_mean(n):
  params, batch = _padded(tuple(LENGTHS))
  f = _jit_accumulated(transformer_loss, num_microbatches=n, weight_fn=num_tokens)
  assert_rel_close(f(params, batch),
                   _jit_reference(transformer_loss)(params, batch), 1e-5)


def test_unweighted_mean_of_means_differs_on_the_padded_batch():
  # Without this, the test above could not tell weighting from no weighting.
  params, batch = _padded(tuple(LENGTHS))
  ref = _jit_reference(transformer_loss)(params, batch)
  unweighted = _jit_accumulated(transformer_loss, num_microbatches=4)(params, batch)
  assert rel_error(unweighted[0], ref[0]) > 1e-3
  assert rel_error(unweighted[1], ref[1]) > 1e-2


def test_all_padding_microbatch_contributes_nothing():
  lengths = (8, 0, 7, 3, 2, 0, 8, 3)  # micro-batch 1 of 4 (rows 1, 5) is padding
  params, batch = _padded(lengths)
  # The premise: on that micro-batch the loss and its gradients are NaN.
  value, grads = _jit_reference(transformer_loss)(params, _micro(batch, 1, 4))
  assert np.isnan(value)
  assert all(np.isnan(g).any() for g in jax.tree.leaves(grads))

  def loss(params, batch):
    value = transformer_loss(params, batch)
    return value, {"loss": value}

  f = jaxaccum.value_and_grad(loss, num_microbatches=4, weight_fn=num_tokens,
                              has_aux=True)
  (value, aux), grads = jax.jit(f)(params, batch)
  ref_value, ref_grads = _jit_reference(transformer_loss)(params, batch)
  assert np.isfinite(value) and np.isfinite(aux["loss"])
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert_rel_close((value, grads), (ref_value, ref_grads), 1e-5)
  assert_rel_close(aux["loss"], ref_value, 1e-5)


def test_all_weights_zero_gives_zero_gradients():
  params, batch = _padded((0,) * 8)
  f = _jit_accumulated(transformer_loss, num_microbatches=4, weight_fn=num_tokens)
  value, grads = f(params, batch)
  assert float(value) == 0.0
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, np.zeros_like(g))


# --- Randomness: micro-batch i gets fold_in(key, i). ---


def _dropout_loss(w, x, key):
  keep = jax.random.bernoulli(key, 0.5, x.shape)
  return jnp.mean(jnp.where(keep, x * w, 0.0)), jax.random.uniform(key, ())


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_rng_microbatch_i_gets_fold_in_key_i(make_key, n):
  key = make_key(7)
  w = jnp.float32(1.5)
  x = jax.random.normal(jax.random.key(3), (16, 5))
  f = jaxaccum.value_and_grad(_dropout_loss, num_microbatches=n, rng_argnums=2,
                              has_aux=True, aux_reduction="stack")
  (value, draws), grads = jax.jit(f)(w, x, key)
  parts = [jax.value_and_grad(_dropout_loss, has_aux=True)(
      w, _micro(x, i, n), jax.random.fold_in(key, i)) for i in range(n)]
  np.testing.assert_allclose(value, np.mean([p[0][0] for p in parts]), rtol=1e-6)
  np.testing.assert_allclose(grads, np.mean([p[1] for p in parts]), rtol=1e-6)
  np.testing.assert_array_equal(draws, np.array([p[0][1] for p in parts]))
  assert len(set(np.asarray(draws).tolist())) == n


def test_rng_key_before_the_batch_and_with_argnums_tuple():
  def loss(w, key, x, v):
    return jnp.mean(x * w * v) + jax.random.uniform(key, ()) * w

  key = jax.random.key(1)
  w, v = jnp.float32(2.0), jnp.float32(3.0)
  x = jnp.arange(8.0)
  got = jaxaccum.value_and_grad(loss, num_microbatches=2, argnums=(3, 0),
                                batch_argnums=2, rng_argnums=1)(w, key, x, v)
  parts = [jax.value_and_grad(loss, argnums=(3, 0))(w, jax.random.fold_in(key, i),
                                                    x[i::2], v) for i in range(2)]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *parts)
  assert_rel_close(got, expected, 1e-6)


# --- Aux reductions, argnums, has_aux, reduction="sum". ---


def _aux_loss(w, batch):
  """A token-mean loss with float, int and bool aux outputs."""
  x, mask = batch
  tokens = jnp.sum(mask)
  value = jnp.sum(x * w * mask) / tokens
  return value, {"value": value, "tokens": tokens.astype(jnp.int32),
                 "any": jnp.any(x > 1.5), "x": x[:, 0]}


def _aux_setup():
  x = jax.random.uniform(jax.random.key(4), (8, 3), maxval=2.0)
  mask = (jnp.arange(3)[None, :] < jnp.array([3, 1, 2, 3, 1, 1, 3, 2])[:, None])
  return jnp.float32(0.5), (x, mask.astype(jnp.float32))


def _aux_parts(w, batch, n):
  return [jax.value_and_grad(_aux_loss, has_aux=True)(w, _micro(batch, i, n))
          for i in range(n)]


def _weight(batch):
  return jnp.sum(batch[1])


def test_aux_mean_weighted_by_weight_fn():
  w, batch = _aux_setup()
  f = jaxaccum.value_and_grad(_aux_loss, num_microbatches=4, has_aux=True,
                              weight_fn=lambda b: jnp.sum(b[1]))
  (value, aux), grads = f(w, batch)
  parts = _aux_parts(w, batch, 4)
  ws = np.array([_weight(_micro(batch, i, 4)) for i in range(4)])
  wmean = lambda vals: np.sum(ws * np.asarray(vals, np.float64)) / np.sum(ws)
  np.testing.assert_allclose(aux["value"], wmean([p[0][1]["value"] for p in parts]), rtol=1e-6)
  np.testing.assert_allclose(aux["tokens"], wmean([p[0][1]["tokens"] for p in parts]),
                             rtol=1e-6)
  assert aux["tokens"].dtype == jnp.float32
  np.testing.assert_allclose(value, wmean([p[0][0] for p in parts]), rtol=1e-6)
  np.testing.assert_allclose(grads, wmean([p[1] for p in parts]), rtol=1e-6)
  # Weighting matters here: the plain mean of the micro-batch values differs.
  assert abs(np.mean([p[0][0] for p in parts]) - float(value)) > 1e-3


def test_aux_mean_unweighted():
  w, batch = _aux_setup()
  (value, aux), _ = jaxaccum.value_and_grad(_aux_loss, num_microbatches=4, has_aux=True)(
      w, batch)
  parts = _aux_parts(w, batch, 4)
  np.testing.assert_allclose(aux["value"], np.mean([p[0][1]["value"] for p in parts]),
                             rtol=1e-6)
  np.testing.assert_allclose(aux["any"], np.mean([p[0][1]["any"] for p in parts]))
  np.testing.assert_allclose(aux["x"], np.mean([p[0][1]["x"] for p in parts], axis=0),
                             rtol=1e-6)


def test_aux_sum():
  w, batch = _aux_setup()
  f = jaxaccum.value_and_grad(_aux_loss, num_microbatches=4, has_aux=True,
                              aux_reduction="sum", weight_fn=_weight)
  (_, aux), _ = jax.jit(f)(w, batch)
  parts = _aux_parts(w, batch, 4)
  assert aux["tokens"].dtype == jnp.int32
  assert int(aux["tokens"]) == 16
  assert int(aux["any"]) == sum(int(p[0][1]["any"]) for p in parts)
  np.testing.assert_allclose(aux["value"], np.sum([p[0][1]["value"] for p in parts]),
                             rtol=1e-6)


def test_weighted_sum_reduction():
  w, batch = _aux_setup()
  f = jaxaccum.value_and_grad(_aux_loss, num_microbatches=4, has_aux=True,
                              weight_fn=_weight, reduction="sum")
  (value, _), grads = jax.jit(f)(w, batch)
  parts = _aux_parts(w, batch, 4)
  ws = [float(_weight(_micro(batch, i, 4))) for i in range(4)]
  np.testing.assert_allclose(value, sum(a * p[0][0] for a, p in zip(ws, parts)), rtol=1e-6)
  np.testing.assert_allclose(grads, sum(a * p[1] for a, p in zip(ws, parts)), rtol=1e-6)


def test_aux_stack():
  w, batch = _aux_setup()
  f = jaxaccum.value_and_grad(_aux_loss, num_microbatches=4, has_aux=True,
                              aux_reduction="stack")
  (_, aux), _ = jax.jit(f)(w, batch)
  parts = _aux_parts(w, batch, 4)
  for name in ("value", "tokens", "any", "x"):
    expected = np.stack([p[0][1][name] for p in parts])
    assert aux[name].shape == (4,) + parts[0][0][1][name].shape
    assert aux[name].dtype == parts[0][0][1][name].dtype
    np.testing.assert_allclose(aux[name], expected, rtol=1e-6)
  # Rows i, i + 4 form micro-batch i.
  np.testing.assert_array_equal(aux["x"], np.stack([batch[0][i::4, 0] for i in range(4)]))


@pytest.mark.parametrize("n", [1, 2])
def test_aux_stack_of_python_scalars(n):
  def loss(w, x):
    return jnp.mean(x * w), {"lr": 0.5, "step": 3}

  (_, aux), _ = jaxaccum.value_and_grad(loss, num_microbatches=n, has_aux=True,
                                        aux_reduction="stack")(jnp.float32(1.0), jnp.ones(4))
  np.testing.assert_array_equal(aux["lr"], np.full(n, 0.5))
  np.testing.assert_array_equal(aux["step"], np.full(n, 3))


@pytest.mark.parametrize("argnums", [(0, 2), (2, 0), (2,)])
def test_argnums_tuples(argnums):
  def loss(w1, batch, w2):
    x, y = batch
    return jnp.mean(jnp.square(jnp.tanh(x @ w1) @ w2 - y))

  w1 = jax.random.normal(jax.random.key(0), (3, 4))
  w2 = jax.random.normal(jax.random.key(1), (4, 2))
  batch = mlp_batch(jax.random.key(2), 8, din=3, dout=2)
  got = jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=4, argnums=argnums))(
      w1, batch, w2)
  ref = jax.value_and_grad(loss, argnums=argnums)(w1, batch, w2)
  assert isinstance(got[1], tuple) and len(got[1]) == len(argnums)
  assert_rel_close(got, ref, 1e-5)


def test_batch_argnums_tuple_and_weight_fn_gets_every_batch_argument():
  seen = []

  def weight_fn(x, y):
    seen.append((x.shape, y.shape))
    return jnp.float32(1.0)

  def loss(params, x, y):
    return mlp_loss(params, (x, y))

  params = mlp_init(jax.random.key(0))
  x, y = mlp_batch(jax.random.key(1), 16)
  got = jaxaccum.value_and_grad(loss, num_microbatches=4, batch_argnums=(1, 2),
                                weight_fn=weight_fn)(params, x, y)
  assert_rel_close(got, jax.value_and_grad(loss)(params, x, y), 1e-5)
  assert seen and all(s == ((4, 4), (4, 2)) for s in seen)


def test_has_aux_structure_and_grad():
  w, batch = _aux_setup()
  (value, aux), grads = jaxaccum.value_and_grad(_aux_loss, num_microbatches=2,
                                                has_aux=True)(w, batch)
  g, aux2 = jaxaccum.grad(_aux_loss, num_microbatches=2, has_aux=True)(w, batch)
  assert jax.tree.structure(aux) == jax.tree.structure(aux2)
  assert_trees_equal((g, aux2), (grads, aux))
  params = mlp_init(jax.random.key(0))
  mb = mlp_batch(jax.random.key(1), 8)
  g = jax.jit(jaxaccum.grad(mlp_loss, num_microbatches=2))(params, mb)
  assert_rel_close(g, jax.grad(mlp_loss)(params, mb), 1e-5)


def test_reduction_sum():
  params = mlp_init(jax.random.key(0))
  batch = mlp_batch(jax.random.key(1), 12)
  got = jax.jit(jaxaccum.value_and_grad(mlp_loss, num_microbatches=3, reduction="sum"))(
      params, batch)
  parts = [jax.value_and_grad(mlp_loss)(params, _micro(batch, i, 3)) for i in range(3)]
  assert_rel_close(got, jax.tree.map(lambda *v: sum(v), *parts), 1e-5)


def test_keyword_arguments_are_passed_through_unsplit():
  def loss(w, x, *, scale):
    return jnp.mean(x * w) * jnp.sum(scale)

  scale = jnp.arange(8.0)  # leading size B, but not a batch argument
  x = jnp.arange(8.0)
  got = jaxaccum.value_and_grad(loss, num_microbatches=4)(jnp.float32(1.0), x, scale=scale)
  ref = jax.value_and_grad(loss)(jnp.float32(1.0), x, scale=scale)
  assert_rel_close(got, ref, 1e-6)


# --- bf16 parameters, float32 accumulator. ---


def test_bf16_parameters_float32_accumulator_is_more_precise():
  # 128 micro-batches of gradients near 1.5: a bf16 running sum soon has an
  # ulp of 0.5 or 1 and rounds most of each addend away.
  x = jax.random.uniform(jax.random.key(0), (256, 8), minval=1.0, maxval=2.0)
  x = x.astype(jnp.bfloat16)
  w = jnp.ones(8, jnp.bfloat16)

  def loss(w, x):
    return jnp.mean((x * w).astype(jnp.float32))

  ref = jax.grad(loss)(w.astype(jnp.float32), x.astype(jnp.float32))
  errs = {}
  for acc in (jnp.float32, jnp.bfloat16):
    value, g = jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=128,
                                               accumulator_dtype=acc))(w, x)
    assert g.dtype == jnp.bfloat16 and value.dtype == jnp.float32
    errs[acc] = rel_error(g, ref)
  assert errs[jnp.float32] <= 2.0**-8  # at most a bf16 rounding of the result
  assert errs[jnp.bfloat16] > 4 * errs[jnp.float32], errs


def test_bf16_mlp_gradients_come_back_in_bf16():
  params = mlp_init(jax.random.key(0), dtype=jnp.bfloat16)
  batch = mlp_batch(jax.random.key(1), 32)
  value, grads = jax.jit(jaxaccum.value_and_grad(mlp_loss, num_microbatches=8))(params, batch)
  assert value.dtype == jnp.float32
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
  ref = jax.grad(mlp_loss)(jax.tree.map(lambda p: p.astype(jnp.float32), params), batch)
  assert rel_error(grads, ref) < 2e-2


# --- Traced once. ---


def test_no_retrace_across_calls():
  traces = []

  def loss(params, batch):
    traces.append(1)
    return mlp_loss(params, batch)

  step = jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=4))
  params = mlp_init(jax.random.key(0))
  step(params, mlp_batch(jax.random.key(1), 16))
  first = len(traces)
  assert first >= 1
  for seed in range(2, 5):
    params = jax.tree.map(lambda p: p * 1.01, params)
    step(params, mlp_batch(jax.random.key(seed), 16))
  assert len(traces) == first
  assert step._cache_size() == 1


def test_no_retrace_across_calls_outside_jit():
  traces = []

  def loss(params, batch):
    traces.append(1)
    return mlp_loss(params, batch)

  grad_fn = jaxaccum.value_and_grad(loss, num_microbatches=4)
  params = mlp_init(jax.random.key(0))
  grad_fn(params, mlp_batch(jax.random.key(1), 16))
  first = len(traces)
  for seed in range(2, 5):
    got = grad_fn(params, mlp_batch(jax.random.key(seed), 16))
  assert len(traces) == first
  assert_rel_close(got, jax.value_and_grad(mlp_loss)(params, mlp_batch(jax.random.key(4), 16)),
                   1e-5)


# --- Dtypes wider than the accumulator, aux sums, numpy argnums. ---


@pytest.mark.parametrize("n", [1, 2])
def test_complex_gradients_keep_their_imaginary_part(n):
  def loss(w, x):
    return jnp.mean(jnp.abs(x * w) ** 2)

  w = jnp.complex64(1 + 2j)
  x = jnp.linspace(0.0, 3.0, 8, dtype=jnp.float32).astype(jnp.complex64)
  got = jaxaccum.value_and_grad(loss, num_microbatches=n)(w, x)
  assert got[1].dtype == jnp.complex64
  np.testing.assert_allclose(got[1], jax.grad(loss)(w, x), rtol=1e-6)


def test_float64_gradients_are_summed_in_float64():
  def loss(w, x):
    return jnp.mean(jnp.sin(x * w) ** 2)

  with _compat.enable_x64(True):
    w = jnp.float64(1.2345678901234567)
    x = jnp.linspace(0.0, 3.0, 8, dtype=jnp.float64)
    assert_trees_equal(jaxaccum.value_and_grad(loss, num_microbatches=1)(w, x),
                       jax.value_and_grad(loss)(w, x))
    _, g = jaxaccum.value_and_grad(loss, num_microbatches=4)(w, x)
    np.testing.assert_allclose(g, jax.grad(loss)(w, x), rtol=1e-13)


def test_aux_sum_leaves_out_zero_weight_microbatches():
  def loss(w, batch):
    x, mask = batch
    value = jnp.sum(mask * x * w) / jnp.sum(mask)  # 0 / 0 for all padding
    return value, {"value": value, "tokens": jnp.sum(mask)}

  x = jnp.arange(8.0)
  mask = jnp.array([1, 0, 1, 0, 1, 0, 1, 1], jnp.float32)
  f = jaxaccum.value_and_grad(loss, num_microbatches=4, has_aux=True,
                              weight_fn=lambda b: jnp.sum(b[1]), aux_reduction="sum")
  (_, aux), _ = f(jnp.float32(1.0), (x, mask))
  # Micro-batch 1 holds rows 1 and 5: both padding.
  assert float(aux["tokens"]) == 5.0
  assert np.isfinite(float(aux["value"]))
  np.testing.assert_allclose(aux["value"], (0 + 4) / 2 + (2 + 6) / 2 + 7 / 1, rtol=1e-6)


def test_numpy_integer_argnums():
  loss, params, batch = _setup("mlp")
  got = jaxaccum.grad(loss, num_microbatches=2, argnums=np.int64(0))(params, batch)
  assert_rel_close(got, jax.grad(loss)(params, batch), 1e-5)
