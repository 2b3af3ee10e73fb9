"""``multi_steps(data_axis=...)`` under plain ``jax.jit``, on 8 simulated CPU devices.

For each layout (data parallel, FSDP, tensor parallel, HSDP, FSDP + tensor
parallel) on Explicit and
Auto meshes, a training step takes the gradients of
``jaxaccum.value_and_grad(..., defer_reduction=True)``
(:class:`jaxaccum.DeferredGrads`) and ``multi_steps`` reduces them once per
cycle: the parameters equal the inner optimizer run once per cycle on the
full batch of all ``k`` calls' rows on one device; updates and state keep
the parameters' sharding; the compiled update runs no collective on the
``k - 1`` accumulating calls and, on the completing call, exactly the
reduction the layout needs, inside the conditional; and no call of the
training step all-gathers more than the loss under plain ``jit`` does.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxaccum
from _models import assert_rel_close, standard_promotion
from jaxaccum import _compat
from jaxaccum._devices import specs as _specs

K = 2  # calls per cycle
CYCLES = 2
ROWS = 32  # rows per call: 4 per device
N = 2  # micro-batches per call
W1, W2 = (16, 32), (32, 8)

# layout -> (mesh shape, mesh axes, data axes, parameter specs)
LAYOUTS = {
    "DDP": ((8,), ("data",), ("data",), {"w1": P(), "w2": P()}),
    "FSDP": ((8,), ("data",), ("data",), {"w1": P("data", None), "w2": P("data", None)}),
    "TP": ((4, 2), ("data", "model"), ("data",), {"w1": P(None, "model"), "w2": P("model", None)}),
    "HSDP": ((2, 4), ("replica", "shard"), ("replica", "shard"),
             {"w1": P("shard", None), "w2": P("shard", None)}),
    "FSDP+TP": ((4, 2), ("data", "model"), ("data",),
                {"w1": P("data", "model"), "w2": P("model", "data")}),
}

# layout -> the completing call's collectives in the update (kind: (count,
# bytes per device)), all inside the conditional; the k - 1 other calls run
# none. The gradients are 3072 B; FSDP reduce-scatters them into the
# parameters' shards (2 leaves), tensor parallel all-reduces each device's
# half (1536 B), HSDP reduce-scatters over "shard" and all-reduces the shard
# (768 B) over "replica", FSDP + TP reduce-scatters each device's half over
# "data" (1536 B, no gather over "model"). The rest (4 to 16 B) are the
# partial sums of the global norm that clip_by_global_norm takes of sharded
# gradients.
EXPECTED = {
    "DDP": {"all_reduce": (1, 3072)},
    "FSDP": {"reduce_scatter": (2, 3072), "all_reduce": (1, 8)},
    "TP": {"all_reduce": (2, 1544)},
    "HSDP": {"reduce_scatter": (2, 3072), "all_reduce": (2, 776)},
    "FSDP+TP": {"reduce_scatter": (2, 1536), "all_reduce": (3, 16)},
}

# layout -> what one call of the whole training step communicates (kind:
# bytes per device, the micro-batch loop's N times), on both axis types:
# (the k - 1 accumulating calls, the completing call). The accumulating
# calls run the gradient function's own collectives only: the loss value
# (4 B), tensor parallelism's activations (256 B), FSDP's parameter gathers,
# which the loss under plain jit runs too; the completing call adds the
# reduction of EXPECTED.
PER_CALL = {
    "DDP": ({"all_reduce": 4}, {"all_reduce": 3076}),
    "FSDP": ({"all_reduce": 4, "all_gather": 3072},
             {"all_reduce": 12, "reduce_scatter": 3072, "all_gather": 3072}),
    "TP": ({"all_reduce": 260}, {"all_reduce": 1804}),
    "HSDP": ({"all_reduce": 4, "all_gather": 3072},
             {"all_reduce": 780, "reduce_scatter": 3072, "all_gather": 3072}),
    "FSDP+TP": ({"all_reduce": 260, "all_gather": 1536},
                {"all_reduce": 276, "reduce_scatter": 1536, "all_gather": 1536}),
}
KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "collective_permute")


def plain_loss(params, batch):
  """Mean squared error of a two-layer tanh network, scaled so that the
  inner optimizer's global-norm clipping is active."""
  x, y = batch
  return 20.0 * jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)


def loss(params, batch):
  """:func:`plain_loss`, also on an Explicit tensor-parallel mesh."""
  x, y = batch
  mesh = jax.sharding.get_abstract_mesh()
  types = {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_types))
  if types.get("model") != AxisType.Explicit:
    return plain_loss(params, batch)
  # Explicit tensor parallelism names the output shardings of the contractions.
  data = "data" if types["data"] == AxisType.Explicit else None
  h = jnp.tanh(jnp.einsum("bi,ih->bh", x, params["w1"], out_sharding=P(data, "model")))
  out = jnp.einsum("bh,ho->bo", h, params["w2"], out_sharding=P(data, None))
  return 20.0 * jnp.mean((out - y) ** 2)


def _problem():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k1, W1) / 4, "w2": jax.random.normal(k2, W2) / 6}
  x = jax.random.normal(k3, (CYCLES * K * ROWS, W1[0]))
  return params, (x, jnp.sin(x[:, :W2[1]]))


def _calls(batch):
  """The rows of each call, in order."""
  n = CYCLES * K
  return [jax.tree.map(lambda a: a[i::n], batch) for i in range(n)]


def _inner():
  return standard_promotion(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05)))


def _reference(params, batch):
  """The inner optimizer once per cycle, on all the cycle's rows, one device."""
  inner = _inner()
  state = inner.init(params)
  calls = _calls(batch)
  for c in range(CYCLES):
    rows = jax.tree.map(lambda *a: jnp.concatenate(a), *calls[c * K:(c + 1) * K])
    updates, state = inner.update(jax.grad(plain_loss)(params, rows), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _mesh(layout, axis_type):
  shape, names, _, _ = LAYOUTS[layout]
  return jax.make_mesh(shape, names, axis_types=(getattr(AxisType, axis_type),) * len(names))


def _by_kind(counts, where):
  n, size = getattr(counts, where), getattr(counts.bytes, where)
  return {k: (getattr(n, k), getattr(size, k)) for k in KINDS if getattr(n, k)}


def every_call(counts):
  """Collectives (kind: (count, bytes)) outside any conditional: run on every call."""
  out, cond = _by_kind(counts, "outside_loops"), _by_kind(counts, "in_conditionals")
  left = {k: (n - cond.get(k, (0, 0))[0], b - cond.get(k, (0, 0))[1])
          for k, (n, b) in out.items()}
  return {k: v for k, v in left.items() if v != (0, 0)}


def per_call(counts, completing):
  """Bytes (kind: bytes) one call runs: the loop's N times, what runs outside
  the conditional, and on the completing call the conditional's too."""
  out = {k: N * getattr(counts.bytes.inside_loops, k) + getattr(counts.bytes.outside_loops, k)
         - (0 if completing else getattr(counts.bytes.in_conditionals, k)) for k in KINDS}
  return {k: b for k, b in out.items() if b}


def assert_collectives(got, expected, counts):
  """The same kinds and bytes; the same counts, where XLA combines the
  all-reduces of all leaves (older XLA versions leave some split: more ops,
  the same bytes)."""
  assert {k: b for k, (_, b) in got.items()} == {k: b for k, (_, b) in expected.items()}, counts
  assert all(expected[k][0] <= n <= 2 * expected[k][0] for k, (n, _) in got.items()), counts


def _setup(layout, axis_type, **options):
  """``multi_steps``, its jitted train step, the gradient function, sharded
  parameters and calls, and the mesh."""
  _, _, axes, specs = LAYOUTS[layout]
  mesh = _mesh(layout, axis_type)
  entry = axes if len(axes) > 1 else axes[0]
  # On Auto axes a parameter's sharding is invisible inside jit: pass it.
  extra = {"param_specs": specs} if axis_type == "Auto" else {}
  ms = jaxaccum.multi_steps(_inner(), K, data_axis=entry, **extra, **options)
  grad_fn = jaxaccum.value_and_grad(loss, num_microbatches=N, data_axis=entry,
                                    defer_reduction=True, **extra)

  @jax.jit
  def step(params, state, batch):
    value, grads = grad_fn(params, batch)
    updates, state = ms.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  params, batch = _problem()
  params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
  calls = [jax.device_put(c, NamedSharding(mesh, P(entry))) for c in _calls(batch)]
  return ms, step, grad_fn, params, calls, mesh


def _assert_sharded_like(tree, specs, mesh, lead=()):
  for name, a in tree.items():
    want = NamedSharding(mesh, P(*lead, *_specs.without(specs[name], lead, a.ndim - len(lead))))
    assert a.sharding.is_equivalent_to(want, a.ndim), (name, a.sharding, want)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_equals_the_full_batch_and_reduces_once_per_cycle(layout, axis_type):
  ms, step, grad_fn, params, calls, mesh = _setup(layout, axis_type)
  _, _, axes, specs = LAYOUTS[layout]
  with jax.set_mesh(mesh):
    state = ms.init(params)
    for i, call in enumerate(calls):
      params, state, _ = step(params, state, call)
      assert bool(ms.has_updated(state)) == ((i + 1) % K == 0)
    update_counts = jaxaccum.count_collectives(
        jax.jit(ms.update), grad_fn(params, calls[0])[1], state, params)
    step_counts = jaxaccum.count_collectives(step, params, state, calls[0])
    plain_counts = jaxaccum.count_collectives(jax.jit(jax.value_and_grad(loss)), params,
                                              calls[0])
  assert_rel_close(params, _reference(*_problem()))
  _assert_sharded_like(params, specs, mesh)
  entry = axes if len(axes) > 1 else axes[0]
  for name, acc in state.acc_grads.items():
    want = P(entry, *_specs.without(specs[name], axes, acc.ndim - 1))
    assert acc.sharding.is_equivalent_to(NamedSharding(mesh, want), acc.ndim), (name, acc)
  # The update: nothing on the k - 1 accumulating calls; the reduction, in
  # the conditional, on the completing call.
  assert every_call(update_counts) == {}, update_counts
  assert_collectives(_by_kind(update_counts, "in_conditionals"), EXPECTED[layout], update_counts)
  # The whole step: the same conditional; on every call only what the
  # gradient function itself does, no gradient reduction; and no call
  # gathers more than the loss under plain jit (no tensor-parallel dimension).
  assert_collectives(_by_kind(step_counts, "in_conditionals"), EXPECTED[layout], step_counts)
  if axis_type == "Explicit" and "model" in mesh.axis_names and not _compat.has_reduced_specs():
    # jax 0.7 gathers the activations over "model" in the loss's backward pass
    # under shard_map (docs/sharded.md, "What jax gathers by itself").
    return
  accumulating, completing = PER_CALL[layout]
  assert per_call(step_counts, completing=False) == accumulating, step_counts
  assert per_call(step_counts, completing=True) == completing, step_counts
  plain_gathers = per_call(plain_counts, completing=True).get("all_gather", 0)
  assert completing.get("all_gather", 0) <= plain_gathers, plain_counts


def _run_updates(ms, params, grads_of, mesh, per_call, count=False):
  """``jax.jit(ms.update)`` over the calls, ``grads_of(i, params)`` the
  gradients of call ``i`` and ``per_call[i]`` its keyword arguments; the final
  parameters and state, and (``count``) the update's collectives."""
  update = jax.jit(lambda g, s, p, kw: ms.update(g, s, p, **kw))
  with jax.set_mesh(mesh):
    state = ms.init(params)
    for i, kw in enumerate(per_call):
      updates, state = update(grads_of(i, params), state, params, kw)
      params = optax.apply_updates(params, updates)
    counts = count and jaxaccum.count_collectives(
        update, grads_of(0, params), state, params, per_call[0])
  return params, state, counts


@pytest.mark.parametrize("layout, axis_type, grad_layout", [
    ("FSDP", "Explicit", "params"), ("FSDP", "Explicit", "replicated"),
    ("HSDP", "Explicit", "params"), ("TP", "Explicit", "params"),
    ("FSDP+TP", "Explicit", "params"), ("FSDP", "Auto", "params"), ("DDP", "Auto", "params"),
    ("FSDP+TP", "Auto", "params")])
def test_ordinary_gradients_are_reduced_once_not_twice(layout, axis_type, grad_layout):
  # Already-reduced gradients: each device adds its block to its own row
  # (on one device per block), so the rows still sum to the cycle's total.
  ms, _, _, params, _, mesh = _setup(layout, axis_type)
  specs = LAYOUTS[layout][3]
  host_params, batch = _problem()
  calls = _calls(batch)
  grad_specs = specs if grad_layout == "params" else {k: P() for k in specs}

  def grads_of(i, params):
    grads = jax.grad(plain_loss)(jax.device_get(params), calls[i])
    return jax.tree.map(lambda g, s: jax.device_put(g, NamedSharding(mesh, s)), grads, grad_specs)

  params, _, counts = _run_updates(ms, params, grads_of, mesh, [{}] * len(calls), count=True)
  assert_rel_close(params, _reference(host_params, batch))
  _assert_sharded_like(params, specs, mesh)
  assert every_call(counts) == {}, counts
  assert_collectives(_by_kind(counts, "in_conditionals"), EXPECTED[layout], counts)


def _host_deferred(grads, devices, axes, seed):
  """Random partial sums (rows of a leading device axis) that add up to ``grads``."""
  noise = jax.tree.map(lambda g: jax.random.normal(jax.random.key(seed), (devices, *g.shape)),
                       grads)
  return jaxaccum.DeferredGrads(
      jax.tree.map(lambda g, n: n - n.mean(0) + g / devices, grads, noise), axes)


def test_weights_options_and_skips_with_deferred_gradients():
  # weight=, use_grad_mean=False, a schedule function and a skipped call
  # (a NaN in one device's partial sum) on DDP over Auto axes: the cycle's
  # gradient is the exact weighted sum / mean of the calls that count.
  mesh = _mesh("DDP", "Auto")
  host_params, batch = _problem()
  grads = [jax.grad(plain_loss)(host_params, c) for c in _calls(batch)]
  deferred = [_host_deferred(g, 8, ("data",), i) for i, g in enumerate(grads)]
  deferred[1] = jaxaccum.DeferredGrads(
      {**deferred[1].partials, "w1": deferred[1].partials["w1"].at[3, 0, 0].set(jnp.nan)},
      ("data",))
  rows = NamedSharding(mesh, P("data"))
  deferred = [jax.device_put(d, rows) for d in deferred]
  weights = [0.5, 7.0, 2.0, 1.5]
  for use_grad_mean in (True, False):
    ms = jaxaccum.multi_steps(optax.sgd(1.0), lambda step: jnp.where(step < 1, 3, 2),
                              use_grad_mean, optax.skip_not_finite, data_axis="data", mesh=mesh)
    per_call = [{"weight": jnp.float32(w)} for w in weights]
    zero = jax.tree.map(jnp.zeros_like, host_params)
    params, state, _ = _run_updates(ms, zero, lambda i, _: deferred[i], mesh, per_call)
    # Call 1 is skipped: the first cycle (k = 3) is calls 0, 2, 3.
    assert int(state.gradient_step) == 1 and int(state.mini_step) == 0
    total = sum(weights[i] for i in (0, 2, 3)) if use_grad_mean else 1.0
    expected = jax.tree.map(lambda *g: -sum(w * x for w, x in zip(
        (weights[0], weights[2], weights[3]), g)) / total, grads[0], grads[2], grads[3])
    assert_rel_close(params, expected)


def test_fsdp_parameters_with_replicated_gradients_without_data_axis():
  # Plain multi_steps under jit, FSDP parameters on an Explicit mesh and
  # ordinary replicated gradients: both branches of the cycle's conditional
  # return updates and state in the parameters' sharding.
  mesh = _mesh("FSDP", "Explicit")
  specs = LAYOUTS["FSDP"][3]
  host_params, batch = _problem()
  params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), host_params, specs)
  ms = jaxaccum.multi_steps(_inner(), K)
  calls = _calls(batch)

  def grads_of(i, params):
    return jax.device_put(jax.grad(plain_loss)(jax.device_get(params), calls[i]),
                          NamedSharding(mesh, P()))

  params, state, _ = _run_updates(ms, params, grads_of, mesh, [{}] * len(calls))
  assert_rel_close(params, _reference(host_params, batch))
  _assert_sharded_like(params, specs, mesh)
  _assert_sharded_like(state.inner_opt_state[1][0].mu, specs, mesh)


def test_bad_input_is_a_clear_error():
  mesh = _mesh("DDP", "Explicit")
  params = {"w": jnp.zeros(3)}
  deferred = jaxaccum.DeferredGrads({"w": jnp.ones((8, 3))}, ("data",))
  plain = jaxaccum.multi_steps(optax.sgd(1.0), 2)
  with pytest.raises(TypeError, match=r"built without data_axis; pass multi_steps\(\.\.\., "
                     r"data_axis=\('data',\)\)"):
    plain.update(deferred, plain.init(params), params)
  with jax.set_mesh(_mesh("HSDP", "Explicit")):
    ms = jaxaccum.multi_steps(optax.sgd(1.0), 2, data_axis=("replica", "shard"))
    state = ms.init(params)
    with pytest.raises(ValueError, match=r"deferred over axes \('data',\) given to "
                       r"multi_steps\(data_axis=\('replica', 'shard'\)\)"):
      ms.update(deferred, state, params)
  with jax.set_mesh(mesh):
    ms = jaxaccum.multi_steps(optax.sgd(1.0), 2, data_axis="data")
    with pytest.raises(ValueError, match=r"shapes \[\(4, 3\)\] given to a multi_steps whose "
                       r"accumulator has shapes \[\(8, 3\)\]"):
      ms.update(jaxaccum.DeferredGrads({"w": jnp.ones((4, 3))}, ("data",)), ms.init(params),
                params)
    with pytest.raises(ValueError, match=r"data_axis='batch'\) names axes \['batch'\] that "
                       r"the mesh does not have \(mesh axes: \('data',\)\)"):
      jaxaccum.multi_steps(optax.sgd(1.0), 2, data_axis="batch").init(params)
  with pytest.raises(ValueError, match=r"the mesh does not have \(mesh axes: \(\)\)"):
    jaxaccum.multi_steps(optax.sgd(1.0), 2, data_axis="data").init(params)
  with pytest.raises(ValueError, match="give axis_name or data_axis, not both"):
    jaxaccum.multi_steps(optax.sgd(1.0), 2, axis_name="data", data_axis="data")
  for option in ({"mesh": mesh}, {"param_specs": P()}):
    with pytest.raises(ValueError, match="only used with data_axis="):
      jaxaccum.multi_steps(optax.sgd(1.0), 2, **option)
  with pytest.raises(TypeError, match="mesh="):
    jaxaccum.multi_steps(optax.sgd(1.0), 2, data_axis="data", mesh="data")
  with pytest.raises(TypeError, match="param_specs='data'.* must be a PartitionSpec"):
    jaxaccum.multi_steps(optax.sgd(1.0), 2, data_axis="data", param_specs="data")
  # Deferred gradients applied directly fail on their structure.
  with pytest.raises(ValueError):
    optax.apply_updates(params, deferred)


def _dense_loss(apply_fn):
  def dense_loss(params, batch):
    x, y = batch
    return 20.0 * jnp.mean((apply_fn(params, x) - y) ** 2)
  return dense_loss


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_flax_linen_train_state_recipe(axis_type):
  # jaxaccum.linen.TrainState(tx=multi_steps(data_axis=)) takes the deferred
  # gradients in apply_gradients, with weight= too.
  import flax.linen as nn

  mesh = _mesh("DDP", axis_type)
  model = nn.Dense(W2[1])
  host_params, batch = _problem()
  variables = model.init(jax.random.key(1), batch[0][:1])
  loss_fn = _dense_loss(model.apply)
  grad_fn = jaxaccum.value_and_grad(loss_fn, num_microbatches=1, data_axis="data", mesh=mesh,
                                    defer_reduction=True)
  ms = jaxaccum.multi_steps(_inner(), K, data_axis="data", mesh=mesh)

  @jax.jit
  def step(state, batch, weight):
    loss, grads = grad_fn(state.params, batch)
    return state.apply_gradients(grads=grads, weight=weight), loss

  calls = _calls(batch)
  weights = [1.0, 3.0, 2.0, 2.0]
  with jax.set_mesh(mesh):
    state = jaxaccum.linen.TrainState.create(
        apply_fn=model.apply, params=jax.device_put(variables, NamedSharding(mesh, P())), tx=ms)
    for call, w in zip(calls, weights):
      state, _ = step(state, jax.device_put(call, NamedSharding(mesh, P("data"))),
                      jnp.float32(w))
  assert int(state.step) == len(calls) and int(state.optimizer_step) == CYCLES
  inner, params = _inner(), variables
  inner_state = inner.init(params)
  for c in range(CYCLES):
    ids = range(c * K, (c + 1) * K)
    grads = jax.tree.map(lambda *g: sum(weights[i] * x for i, x in zip(ids, g)) / sum(
        weights[i] for i in ids), *[jax.grad(loss_fn)(params, calls[i]) for i in ids])
    updates, inner_state = inner.update(grads, inner_state, params)
    params = optax.apply_updates(params, updates)
  assert_rel_close(state.params, params)


def _dense_reference(params, calls):
  """An ``nnx.Linear``'s parameters after the inner optimizer ran once per cycle
  on the full batch of the cycle's calls, on one device."""
  apply = lambda p, x: x @ p["kernel"] + p["bias"]  # noqa: E731
  inner = _inner()
  inner_state = inner.init(params)
  for c in range(CYCLES):
    rows = jax.tree.map(lambda *a: jnp.concatenate(a), *calls[c * K:(c + 1) * K])
    grads = jax.grad(_dense_loss(apply))(params, rows)
    updates, inner_state = inner.update(grads, inner_state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_flax_nnx_optimizer_recipe():
  # nnx.Optimizer(model, multi_steps(data_axis=)) under nnx.jit: the
  # accumulator is built in the partial-sums form, ordinary gradients are
  # added without a second reduction, the model equals the reference.
  from flax import nnx

  mesh = _mesh("DDP", "Explicit")
  _, batch = _problem()
  calls = _calls(batch)
  with jax.set_mesh(mesh):
    model = nnx.Linear(W1[0], W2[1], rngs=nnx.Rngs(1))
    host_params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    optimizer = nnx.Optimizer(model, jaxaccum.multi_steps(_inner(), K, data_axis="data"),
                              wrt=nnx.Param)
    assert optimizer.opt_state.acc_grads["kernel"].shape == (8, *W1[:1], W2[1])

    def loss_fn(model, batch):
      x, y = batch
      return 20.0 * jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def step(model, optimizer, batch):
      optimizer.update(model, nnx.grad(loss_fn)(model, batch))

    for call in calls:
      step(model, optimizer, jax.device_put(call, NamedSharding(mesh, P("data"))))
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert_rel_close(got, _dense_reference(host_params, calls))


def test_flax_nnx_deferred_gradients_recipe():
  # jaxaccum.nnx(defer_reduction=True) gradients go to multi_steps directly
  # (nnx.Optimizer filters gradients as an nnx.State and cannot take them).
  from flax import nnx

  mesh = _mesh("DDP", "Explicit")
  _, batch = _problem()
  calls = _calls(batch)

  def loss_fn(model, x, y):
    return 20.0 * jnp.mean((model(x) - y) ** 2)

  with jax.set_mesh(mesh):
    model = nnx.Linear(W1[0], W2[1], rngs=nnx.Rngs(1))
    host_params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    ms = jaxaccum.multi_steps(_inner(), K, data_axis="data")
    opt_state = ms.init(nnx.state(model, nnx.Param))
    grad_fn = jaxaccum.nnx.value_and_grad(loss_fn, num_microbatches=2, batch_argnums=(1, 2),
                                          data_axis="data", defer_reduction=True)

    @nnx.jit
    def step(model, opt_state, x, y):
      _, grads = grad_fn(model, x, y)
      assert isinstance(grads, jaxaccum.DeferredGrads)
      params = nnx.state(model, nnx.Param)
      updates, opt_state = ms.update(grads, opt_state, params)
      nnx.update(model, optax.apply_updates(params, updates))
      return opt_state

    for x, y in calls:
      opt_state = step(model, opt_state, *jax.device_put((x, y), NamedSharding(mesh, P("data"))))
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert_rel_close(got, _dense_reference(host_params, calls))


def test_resume_from_a_mid_cycle_optax_multisteps_state():
  # state_from_optax places optax.MultiSteps' running sum in the rows of the
  # data_axis accumulator (FSDP parameters, Explicit axes); the cycle goes on
  # with the updates optax.MultiSteps gives.
  mesh = _mesh("FSDP", "Explicit")
  specs = LAYOUTS["FSDP"][3]
  host_params, batch = _problem()
  inner = optax.sgd(0.1, momentum=0.9)
  ours = jaxaccum.multi_steps(inner, 3, data_axis="data")
  theirs = standard_promotion(optax.MultiSteps(inner, 3).gradient_transformation())
  with jax.set_mesh(mesh):
    params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), host_params,
                          specs)
    grads = [jax.tree.map(lambda g, s: jax.device_put(g, NamedSharding(mesh, s)),
                          jax.grad(plain_loss)(host_params, c), specs) for c in _calls(batch)]
    s2 = theirs.init(params)
    _, s2 = theirs.update(grads[0], s2, params)
    s1 = ours.state_from_optax(s2)
    assert s1.acc_grads["w1"].shape == (8, *W1)
    update = jax.jit(ours.update)
    for g in grads[1:3]:
      u1, s1 = update(g, s1, params)
      u2, s2 = theirs.update(g, s2, params)
  assert bool(ours.has_updated(s1))
  assert_rel_close(u1, u2)
  _assert_sharded_like(u1, specs, mesh)
