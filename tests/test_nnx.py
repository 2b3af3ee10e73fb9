"""``jaxaccum.nnx``: accumulation for Flax NNX modules.

Every result is compared with :func:`flax.nnx.value_and_grad`: on the full
batch where accumulation is exact (no dropout, no BatchNorm), and otherwise on
the ``N`` strided micro-batches ``x[i::N]`` one after the other (or each from
the initial state, for the ``"mean"`` BatchNorm policy), which is what the
accumulated step is documented to equal.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, PartitionSpec as P

import jaxaccum
import jaxaccum.nnx
from jaxaccum import _compat
from _models import (assert_rel_close, assert_trees_equal,
                     standard_promotion)

N = 4
B = 16


class MLP(nnx.Module):

  def __init__(self, rngs, din=4, hidden=16, dout=2):
    self.layer1 = nnx.Linear(din, hidden, rngs=rngs)
    self.layer2 = nnx.Linear(hidden, dout, rngs=rngs)

  def __call__(self, x):
    return self.layer2(jnp.tanh(self.layer1(x)))


class DropNet(nnx.Module):
  """A linear layer after dropout; also returns the dropout mask it drew."""

  def __init__(self, rngs, din=4, dout=2):
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.layer = nnx.Linear(din, dout, rngs=rngs)

  def __call__(self, x):
    mask = self.drop(jnp.ones_like(x))
    return self.layer(x * mask), mask


class BNNet(nnx.Module):

  def __init__(self, rngs, din=4, hidden=8, dout=2):
    self.layer1 = nnx.Linear(din, hidden, rngs=rngs)
    self.bn = nnx.BatchNorm(hidden, momentum=0.5, rngs=rngs)
    self.layer2 = nnx.Linear(hidden, dout, rngs=rngs)

  def __call__(self, x):
    return self.layer2(jnp.tanh(self.bn(self.layer1(x))))


def mse(model, x, y):
  return jnp.mean(jnp.square(model(x) - y))


def drop_loss(model, x, y):
  out, mask = model(x)
  return jnp.mean(jnp.square(out - y)), mask


def data(key=0, rows=B, din=4, dout=2):
  kx, ky = jax.random.split(jax.random.key(key))
  x = jax.random.normal(kx, (rows, din))
  return x, jnp.sin(x[:, :dout]) + 0.1 * jax.random.normal(ky, (rows, dout))


def micro(tree, i, n=N):
  return jax.tree.map(lambda a: a[i::n], tree)


def leaves(state):
  return jax.tree.leaves(nnx.to_pure_dict(state))


def pure(tree):
  """``tree`` with every ``nnx.State`` in it as a plain nested dict of arrays."""
  return jax.tree.map(lambda s: nnx.to_pure_dict(s) if isinstance(s, nnx.State) else s,
                      tree, is_leaf=lambda s: isinstance(s, nnx.State))


def test_equals_full_batch_nnx_value_and_grad():
  model = MLP(nnx.Rngs(0))
  x, y = data()
  ref_loss, ref_grads = nnx.value_and_grad(mse)(model, x, y)
  loss, grads = nnx.jit(jaxaccum.nnx.value_and_grad(
      mse, num_microbatches=N, batch_argnums=(1, 2)))(model, x, y)
  assert isinstance(grads, nnx.State)
  assert_rel_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
  assert_rel_close(loss, ref_loss)


def test_microbatch_size_has_aux_and_lazy_attribute():
  model = MLP(nnx.Rngs(0))
  x, y = data()

  def loss_aux(model, x, y):
    out = model(x)
    return jnp.mean(jnp.square(out - y)), jnp.mean(jnp.abs(out - y))

  (ref_loss, ref_aux), ref_grads = nnx.value_and_grad(loss_aux, has_aux=True)(model, x, y)
  # ``jaxaccum.nnx`` is reachable as an attribute of the package.
  (loss, aux), grads = jaxaccum.nnx.value_and_grad(
      loss_aux, microbatch_size=B // N, batch_argnums=(1, 2), has_aux=True)(model, x, y)
  assert_rel_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
  assert_rel_close((loss, aux), (ref_loss, ref_aux))
  grads_aux = jaxaccum.nnx.grad(loss_aux, num_microbatches=N, batch_argnums=(1, 2),
                                has_aux=True)(model, x, y)
  assert_rel_close(pure(grads_aux), pure((ref_grads, ref_aux)))


def test_one_microbatch_is_bit_identical():
  model = MLP(nnx.Rngs(0))
  x, y = data()
  ref = nnx.value_and_grad(mse)(model, x, y)
  out = jaxaccum.nnx.value_and_grad(mse, num_microbatches=1, batch_argnums=(1, 2))(model, x, y)
  assert_trees_equal(pure(out), pure(ref))


def test_reduction_sum():
  model = MLP(nnx.Rngs(0))
  x, y = data()
  ref_loss, ref_grads = nnx.value_and_grad(mse)(model, x, y)
  loss, grads = jaxaccum.nnx.value_and_grad(
      mse, num_microbatches=N, batch_argnums=(1, 2), reduction="sum")(model, x, y)
  assert_rel_close(nnx.to_pure_dict(grads),
                   jax.tree.map(lambda g: N * g, nnx.to_pure_dict(ref_grads)))
  assert_rel_close(loss, N * ref_loss)


def test_wrt_filter_matches_nnx_diff_state():
  model = MLP(nnx.Rngs(0))
  x, y = data()
  wrt = nnx.All(nnx.Param, nnx.PathContains("layer2"))
  ref_loss, ref_grads = nnx.value_and_grad(mse, argnums=nnx.DiffState(0, wrt))(model, x, y)
  loss, grads = jaxaccum.nnx.value_and_grad(
      mse, wrt=wrt, num_microbatches=N, batch_argnums=(1, 2))(model, x, y)
  assert set(nnx.to_pure_dict(grads)) == {"layer2"}
  assert_rel_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
  assert_rel_close(loss, ref_loss)


def test_optimizer_step_equals_full_batch_step():
  tx = standard_promotion(optax.adamw(1e-2, weight_decay=1e-3))
  x, y = data()
  models = {}
  for name, vg in (("full", nnx.value_and_grad(mse)),
                   ("accum", jaxaccum.nnx.value_and_grad(
                       mse, num_microbatches=N, batch_argnums=(1, 2)))):
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y, vg=vg):
      loss, grads = vg(model, x, y)
      optimizer.update(model, grads)
      return loss

    for _ in range(2):
      step(model, optimizer, x, y)
    models[name] = model
  before = nnx.to_pure_dict(nnx.state(MLP(nnx.Rngs(0)), nnx.Param))
  after = nnx.to_pure_dict(nnx.state(models["full"], nnx.Param))
  assert jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after))[0]
  assert_rel_close(nnx.to_pure_dict(nnx.state(models["accum"], nnx.Param)), after)


def test_dropout_masks_are_those_of_n_sequential_calls():
  x, y = data(rows=B, din=16)
  model = DropNet(nnx.Rngs(0, dropout=1), din=16)
  ref_model = nnx.clone(model)
  count0 = int(model.drop.rngs.count[...])
  (loss, masks), grads = nnx.jit(jaxaccum.nnx.value_and_grad(
      drop_loss, num_microbatches=N, batch_argnums=(1, 2), has_aux=True,
      aux_reduction="stack"))(model, x, y)
  assert masks.shape == (N, B // N, 16)
  flat = np.asarray(masks).reshape(N, -1)
  for i in range(N):
    for j in range(i):
      assert not np.array_equal(flat[i], flat[j]), f"micro-batches {i} and {j} share a mask"
  # The same keys as N forward passes of the module, one per micro-batch.
  ref_masks, ref_grads, ref_losses = [], [], []
  for i in range(N):
    (l, m), g = nnx.value_and_grad(drop_loss, has_aux=True)(ref_model, *micro((x, y), i))
    ref_losses.append(l)
    ref_masks.append(m)
    ref_grads.append(nnx.to_pure_dict(g))
  np.testing.assert_array_equal(np.asarray(masks), np.stack(ref_masks))
  assert_rel_close(nnx.to_pure_dict(grads),
                   jax.tree.map(lambda *g: sum(g) / N, *ref_grads))
  assert_rel_close(loss, sum(ref_losses) / N)
  # The module's RNG stream advanced in place, as after N calls.
  assert int(model.drop.rngs.count[...]) == count0 + N
  assert int(ref_model.drop.rngs.count[...]) == count0 + N


@pytest.mark.parametrize("policy", ["sequential", "mean"])
def test_batch_norm_policies(policy):
  x, y = data()
  model = BNNet(nnx.Rngs(0))
  initial = nnx.clone(model)
  loss, grads = nnx.jit(jaxaccum.nnx.value_and_grad(
      mse, num_microbatches=N, batch_argnums=(1, 2), state_policy=policy))(model, x, y)
  ref_grads, ref_losses, ref_stats = [], [], []
  ref_model = nnx.clone(initial)
  for i in range(N):
    if policy == "mean":
      ref_model = nnx.clone(initial)
    l, g = nnx.value_and_grad(mse)(ref_model, *micro((x, y), i))
    ref_losses.append(l)
    ref_grads.append(nnx.to_pure_dict(g))
    ref_stats.append(nnx.to_pure_dict(nnx.state(ref_model, nnx.BatchStat)))
  expected_stats = (ref_stats[-1] if policy == "sequential"
                    else jax.tree.map(lambda *s: sum(s) / N, *ref_stats))
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  assert_rel_close(stats, expected_stats)
  # BatchNorm over 4 rows amplifies float32 rounding (jit vs eager): 1e-4.
  assert_rel_close(nnx.to_pure_dict(grads), jax.tree.map(lambda *g: sum(g) / N, *ref_grads),
                   tol=1e-4)
  assert_rel_close(loss, sum(ref_losses) / N)
  # The two policies really differ on this model (the test can tell them apart).
  other = (jax.tree.map(lambda *s: sum(s) / N, *ref_stats) if policy == "sequential"
           else ref_stats[-1])
  assert max(float(np.max(np.abs(a - b)))
             for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(other))) > 1e-3


def test_weight_fn_token_mean_equals_full_batch():
  vocab, seq = 11, 6

  class TokenModel(nnx.Module):

    def __init__(self, rngs):
      self.embed = nnx.Embed(vocab, 8, rngs=rngs)
      self.out = nnx.Linear(8, vocab, rngs=rngs)

    def __call__(self, tokens):
      return self.out(jnp.tanh(self.embed(tokens)))

  def token_loss(model, batch):
    logp = jax.nn.log_softmax(model(batch["tokens"]))
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * batch["mask"]) / jnp.sum(batch["mask"])

  kt, kg = jax.random.split(jax.random.key(3))
  lengths = jnp.asarray([6, 1, 2, 5, 3, 6, 1, 4], jnp.int32)
  batch = {"tokens": jax.random.randint(kt, (8, seq), 0, vocab),
           "targets": jax.random.randint(kg, (8, seq), 0, vocab),
           "mask": (jnp.arange(seq)[None] < lengths[:, None]).astype(jnp.float32)}
  model = TokenModel(nnx.Rngs(0))
  ref_loss, ref_grads = nnx.value_and_grad(token_loss)(model, batch)
  loss, grads = jaxaccum.nnx.value_and_grad(
      token_loss, num_microbatches=N,
      weight_fn=lambda b: jnp.sum(b["mask"]))(model, batch)
  assert_rel_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
  assert_rel_close(loss, ref_loss)
  # Without the weights, the mean of micro-batch means is not the token mean.
  unweighted, _ = jaxaccum.nnx.value_and_grad(token_loss, num_microbatches=N)(model, batch)
  assert abs(float(unweighted) - float(ref_loss)) > 1e-3


def test_with_stats_and_skip_nonfinite():
  model = MLP(nnx.Rngs(0))
  x, y = data()
  x = x.at[1::N].set(jnp.nan)  # all of micro-batch 1
  keep = np.arange(B) % N != 1
  ref_loss, ref_grads = nnx.value_and_grad(mse)(model, x[keep], y[keep])
  (loss, grads), stats = jaxaccum.nnx.value_and_grad(
      mse, num_microbatches=N, batch_argnums=(1, 2), with_stats=True,
      skip_nonfinite=True)(model, x, y)
  assert isinstance(stats, jaxaccum.AccumulationStats)
  assert int(stats.num_skipped) == 1 and int(stats.num_microbatches) == N
  assert np.isfinite(float(stats.noise_scale))
  assert_rel_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
  assert_rel_close(loss, ref_loss)


def test_accumulator_dtype_keeps_param_dtype():
  model = nnx.Linear(4, 2, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x, y = data()

  def loss(model, x, y):
    return jnp.mean(jnp.square(model(x.astype(jnp.bfloat16)).astype(jnp.float32) - y))

  grads = jaxaccum.nnx.grad(loss, num_microbatches=N, batch_argnums=(1, 2),
                            accumulator_dtype=jnp.float32)(model, x, y)
  assert all(g.dtype == jnp.bfloat16 for g in leaves(grads))


def test_data_axis_matches_full_batch_and_devices_draw_different_masks():
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  model = MLP(nnx.Rngs(0))
  x, y = data()
  ref_loss, ref_grads = nnx.value_and_grad(mse)(model, x, y)
  loss, grads = nnx.jit(jaxaccum.nnx.value_and_grad(
      mse, num_microbatches=2, batch_argnums=(1, 2), data_axis="data", mesh=mesh))(model, x, y)
  assert_rel_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads))
  assert_rel_close(loss, ref_loss)

  # All rows identical: a stacked mask is the mean over the two devices of
  # masks in {0, 2}, so a 1 appears only if the devices drew different masks.
  drop = DropNet(nnx.Rngs(0, dropout=1), din=16)
  x1 = jnp.ones((8, 16))
  (_, masks), _ = nnx.jit(jaxaccum.nnx.value_and_grad(
      drop_loss, num_microbatches=2, batch_argnums=(1, 2), has_aux=True,
      aux_reduction="stack", data_axis="data", mesh=mesh))(drop, x1, jnp.zeros((8, 2)))
  assert np.any(np.asarray(masks) == 1.0)
  assert int(drop.drop.rngs.count[...]) == 2


def test_invalid_options():
  with pytest.raises(ValueError, match="batch_argnums"):
    jaxaccum.nnx.value_and_grad(mse, num_microbatches=2, batch_argnums=0)
  with pytest.raises(ValueError, match="state_policy"):
    jaxaccum.nnx.value_and_grad(mse, num_microbatches=2, state_policy="last")
  model = MLP(nnx.Rngs(0))
  x, y = data()
  with pytest.raises(ValueError, match="15"):
    jaxaccum.nnx.value_and_grad(mse, num_microbatches=2, batch_argnums=(1, 2))(
        model, x[:15], y[:15])


# --- NNX code as the tutorials write it. ---


class RngsNet(nnx.Module):
  """Dropout drawing from an ``nnx.Rngs`` passed at call time; returns the mask."""

  def __init__(self, rngs, din=4, dout=2):
    self.drop = nnx.Dropout(0.5)
    self.layer = nnx.Linear(din, dout, rngs=rngs)

  def __call__(self, x, rngs):
    mask = self.drop(jnp.ones_like(x), rngs=rngs)
    return self.layer(x * mask), mask


def rngs_loss(model, x, y, rngs):
  out, mask = model(x, rngs)
  return jnp.mean(jnp.square(out - y)), mask


def test_rngs_argument_draws_the_masks_of_n_sequential_calls():
  x, y = data()
  model, rngs = RngsNet(nnx.Rngs(0)), nnx.Rngs(dropout=1)
  ref_model, ref_rngs = nnx.clone(model), nnx.clone(rngs)
  (loss, masks), grads = jaxaccum.nnx.value_and_grad(
      rngs_loss, num_microbatches=N, batch_argnums=(1, 2), has_aux=True,
      aux_reduction="concat")(model, x, y, rngs)
  ref_losses, ref_masks, ref_grads = [], [], []
  for i in range(N):
    (l, m), g = nnx.value_and_grad(rngs_loss, has_aux=True)(
        ref_model, *micro((x, y), i), ref_rngs)
    ref_losses.append(l), ref_masks.append(m), ref_grads.append(g)
  for i in range(N):
    np.testing.assert_array_equal(masks[i::N], ref_masks[i])
  assert len({np.asarray(m).tobytes() for m in ref_masks}) == N
  assert_rel_close(loss, jnp.mean(jnp.stack(ref_losses)))
  assert_rel_close(leaves(grads), [sum(t) / N for t in zip(*map(leaves, ref_grads))])
  # The Rngs advanced as N calls would advance it.
  assert leaves(nnx.state(rngs)) == leaves(nnx.state(ref_rngs))


def test_compiles_once_per_graph_structure_outside_nnx_jit():
  @chex.assert_max_traces(n=1)
  def loss(model, x, y):
    return mse(model, x, y)

  x, y = data()
  vg = jaxaccum.nnx.value_and_grad(loss, num_microbatches=N, batch_argnums=(1, 2))
  model = MLP(nnx.Rngs(0))
  vg(model, x, y)
  for seed in (1, 2):
    vg(MLP(nnx.Rngs(seed)), x, y)  # same graph structure, new values: no trace
  with pytest.raises(AssertionError, match="traced > "):
    vg(MLP(nnx.Rngs(0), hidden=8), x, y)  # a new structure compiles again


def test_argnums_tuple_and_diff_state_match_nnx():
  x, y = data()
  encoder, head = nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1))

  def loss(encoder, head, x, y):
    return jnp.mean(jnp.square(head(jnp.tanh(encoder(x))) - y))

  argnums = (nnx.DiffState(0, nnx.PathContains("kernel")), 1)
  ref_loss, ref_grads = nnx.value_and_grad(loss, argnums=argnums)(encoder, head, x, y)
  got_loss, got_grads = jaxaccum.nnx.value_and_grad(
      loss, argnums=argnums, num_microbatches=N, batch_argnums=(2, 3))(encoder, head, x, y)
  assert isinstance(got_grads, tuple) and len(got_grads) == 2
  for got, ref in zip(got_grads, ref_grads):
    assert jax.tree.structure(nnx.to_pure_dict(got)) == jax.tree.structure(
        nnx.to_pure_dict(ref))
  assert_rel_close((got_loss, [leaves(g) for g in got_grads]),
                   (ref_loss, [leaves(g) for g in ref_grads]))


def test_argnums_naming_an_array_differentiates_it_as_nnx_does():
  x, y = data()

  def loss(model, scale, x, y):
    return jnp.mean(jnp.square(scale * model(x) - y))

  model, scale = MLP(nnx.Rngs(0)), jnp.float32(1.5)
  for argnums in (1, (0, 1)):
    ref = nnx.value_and_grad(loss, argnums=argnums)(model, scale, x, y)
    got = jaxaccum.nnx.value_and_grad(loss, argnums=argnums, num_microbatches=N,
                                      batch_argnums=(2, 3))(model, scale, x, y)
    assert jax.tree.structure(pure(got)) == jax.tree.structure(pure(ref))
    assert_rel_close(pure(got), pure(ref))


class Head(nnx.Module):

  def __init__(self, rngs, din=16, dout=2):
    self.out = nnx.Linear(din, dout, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, h):
    return self.out(self.drop(h))


def test_pytree_of_nnx_objects_as_the_differentiated_argument():
  """``f((encoder, head), x)``, as :func:`flax.nnx.value_and_grad` takes it."""
  x, y = data()

  def loss(modules, x, y):
    return jnp.mean(jnp.square(modules["head"](jnp.tanh(modules["encoder"](x))) - y))

  def pair_loss(pair, x, y):
    return loss({"encoder": pair[0], "head": pair[1]}, x, y)

  def make():
    return nnx.Linear(4, 16, rngs=nnx.Rngs(0)), Head(nnx.Rngs(1, dropout=2))

  for fn, wrap, argnums in (
      (pair_loss, tuple, 0), (pair_loss, list, nnx.DiffState(0, nnx.PathContains("kernel"))),
      (loss, lambda m: {"encoder": m[0], "head": m[1]}, (0,))):
    modules = wrap(make())
    jax.tree.leaves(modules, is_leaf=nnx.graph.is_graph_node)[1].drop.deterministic = True
    ref_loss, ref_grads = nnx.value_and_grad(fn, argnums=argnums)(modules, x, y)
    loss_, grads = nnx.jit(jaxaccum.nnx.value_and_grad(
        fn, argnums=argnums, num_microbatches=N, batch_argnums=(1, 2)))(modules, x, y)
    assert jax.tree.structure(pure(grads)) == jax.tree.structure(pure(ref_grads))
    assert_rel_close((loss_, pure(grads)), (ref_loss, pure(ref_grads)))


def test_pytree_argument_threads_each_objects_state():
  """The dropout streams of NNX objects inside a pytree advance as ``N`` calls."""
  x, y = data(din=16)
  pair = (Head(nnx.Rngs(0, dropout=1)), Head(nnx.Rngs(2, dropout=3), din=2))
  ref = nnx.clone(pair)

  def loss(pair, x, y):
    return jnp.mean(jnp.square(pair[1](pair[0](x)) - y))

  got_loss, got = jaxaccum.nnx.value_and_grad(loss, num_microbatches=N,
                                              batch_argnums=(1, 2))(pair, x, y)
  ref_losses, ref_grads = [], []
  for i in range(N):
    l, g = nnx.value_and_grad(loss)(ref, *micro((x, y), i))
    ref_losses.append(l), ref_grads.append(g)
  assert_rel_close(got_loss, sum(ref_losses) / N)
  assert_rel_close(pure(got), jax.tree.map(lambda *g: sum(g) / N, *map(pure, ref_grads)))
  # Each object's dropout stream advanced N times, as in N calls.
  assert_trees_equal(nnx.to_pure_dict(nnx.state(pair, nnx.RngCount)),
                     nnx.to_pure_dict(nnx.state(ref, nnx.RngCount)))
  assert [int(h.drop.rngs.count[...]) for h in pair] == [N, N]


# --- sharded as in Flax's "Scale up on multiple devices" guide. ---


def _sharded_param(value, names):
  """``nnx.Param(value, <sharding key>=names)`` under the key this flax reads
  (``out_sharding``; ``sharding_names`` or ``sharding`` in older releases)."""
  for key in ("out_sharding", "sharding_names", "sharding"):
    param = nnx.Param(value, **{key: names})
    if jax.tree.leaves(nnx.get_partition_spec(nnx.State({"p": param})),
                       is_leaf=lambda x: isinstance(x, P)) == [P(*names)]:
      return param
  raise AssertionError("no sharding metadata key found in this flax")


class GuideModel(nnx.Module):
  """An FSDP x tensor-parallel kernel from ``nnx.with_partitioning`` and a
  tensor-parallel ``nnx.Param`` with sharding metadata."""

  def __init__(self, rngs, depth=16):
    init = nnx.initializers.lecun_normal()
    self.dot1 = nnx.Linear(depth, depth, use_bias=False, rngs=rngs,
                           kernel_init=nnx.with_partitioning(init, ("data", "model")))
    self.w2 = _sharded_param(init(rngs.params(), (depth, depth)), (None, "model"))

  def __call__(self, x):
    return jnp.dot(jax.nn.relu(self.dot1(x)), self.w2[...])


@nnx.jit
def _create_sharded():
  """As the guide creates it: the state constrained to its partition specs
  (resharded on Explicit axes, where a constraint only asserts)."""
  model = GuideModel(nnx.Rngs(0))
  state = nnx.state(model)
  explicit = AxisType.Explicit in jax.sharding.get_abstract_mesh().axis_types
  constrain = jax.sharding.reshard if explicit else jax.lax.with_sharding_constraint
  nnx.update(model, constrain(state, nnx.get_partition_spec(state)))
  return model


def _specs(tree):
  """Each array's PartitionSpec, padded to its rank."""
  return jax.tree.map(lambda a: tuple(a.sharding.spec) + (None,) * (
      a.ndim - len(a.sharding.spec)), tree)


def _guide_step(axis_type, **options):
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(getattr(AxisType, axis_type),) * 2)
  with jax.set_mesh(mesh):
    model = _create_sharded()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    batch = jax.device_put(data(rows=32, din=16, dout=16), P("data"))
    ref_loss, ref_grads = nnx.value_and_grad(mse)(model, *batch)
    vg = jaxaccum.nnx.value_and_grad(mse, num_microbatches=2, batch_argnums=(1, 2),
                                     data_axis="data", **options)
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
      loss, grads = vg(model, x, y)
      optimizer.update(model, grads)
      return loss, grads

    loss, grads = step(model, optimizer, *batch)
  return params, (loss, nnx.to_pure_dict(grads)), (ref_loss, nnx.to_pure_dict(ref_grads)), model


@pytest.mark.parametrize("axis_type", ["Auto", pytest.param("Explicit", marks=pytest.mark.skipif(
    not _compat.has_reduced_specs(),
    reason="on Explicit axes this jax runs the loss under shard_map, where this "
    "tensor-parallel model fails (jax 0.8 on defers the reduction in plain jit)"))])
def test_guide_sharded_model_keeps_the_parameters_sharding(axis_type):
  params, got, ref, model = _guide_step(axis_type)
  assert _specs(params) == {"dot1": {"kernel": ("data", "model")}, "w2": (None, "model")}
  # On Auto axes the sharding metadata stands for param_specs: the FSDP
  # dimension is reduce-scattered, not gathered and all-reduced.
  assert _specs(got[1]) == _specs(params)
  assert_rel_close(got, ref)
  # The optimizer step: sgd(0.5) on the full-batch gradients.
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert_rel_close(after, jax.tree.map(lambda p, g: p - 0.5 * g, params, ref[1]))
  assert _specs(after) == _specs(params)


def test_guide_sharded_model_options_reach_the_core():
  params, got, ref, _ = _guide_step("Auto", fsdp_gather="per_microbatch")
  assert _specs(got[1]) == _specs(params)
  assert_rel_close(got, ref)
  # param_specs= overrides the metadata: here every parameter replicated over
  # the data axis, so the gradients come back gathered along it.
  _, got, ref, _ = _guide_step("Auto", param_specs=P())
  assert _specs(got[1])["dot1"]["kernel"] == (None, "model")
  assert_rel_close(got, ref)
  with pytest.raises(ValueError, match="fsdp_gather"):
    jaxaccum.nnx.value_and_grad(mse, num_microbatches=2, fsdp_gather="never", data_axis="d")
  with pytest.raises(ValueError, match="param_specs"):
    jaxaccum.nnx.value_and_grad(mse, num_microbatches=2, param_specs=P())
  with pytest.raises(ValueError, match="param_specs"):
    jaxaccum.nnx.value_and_grad(mse, argnums=(0,), num_microbatches=2, data_axis="data",
                                param_specs=P())


def test_guide_sharded_model_reduce_scatters_the_fsdp_gradient():
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(_create_sharded())
    batch = jax.device_put(data(rows=32, din=16, dout=16), P("data"))
    scattered = {}
    for name, options in (("metadata", {}), ("replicated", {"param_specs": P()})):
      vg = jaxaccum.nnx.value_and_grad(mse, num_microbatches=2, batch_argnums=(1, 2),
                                       data_axis="data", **options)
      counts = jaxaccum.count_collectives(
          jax.jit(lambda state, x, y, vg=vg: vg(nnx.merge(graphdef, state), x, y)),
          state, *batch)
      scattered[name] = counts.outside_loops.reduce_scatter
      assert counts.inside_loops.reduce_scatter == 0
  # The FSDP kernel's gradient: reduce-scattered after the loop, not all-reduced.
  assert scattered == {"metadata": 1, "replicated": 0}


@pytest.mark.parametrize("argnums", [0, (0,)])
def test_defer_reduction_returns_the_partial_sums(argnums):
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:4])
  model = MLP(nnx.Rngs(0))
  batch = data()
  ref_loss, ref_grads = nnx.value_and_grad(mse)(model, *batch)
  with jax.set_mesh(mesh):
    batch = jax.device_put(batch, P("data"))
    loss, deferred = nnx.jit(jaxaccum.nnx.value_and_grad(
        mse, argnums=argnums, num_microbatches=2, batch_argnums=(1, 2), data_axis="data",
        defer_reduction=True))(model, *batch)
  assert isinstance(deferred, jaxaccum.DeferredGrads) and deferred.axes == ("data",)
  partials = deferred.partials if argnums == 0 else deferred.partials[0]
  assert isinstance(partials, nnx.State)
  assert all(p.shape[0] == 4 for p in leaves(partials))
  # The sum over the devices is the gradient the call returns without deferring.
  summed = jax.tree.map(lambda p: p.sum(0), nnx.to_pure_dict(partials))
  assert_rel_close((loss, summed), (ref_loss, nnx.to_pure_dict(ref_grads)))


def test_batch_named_by_position_passed_by_keyword():
  """As the core (and jax.jit's static_argnums), the batch is bound to the
  loss's signature: ``batch_argnums=(1, 2)`` may be passed as ``x=``, ``y=``."""
  x, y = data()
  model = MLP(nnx.Rngs(0))
  vg = jaxaccum.nnx.value_and_grad(lambda model, x, y: mse(model, x, y),
                                   num_microbatches=N, batch_argnums=(1, 2))
  want = nnx.value_and_grad(mse)(model, x, y)
  assert_rel_close(vg(model, x, y=y), want, 1e-5)
  assert_rel_close(vg(model, x=x, y=y), want, 1e-5)
