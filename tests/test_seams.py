"""Where deferred gradients, checkpoints and keyword batches meet other code.

Each test is one case that gave a plausible wrong number or a cryptic error:
it now gives the number of plain ``jax.value_and_grad`` / optax under
``jax.jit`` (8 simulated CPU devices where it is about devices), or an error
naming the option and the fix.
"""

import tempfile

import flax.serialization
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxaccum
from _models import assert_rel_close, standard_promotion

K = 3  # calls per cycle


def loss(params, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


def _problem():
  kw, kv, kx = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(kw, (4, 8)) / 3, "v": jax.random.normal(kv, (8, 1))}
  x = jax.random.normal(kx, (K * 16, 4))
  return params, (x, jnp.sin(x[:, :1]))


def _mesh(devices, axis_type=AxisType.Explicit):
  return jax.make_mesh((devices,), ("data",), axis_types=(axis_type,),
                       devices=jax.devices()[:devices])


def _ms(devices):
  """``multi_steps`` of sgd: with ``data_axis`` on ``devices`` devices, or
  without it (``devices=None``)."""
  if devices is None:
    return jaxaccum.multi_steps(optax.sgd(1.0), K)
  return jaxaccum.multi_steps(optax.sgd(1.0), K, data_axis="data")


def _deferred_grad_fn():
  return jaxaccum.value_and_grad(loss, num_microbatches=2, data_axis="data",
                                 defer_reduction=True)


def _step(grad_fn, tx):
  """The jitted train step: ``grad_fn``'s gradients through ``tx``."""
  @jax.jit
  def step(params, state, batch):
    _, grads = grad_fn(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _train(devices, params, state, calls, defer):
  """``calls`` through ``multi_steps`` on a mesh of ``devices`` (``None``: one
  device, no ``data_axis``), deferred gradients or ordinary ones."""
  ms, mesh = _ms(devices), _mesh(devices or 1)
  step = _step(_deferred_grad_fn() if defer else jax.value_and_grad(loss), ms)
  with jax.set_mesh(mesh):
    params = jax.device_put(params, NamedSharding(mesh, P()))
    if state is None:
      state = ms.init(params)
    for call in calls:
      params, state = step(params, state, jax.device_put(call, NamedSharding(mesh, P("data"))))
  return jax.device_get(params), state


def _target(devices):
  """The state ``init`` gives on ``devices`` (the restore target)."""
  with jax.set_mesh(_mesh(devices or 1)):
    return _ms(devices).init(_problem()[0])


def _reference():
  """One sgd step on the whole batch: what the cycle of ``K`` calls gives."""
  params, batch = _problem()
  return jax.jit(lambda p: optax.apply_updates(
      p, jax.tree.map(lambda g: -g, jax.grad(loss)(p, batch))))(params)


def _calls():
  _, (x, y) = _problem()
  return [(x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]) for i in range(K)]


# (saved on, restored on, deferred gradients): devices along data_axis, None
# for a multi_steps without data_axis.
CASES = [(1, 8, True), (None, 8, False), (8, 4, False), (8, None, False)]


@pytest.mark.parametrize("saved,restored,defer", CASES)
def test_flax_serialization_across_device_counts(saved, restored, defer):
  # A state saved mid-cycle goes on exactly, whatever the data-axis size it
  # was saved with: the saved rows are summed, never broadcast (1 -> 8 used
  # to count the saved sum 8 times; 8 -> 4 was a broadcasting error).
  params, calls = _problem()[0], _calls()
  params, state = _train(saved, params, None, calls[:1], defer and saved is not None)
  blob = flax.serialization.to_bytes(state)
  state = flax.serialization.from_bytes(_target(restored), blob)
  got, state = _train(restored, params, state, calls[1:], defer and restored is not None)
  assert bool(jaxaccum.has_updated(state))
  assert_rel_close(got, _reference())


@pytest.mark.parametrize("saved,restored", [(1, 8), (8, 4), (None, 8), (8, None)])
def test_orbax_across_device_counts(saved, restored):
  # orbax restores an array only into its saved shape: the target's
  # accumulator takes the saved form (docs/multi_steps.md), on the new mesh;
  # multi_steps converts it on the first update.
  ocp = pytest.importorskip("orbax.checkpoint")
  params, calls = _problem()[0], _calls()
  params, state = _train(saved, params, None, calls[:1], False)
  path = tempfile.mkdtemp() + "/checkpoint"
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state)
  mesh = _mesh(restored or 1)
  replicated = NamedSharding(mesh, P())
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        _target(restored))
  rows = () if saved is None else (saved,)
  target = target._replace(acc_grads=jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(rows + a.shape, a.dtype, sharding=replicated),
      jax.eval_shape(lambda: params)))
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(path, target)
  got, _ = _train(restored, params, state, calls[1:], False)
  assert_rel_close(got, _reference())


def test_an_accumulator_of_other_parameters_is_an_error():
  state = _target(8)
  state = state._replace(acc_grads=jax.tree.map(lambda a: jnp.zeros((8, 2, *a.shape[1:])),
                                                state.acc_grads))
  with pytest.raises(ValueError, match="data_axis"):
    _train(8, _problem()[0], state, _calls()[:1], False)


def _deferred_step(tx):
  """A jitted step applying ``tx`` to DeferredGrads on 8 devices."""
  step, mesh, (params, batch) = _step(_deferred_grad_fn(), tx), _mesh(8), _problem()
  with jax.set_mesh(mesh):
    params = jax.device_put(params, NamedSharding(mesh, P()))
    step(params, tx.init(params), jax.device_put(batch, NamedSharding(mesh, P("data"))))


def test_a_transformation_before_multi_steps_on_deferred_gradients_is_an_error():
  # clip_by_global_norm before multi_steps(data_axis=) would measure the
  # stacked partial sums (the update's norm came out 0.231 for a clip at 0.1).
  tx = optax.chain(optax.clip_by_global_norm(0.1),
                   jaxaccum.multi_steps(optax.sgd(1.0), 1, data_axis="data"))
  with pytest.raises(ValueError, match=r"multi_steps\(data_axis=.*inner optimizer"):
    _deferred_step(tx)
  # Inside the inner optimizer, the clip sees the reduced gradient.
  _deferred_step(jaxaccum.multi_steps(optax.chain(optax.clip_by_global_norm(0.1),
                                                  optax.sgd(1.0)), 1, data_axis="data"))


def _boundaries(launder):
  """DeferredGrads from a jitted gradient function (called three times: jit's
  fast path from the second call on), each handed through ``launder`` to an
  eager ``multi_steps`` update; the parameters after one cycle, and the
  reference (sgd on the sum over the devices' rows of each call)."""
  grad_fn = jax.jit(_deferred_grad_fn())
  ms = jaxaccum.multi_steps(optax.sgd(1.0), K, data_axis="data")
  mesh, (params, batch) = _mesh(8), _problem()
  want = jax.tree.map(lambda p, g: p - g, params, jax.grad(loss)(params, batch))
  with jax.set_mesh(mesh):
    params = jax.device_put(params, NamedSharding(mesh, P()))
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    state = ms.init(params)
    for _ in range(K):
      updates, state = ms.update(launder(grad_fn(params, batch)[1]), state, params)
    return optax.apply_updates(params, updates), want


@pytest.mark.parametrize("launder", [lambda g: g, jax.device_put, jax.jit(lambda g: g)],
                         ids=["as-is", "device_put", "jit-identity"])
def test_deferred_gradients_through_transformation_boundaries_are_exact(launder):
  got, want = _boundaries(launder)
  assert_rel_close(got, want, 1e-5)


def test_deferred_gradients_through_equinox_filter_jit_are_exact():
  eqx = pytest.importorskip("equinox")
  got, want = _boundaries(eqx.filter_jit(lambda g: g))
  assert_rel_close(got, want, 1e-5)


@pytest.mark.parametrize("launder", [
    jax.jit(lambda g: jax.tree.map(lambda a: 2 * a, g)),
    jax.jit(lambda g: optax.clip_by_global_norm(0.1).update(g, optax.EmptyState())[0]),
], ids=["tree.map-in-jit", "clip-in-jit"])
def test_a_transformation_inside_jit_is_still_an_error(launder):
  with pytest.raises(ValueError, match=r"rebuilt by a pytree operation"):
    _boundaries(launder)


@pytest.mark.parametrize("tx", [optax.adamw(1e-3), optax.sgd(0.1),
                                optax.MultiSteps(optax.sgd(0.1), 2).gradient_transformation()],
                         ids=["adamw", "apply_updates", "optax.MultiSteps"])
def test_deferred_gradients_elsewhere_name_multi_steps(tx):
  with pytest.raises(ValueError, match=r"multi_steps\(data_axis=\)"):
    _deferred_step(tx)


def _nnx_optimizer_run(tx_of):
  """Two calls of ``nnx.Optimizer(model, tx_of(ms))`` on deferred gradients, and
  plain sgd once on both calls' rows."""
  from flax import nnx

  mesh = _mesh(8)
  _, (x, y) = _problem()
  loss = lambda m, x, y: jnp.mean((m(x) - y) ** 2)  # noqa: E731
  grad_fn = jaxaccum.nnx.grad(loss, num_microbatches=2, batch_argnums=(1, 2),
                              data_axis="data", defer_reduction=True)
  ref = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
  want = jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(ref, nnx.Param),
                      nnx.grad(loss)(ref, x[:32], y[:32]))
  with jax.set_mesh(mesh):
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    ms = jaxaccum.multi_steps(optax.sgd(0.1), 2, data_axis="data")
    optimizer = nnx.Optimizer(model, tx_of(ms), wrt=nnx.Param)
    step = nnx.jit(lambda m, o, x, y: o.update(m, grad_fn(m, x, y)))
    for i in range(2):
      step(model, optimizer, *jax.device_put((x[i:32:2], y[i:32:2]),
                                             NamedSharding(mesh, P("data"))))
    return nnx.state(model, nnx.Param), want


def test_deferred_gradients_through_nnx_optimizer_are_exact():
  got, want = _nnx_optimizer_run(lambda ms: ms)
  assert_rel_close(got, want, 1e-5)


def test_a_transformation_between_nnx_optimizer_and_multi_steps_is_an_error():
  with pytest.raises(TypeError, match="nnx.Optimizer.*inner optimizer.*docs/flax.md"):
    _nnx_optimizer_run(lambda ms: optax.chain(optax.clip_by_global_norm(0.1), ms))


def test_deferred_gradients_through_nnx_optimizer_to_multi_steps_without_data_axis():
  with pytest.raises(TypeError, match=r"without data_axis; pass multi_steps\(\.\.\., data_axis="):
    _nnx_optimizer_run(lambda ms: jaxaccum.multi_steps(optax.sgd(0.1), 2))


def _grad_on(mesh, fun, *args, **kwargs):
  """``jaxaccum.grad`` of ``fun`` deferred over ``mesh``'s data axis, reduced."""
  options = kwargs.pop("options")
  with jax.set_mesh(mesh):
    g = jaxaccum.grad(fun, data_axis="data", **options)
    args = jax.device_put(args, NamedSharding(mesh, P()))
    out = jax.jit(lambda *a: g(*a, **kwargs))(*args)
  return out.partials.sum(0) if options.get("defer_reduction") else out


def test_static_arguments_with_defer_reduction():
  # A string keyword and a Python bool the loss branches on stay static.
  def fun(w, x, flag, mode="square"):
    y = x @ w
    return jnp.mean(y ** 2 if mode == "square" else y) if flag else jnp.mean(jnp.abs(y))

  w, x = jnp.ones(4), _problem()[1][0]
  options = {"num_microbatches": 2, "defer_reduction": True}
  got = _grad_on(_mesh(8), lambda w, x: fun(w, x, True, mode="linear"), w, x, options=options)
  want = jax.jit(jax.grad(lambda w, x: fun(w, x, True, mode="linear")))(w, x)
  assert_rel_close(got, want)
  mesh = _mesh(8)
  with jax.set_mesh(mesh):
    g = jaxaccum.grad(fun, data_axis="data", **options)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    got = jax.jit(lambda w, x: g(w, x, False, mode="linear").partials.sum(0))(w, xs)
  assert_rel_close(got, jax.jit(jax.grad(fun), static_argnums=2)(w, x, False))


@pytest.mark.parametrize("option,defer,axis_type", [
    ("weight_fn", True, AxisType.Explicit), ("weight_fn", False, AxisType.Auto),
    ("skip_nonfinite", False, AxisType.Explicit), ("skip_nonfinite", True, AxisType.Auto)])
def test_one_device_data_axis_with_one_microbatch(option, defer, axis_type):
  value = {"weight_fn": lambda x: jnp.float32(x.shape[0]), "skip_nonfinite": True}[option]
  fun = lambda w, x: jnp.mean((x @ w) ** 2)  # noqa: E731
  w, x = jnp.ones(4), _problem()[1][0]
  options = {"num_microbatches": 1, option: value, "defer_reduction": defer}
  got = _grad_on(_mesh(1, axis_type), fun, w, x, options=options)
  assert_rel_close(got, jax.jit(jax.grad(fun))(w, x))


def test_weight_fn_with_a_keyword_batch():
  # batch_argnums=1 names "batch"; passed by keyword, weight_fn still gets it
  # by position.
  params, batch = _problem()
  g = jaxaccum.grad(loss, num_microbatches=4, weight_fn=lambda b: jnp.float32(b[0].shape[0]))
  got = jax.jit(lambda p, b: g(p, batch=b))(params, batch)
  assert_rel_close(got, jax.jit(jax.grad(loss))(params, batch))


@pytest.mark.parametrize("name", ["scaled_value_and_grad", "dynamic_scale_value_and_grad"])
def test_linen_loss_scale_with_a_keyword_batch(name):
  from flax.training.dynamic_scale import DynamicScale

  params, batch = _problem()
  fn = getattr(jaxaccum.linen, name)(DynamicScale(), loss, num_microbatches=4)
  got = jax.jit(lambda p, b: fn(p, batch=b))(params, batch)[-1]
  assert_rel_close(got, jax.jit(jax.grad(loss))(params, batch))


@pytest.mark.parametrize("by_keyword", [False, True])
def test_nnx_batch_argnames_naming_a_positional_parameter(by_keyword):
  from flax import nnx

  def fun(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)

  _, batch = _problem()
  model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
  g = jaxaccum.nnx.grad(fun, num_microbatches=4, batch_argnames="batch")
  got = nnx.jit(lambda m, b: g(m, batch=b) if by_keyword else g(m, b))(model, batch)
  want = nnx.jit(nnx.grad(fun))(model, batch)
  assert_rel_close(nnx.to_pure_dict(got), nnx.to_pure_dict(want))


def test_multi_steps_in_a_shard_map_over_varying_parameters():
  # Without axis_name each device runs its own optimizer, as optax.MultiSteps.
  mesh = _mesh(8, AxisType.Auto)
  params = {"w": jnp.arange(8.0)[:, None] * jnp.ones((8, 3))}
  grads = {"w": jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)}

  def run(tx):
    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
    def step(params, grads):
      state = tx.init(params)
      for _ in range(4):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
      return params

    return step(params, grads)

  inner = optax.sgd(0.1, momentum=0.9)
  want = run(standard_promotion(optax.MultiSteps(inner, 2).gradient_transformation()))
  assert_rel_close(run(jaxaccum.multi_steps(inner, 2)), want)


def test_a_batch_sized_differentiated_argument_is_named():
  def fun(w, scale, x):
    return jnp.mean((x @ w) * scale)

  _, (x, _) = _problem()
  g = jaxaccum.grad(fun, num_microbatches=4, argnums=1, batch_argnums=2)
  with pytest.raises(TypeError, match="differentiated argument 1.*batch_argnums"):
    jax.jit(g)(jnp.ones(4), jnp.ones(x.shape[0]), x)


def test_nnx_names_a_batch_sized_differentiated_argument():
  from flax import nnx

  def fun(model, scale, x):
    return jnp.mean(model(x) * scale)

  _, (x, _) = _problem()
  g = jaxaccum.nnx.grad(fun, num_microbatches=4, argnums=(0, 1), batch_argnums=2)
  with pytest.raises(TypeError, match=r"differentiated argument\(s\) \[1\].*batch_argnums"):
    nnx.jit(g)(nnx.Linear(4, 1, rngs=nnx.Rngs(0)), jnp.ones((x.shape[0], 1)), x)


def test_a_data_axis_state_restored_under_axis_name_is_an_error():
  mesh = _mesh(8)
  params = {"w": jnp.zeros((3, 2))}
  ms = jaxaccum.multi_steps(optax.sgd(1.0), K, data_axis="data")
  with jax.set_mesh(mesh):
    _, saved = jax.jit(ms.update)({"w": jnp.ones((3, 2))}, ms.init(params), params)
  under_pmap = jaxaccum.multi_steps(optax.sgd(1.0), K, axis_name="data")
  auto = _mesh(8, AxisType.Auto)
  step = jax.shard_map(lambda s, g: under_pmap.update(g, s, params)[0], mesh=auto,
                       in_specs=(P(), P()), out_specs=P(), check_vma=False)
  with pytest.raises(ValueError, match=r"axis_name=.*saved with data_axis"):
    step(jax.device_get(saved), {"w": jnp.ones((3, 2))})


def test_nnx_optimizer_with_deferred_gradients_resumes_on_another_device_count():
  from flax import nnx

  loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)  # noqa: E731
  _, (x, y) = _problem()
  calls = [(x[i:32:2], y[i:32:2]) for i in range(2)]

  def run(devices, call, restored=None):
    mesh = _mesh(devices)
    with jax.set_mesh(mesh):
      model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, jaxaccum.multi_steps(optax.sgd(0.1), 2, data_axis="data"),
                                wrt=nnx.Param)
      if restored is not None:
        nnx.update(optimizer, restored)
      grad_fn = jaxaccum.nnx.grad(loss_fn, num_microbatches=2, batch_argnums=(1, 2),
                                  data_axis="data", defer_reduction=True)
      nnx.jit(lambda m, o, x, y: o.update(m, grad_fn(m, x, y)))(
          model, optimizer, *jax.device_put(calls[call], NamedSharding(mesh, P("data"))))
      return jax.device_get(nnx.state(optimizer)), nnx.state(model, nnx.Param)

  saved, _ = run(8, 0)                     # mid-cycle on 8 devices
  _, got = run(4, 1, restored=saved)       # the cycle ends on 4
  ref = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
  want = jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(ref, nnx.Param),
                      nnx.grad(loss_fn)(ref, x[:32], y[:32]))
  assert_rel_close(got, want, 1e-5)
