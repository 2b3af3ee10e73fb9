"""Each option defined once: every entry point's signature is held to the
table in ``jaxaccum._core.options``, ``docs/options.md`` is generated from
it, and ``jaxaccum.DataAxis`` is the data-parallel plan shared by a step and
its optimizer."""

import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxaccum
import jaxaccum.nnx
from _models import assert_rel_close
from jaxaccum._core import options

DOCS = pathlib.Path(__file__).parent.parent / "docs"
# Documented exceptions: NNX differentiates Variables picked by `wrt` and
# reads nnx.Rngs / BatchStat from the module, where the core has rng_argnums
# and state_argnums.
NNX_ONLY, NNX_LEAVES_OUT = {"wrt"}, {"rng_argnums", "state_argnums"}


def _keywords(fn, skip):
  params = list(inspect.signature(fn).parameters.values())[skip:]
  return {p.name: p for p in params}


def _assert_defaults(params, entry):
  for o in options.taken_by(entry):
    default = params[o.name].default
    if o.default is options.REQUIRED:
      assert default is inspect.Parameter.empty, o.name
    else:
      assert default is o.default or default == o.default, (o.name, default, o.default)


@pytest.mark.parametrize("fn", [jaxaccum.value_and_grad, jaxaccum.grad])
def test_core_signatures_are_the_table(fn):
  params = _keywords(fn, 1)
  assert list(params) == [o.name for o in options.taken_by(options.VG)]
  assert all(p.kind is p.KEYWORD_ONLY for p in params.values())
  _assert_defaults(params, options.VG)


@pytest.mark.parametrize("fn", [jaxaccum.nnx.value_and_grad, jaxaccum.nnx.grad])
def test_nnx_signatures_are_the_table_with_documented_exceptions(fn):
  params = _keywords(fn, 1)
  want = [o.name for o in options.taken_by(options.NNX)]
  assert [n for n in params if n not in NNX_ONLY] == want
  assert not set(params) & NNX_LEAVES_OUT
  core = {o.name for o in options.taken_by(options.VG)}
  assert core - set(want) == NNX_LEAVES_OUT
  assert all(p.kind is p.KEYWORD_ONLY for p in params.values())
  _assert_defaults(params, options.NNX)


def test_multi_steps_signature_is_the_table():
  params = _keywords(jaxaccum.multi_steps, 1)
  assert set(params) == {o.name for o in options.taken_by(options.MS)}
  # optax.MultiSteps' positional order, then keyword-only options.
  assert list(params)[:3] == ["every_k_schedule", "use_grad_mean", "should_skip_update_fn"]
  _assert_defaults(params, options.MS)


def test_every_option_has_a_check_and_a_description():
  for o in options.OPTIONS.values():
    assert callable(o.check) and o.doc and o.takers, o.name


def test_docs_table_is_generated_from_the_table():
  assert options.markdown_table() in (DOCS / "options.md").read_text()


def test_unknown_options_name_themselves():
  with pytest.raises(TypeError, match="num_microbatch"):
    options.Options.create(num_microbatch=2)
  with pytest.raises(TypeError, match="memory_budget_bytes"):
    jaxaccum.plan_microbatches(lambda w, x: jnp.sum(w * x), jnp.ones(2), jnp.ones((4, 2)),
                               memory_budget_bytes=1)


def test_a_shared_check_has_one_message():
  """accumulator_dtype is checked by one definition for every entry point."""
  messages = []
  for build in (lambda: jaxaccum.value_and_grad(jnp.sum, num_microbatches=2,
                                                accumulator_dtype=jnp.int32),
                lambda: jaxaccum.nnx.grad(jnp.sum, num_microbatches=2,
                                          accumulator_dtype=jnp.int32),
                lambda: jaxaccum.multi_steps(optax.sgd(1.0), 2, accumulator_dtype=jnp.int32)):
    with pytest.raises(ValueError) as e:
      build()
    messages.append(str(e.value))
  assert len(set(messages)) == 1, messages


# --- jaxaccum.DataAxis ---


def _mesh(axis_type):
  return jax.make_mesh((8,), ("data",), axis_types=(getattr(AxisType, axis_type),))


def _loss(w, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ w) - y) ** 2)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_one_data_axis_configures_the_step_and_its_optimizer(axis_type):
  mesh = _mesh(axis_type)
  data = jaxaccum.DataAxis("data", mesh=mesh)
  k, n = 2, 2
  grad_fn = jaxaccum.value_and_grad(_loss, num_microbatches=n, data_axis=data,
                                    defer_reduction=True)
  ms = jaxaccum.multi_steps(optax.sgd(0.5), k, data_axis=data)

  @jax.jit
  def step(w, state, batch):
    _, grads = grad_fn(w, batch)
    updates, state = ms.update(grads, state, w)
    return optax.apply_updates(w, updates), state

  kx, ky = jax.random.split(jax.random.key(1))
  x, y = jax.random.normal(kx, (k * 32, 4)), jax.random.normal(ky, (k * 32, 3))
  w = jax.device_put(jnp.ones((4, 3)) / 4, NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):  # jax 0.7 places the eager init's zeros only under a mesh
    state = ms.init(w)
  for i in range(k):
    batch = jax.device_put((x[i::k], y[i::k]), NamedSharding(mesh, P("data")))
    w, state = step(w, state, batch)
  want = jnp.ones((4, 3)) / 4 - 0.5 * jax.grad(_loss)(jnp.ones((4, 3)) / 4, (x, y))
  assert_rel_close(w, want, 1e-5)


def test_keyword_spellings_build_the_same_data_axis():
  mesh = _mesh("Auto")
  specs = {"w": P()}
  vg = jaxaccum.value_and_grad(_loss, num_microbatches=2, data_axis="data", mesh=mesh,
                               param_specs=specs, fsdp_gather="per_microbatch")
  ms = jaxaccum.multi_steps(optax.sgd(1.0), 2, data_axis=("data",), mesh=mesh)
  want = jaxaccum.DataAxis("data", mesh=mesh, param_specs=specs,
                           fsdp_gather="per_microbatch")
  assert options.Options.create(num_microbatches=2, data_axis="data", mesh=mesh,
                                param_specs=specs, fsdp_gather="per_microbatch").data == want
  assert ms.config.data.data == jaxaccum.DataAxis("data", mesh=mesh)
  assert callable(vg)


def test_bare_name_takes_the_ambient_mesh():
  mesh = _mesh("Explicit")
  data = jaxaccum.DataAxis("data")
  with pytest.raises(ValueError, match=r"data_axis='data' names axes \['data'\]"):
    data.devices()
  with jax.set_mesh(mesh):
    assert data.devices() == 8
    assert jaxaccum.multi_steps(optax.sgd(1.0), 2, data_axis=data).init(
        jnp.zeros(3)).acc_grads.shape == (8, 3)


def test_data_axis_is_validated_once():
  mesh = _mesh("Explicit")
  with pytest.raises(ValueError, match=r"\['mesh'\] given both as keywords and in data_axis="):
    jaxaccum.value_and_grad(_loss, num_microbatches=2,
                            data_axis=jaxaccum.DataAxis("data", mesh=mesh), mesh=mesh)
  with pytest.raises(ValueError, match="given both as keywords"):
    jaxaccum.multi_steps(optax.sgd(1.0), 2, data_axis=jaxaccum.DataAxis("data"),
                         param_specs=P())
  with pytest.raises(TypeError, match="fsdp_gather"):
    jaxaccum.DataAxis("data", fsdp_gather=1)
  with pytest.raises(ValueError, match="fsdp_gather='never'"):
    jaxaccum.DataAxis("data", fsdp_gather="never")
  with pytest.raises(TypeError, match="mesh="):
    jaxaccum.DataAxis("data", mesh="data")
  with pytest.raises(TypeError, match="param_specs="):
    jaxaccum.DataAxis("data", param_specs="data")
  with pytest.raises(ValueError, match="at least one"):
    jaxaccum.DataAxis(())
  with pytest.raises(ValueError, match="at least one"):
    jaxaccum.DataAxis(None)
  with pytest.raises(ValueError, match=r"data_axis='batch' names axes \['batch'\]"):
    jaxaccum.DataAxis("batch", mesh=mesh)  # a mesh known now is checked now
  with pytest.raises(ValueError, match="not both"):
    jaxaccum.multi_steps(optax.sgd(1.0), 2, axis_name="data",
                         data_axis=jaxaccum.DataAxis("data"))


# --- jaxaccum.nnx takes the core's in_axes and num_real_microbatches ---


def _nnx_setup():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (8, 3))
  y = jax.random.normal(jax.random.key(3), (8, 2))
  return model, x, y


def _nnx_loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def _assert_nnx_close(got, want):
  (value, grads), (ref_value, ref_grads) = got, want
  assert_rel_close(value, ref_value, 1e-5)
  for path in (("kernel",), ("bias",)):
    assert_rel_close(grads[path[0]][...], ref_grads[path[0]][...], 1e-5)


def test_nnx_in_axes_time_major():
  model, x, y = _nnx_setup()
  time_major = jnp.swapaxes(x[:, None, :].repeat(2, 1), 0, 1)  # (2, 8, 3)

  def loss(model, xs, y):
    return _nnx_loss(model, xs[0], y)

  got = nnx.jit(jaxaccum.nnx.value_and_grad(loss, num_microbatches=4, batch_argnums=(1, 2),
                                            in_axes=(1, 0)))(model, time_major, y)
  _assert_nnx_close(got, nnx.value_and_grad(_nnx_loss)(model, x, y))


@pytest.mark.parametrize("n", [1, 3])
def test_nnx_real_microbatches_equal_their_rows(n):
  model, x, y = _nnx_setup()
  rows = np.arange(8) % 4 < n

  @nnx.jit
  def step(model, x, y, real):
    return jaxaccum.nnx.value_and_grad(_nnx_loss, num_microbatches=4, batch_argnums=(1, 2),
                                       num_real_microbatches=real)(model, x, y)

  want = nnx.value_and_grad(_nnx_loss)(model, x[rows], y[rows])
  _assert_nnx_close(step(model, x, y, jnp.int32(n)), want)
  static = jaxaccum.nnx.value_and_grad(_nnx_loss, num_microbatches=4, batch_argnums=(1, 2),
                                       num_real_microbatches=n)(model, x, y)
  _assert_nnx_close(static, want)
