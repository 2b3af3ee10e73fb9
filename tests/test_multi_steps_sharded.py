"""``multi_steps(data_axis=...)`` under plain ``jax.jit``, on 8 simulated CPU devices.

For each layout (data parallel, FSDP, tensor parallel, HSDP) on Explicit and
Auto meshes, a training step takes gradients whose reduction is deferred
(:class:`jaxaccum.DeferredGrads`) and ``multi_steps`` reduces them once per
cycle: the parameters equal the inner optimizer run once per cycle on the
full batch of all ``k`` calls' rows on one device; updates and state keep
the parameters' sharding; and the compiled update runs no collective on the
``k - 1`` accumulating calls and, on the completing call, exactly the
reduction the layout needs, inside the conditional.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxaccum
from _models import assert_rel_close, standard_promotion
from jaxaccum import _compat, _sharded

K = 2  # calls per cycle
CYCLES = 2
ROWS = 16  # rows per call: 2 per device
W1, W2 = (16, 32), (32, 8)

# layout -> (mesh shape, mesh axes, data axes, parameter specs)
LAYOUTS = {
    "DDP": ((8,), ("data",), ("data",), {"w1": P(), "w2": P()}),
    "FSDP": ((8,), ("data",), ("data",), {"w1": P("data", None), "w2": P("data", None)}),
    "TP": ((4, 2), ("data", "model"), ("data",), {"w1": P(None, "model"), "w2": P("model", None)}),
    "HSDP": ((2, 4), ("replica", "shard"), ("replica", "shard"),
             {"w1": P("shard", None), "w2": P("shard", None)}),
}

# layout -> the completing call's collectives in the update (kind: (count,
# bytes per device)), all inside the conditional; the k - 1 other calls run
# none. The gradients are 3072 B; FSDP reduce-scatters them into the
# parameters' shards (2 leaves), tensor parallel all-reduces each device's
# half (1536 B), HSDP reduce-scatters over "shard" and all-reduces the shard
# (768 B) over "replica". The rest (4 or 8 B) are the partial sums of the
# global norm that clip_by_global_norm takes of sharded gradients.
EXPECTED = {
    "DDP": {"all_reduce": (1, 3072)},
    "FSDP": {"reduce_scatter": (2, 3072), "all_reduce": (1, 8)},
    "TP": {"all_reduce": (2, 1544)},
    "HSDP": {"reduce_scatter": (2, 3072), "all_reduce": (2, 776)},
}
KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "collective_permute")


def loss(params, batch):
  """Mean squared error of a two-layer tanh network, scaled so that the
  inner optimizer's global-norm clipping is active."""
  x, y = batch
  h = jnp.tanh(x @ params["w1"])
  mesh = jax.sharding.get_abstract_mesh()
  # Explicit tensor parallelism: the contraction over "model" is reduced.
  explicit_model = "model" in mesh.axis_names and (
      dict(zip(mesh.axis_names, mesh.axis_types))["model"] == AxisType.Explicit)
  out = jnp.einsum("bh,ho->bo", h, params["w2"],
                   **({"out_sharding": P()} if explicit_model else {}))
  return 20.0 * jnp.mean((out - y) ** 2)


def deferred_value_and_grad(loss, axes, specs, explicit):
  """``(value, DeferredGrads)`` of a mean loss over a batch sharded over ``axes``.

  A hand-written ``shard_map`` over the data axes: each device differentiates
  its rows with device-varying parameters (so nothing is reduced), and
  returns its partial sum at its row of a leading device axis.
  """
  entry = axes if len(axes) > 1 else axes[0]

  def value_and_grad(params, batch):
    mesh = jax.sharding.get_abstract_mesh()
    devices = int(np.prod([dict(mesh.shape)[a] for a in axes]))
    if explicit:  # shard_map does not reshard inputs on Explicit axes
      params = jax.tree.map(lambda p, s: jax.sharding.reshard(
          p, _sharded.without(s, axes, p.ndim)), params, specs)

    def local(params, batch):
      value, grads = jax.value_and_grad(loss)(_compat.pcast_to_varying(params, axes), batch)
      return lax.psum(value, axes) / devices, jax.tree.map(lambda g: (g / devices)[None], grads)

    value, partials = jax.shard_map(local, in_specs=(P(), P(entry)), out_specs=(P(), P(entry)),
                                    axis_names=frozenset(axes))(params, batch)
    return value, jaxaccum.DeferredGrads(partials, axes)

  return value_and_grad


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
    updates, state = inner.update(jax.grad(loss)(params, rows), state, params)
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


def _setup(layout, axis_type, **options):
  """``multi_steps``, its jitted train step, the gradient function, sharded
  parameters and calls, and the mesh."""
  _, _, axes, specs = LAYOUTS[layout]
  mesh = _mesh(layout, axis_type)
  entry = axes if len(axes) > 1 else axes[0]
  # On Auto axes a parameter's sharding is invisible inside jit: pass it.
  extra = {"param_specs": specs} if axis_type == "Auto" else {}
  ms = jaxaccum.multi_steps(_inner(), K, data_axis=entry, **extra, **options)
  grad_fn = deferred_value_and_grad(loss, axes, specs, axis_type == "Explicit")

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
    want = NamedSharding(mesh, P(*lead, *_sharded.without(specs[name], lead, a.ndim - len(lead))))
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
  assert_rel_close(params, _reference(*_problem()))
  _assert_sharded_like(params, specs, mesh)
  entry = axes if len(axes) > 1 else axes[0]
  for name, acc in state.acc_grads.items():
    want = P(entry, *_sharded.without(specs[name], axes, acc.ndim - 1))
    assert acc.sharding.is_equivalent_to(NamedSharding(mesh, want), acc.ndim), (name, acc)
  # The update: nothing on the k - 1 accumulating calls; the reduction, in
  # the conditional, on the completing call.
  assert every_call(update_counts) == {}, update_counts
  assert _by_kind(update_counts, "in_conditionals") == EXPECTED[layout], update_counts
  # The whole step: the same conditional; every call only what the gradient
  # function itself does (the loss value, tensor-parallel activations, and
  # FSDP's parameter gathers), no gradient reduction.
  assert _by_kind(step_counts, "in_conditionals") == EXPECTED[layout], step_counts
  calls_every = every_call(step_counts)
  assert "reduce_scatter" not in calls_every, step_counts
  assert calls_every.get("all_reduce", (0, 0))[1] < 4 * W2[0] * W2[1] // 4, step_counts
