"""``data_axis`` over sharded parameters, on 8 simulated CPU devices.

For each layout (data parallel, FSDP in both ``fsdp_gather`` modes, tensor
parallel, HSDP, FSDP + tensor parallel) on Explicit and Auto meshes: the
result equals
``jax.value_and_grad`` on the whole batch on one device, the gradients come
back with the parameters' sharding, and the compiled step's collectives
(counts and bytes, inside and outside the micro-batch loop) are exactly the
ones the layout needs: for the default mode nothing gradient-sized runs in
the loop, and nothing is all-gathered that the loss under plain ``jit`` does
not gather (no tensor-parallel dimension), with or without
``defer_reduction``, also where the loss runs under ``shard_map``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxaccum
from _models import assert_rel_close
from jaxaccum import _compat

# A loss written for explicit sharding names the data axes itself, so it runs
# only where jax can defer the reduction with reduced / unreduced types.
needs_reduced = pytest.mark.skipif(
    not _compat.has_reduced_specs(),
    reason="this jax has no reduced / unreduced sharding (jax 0.8 on)")

N = 4
B = 64
W1, W2 = (16, 32), (32, 8)
PARAM_BYTES = 4 * (16 * 32 + 32 * 8)  # 3072

# layout -> (mesh shape, mesh axes, data_axis, parameter specs)
LAYOUTS = {
    "DDP": ((8,), ("data",), "data", {"w1": P(), "w2": P()}),
    "FSDP": ((8,), ("data",), "data", {"w1": P("data", None), "w2": P("data", None)}),
    "TP": ((4, 2), ("data", "model"), "data", {"w1": P(None, "model"), "w2": P("model", None)}),
    "HSDP": ((2, 4), ("replica", "shard"), ("replica", "shard"),
             {"w1": P("shard", None), "w2": P("shard", None)}),
    "FSDP+TP": ((4, 2), ("data", "model"), "data",
                {"w1": P("data", "model"), "w2": P("model", "data")}),
}

# (layout, axis type, fsdp_gather) -> collectives (kind: count, bytes) inside
# and outside the loop. Bytes are per device (see count_collectives).
# Explicit axes: the loss reduces its own value (4 B) in every micro-batch;
# XLA:CPU reshards an unreduced gradient into FSDP shards by all-reduce + slice.
EXPECTED = {
    ("DDP", "Explicit", "once"): ({"all_reduce": (1, 4)}, {"all_reduce": (1, 3072)}),
    ("DDP", "Auto", "once"): ({}, {"all_reduce": (1, 3076)}),
    ("FSDP", "Explicit", "once"): (
        {"all_reduce": (1, 4)}, {"all_gather": (2, 3072), "all_reduce": (1, 3072)}),
    ("FSDP", "Explicit", "per_microbatch"): (
        {"all_gather": (2, 3072), "all_reduce": (1, 3076)}, {}),
    ("FSDP", "Auto", "once"): (
        {}, {"all_gather": (2, 3072), "reduce_scatter": (2, 3072), "all_reduce": (1, 4)}),
    ("FSDP", "Auto", "per_microbatch"): (
        {"all_gather": (2, 3072), "reduce_scatter": (2, 3072)}, {"all_reduce": (1, 4)}),
    # Tensor parallel: the model-axis activation reduction (128 B) is inherent
    # to the layout; the data reduction is P / 2 per device, after the loop.
    ("TP", "Explicit", "once"): ({"all_reduce": (2, 132)}, {"all_reduce": (1, 1536)}),
    ("TP", "Auto", "once"): ({"all_reduce": (1, 128)}, {"all_reduce": (1, 1540)}),
    ("HSDP", "Explicit", "once"): (
        {"all_reduce": (1, 4)}, {"all_gather": (2, 3072), "all_reduce": (1, 3072)}),
    # Per micro-batch only the shard axis: the replica reduction (P / 4) is once.
    ("HSDP", "Explicit", "per_microbatch"): (
        {"all_gather": (2, 3072), "all_reduce": (2, 3076)}, {"all_reduce": (1, 768)}),
    ("HSDP", "Auto", "once"): (
        {}, {"all_gather": (2, 3072), "reduce_scatter": (2, 3072), "all_reduce": (2, 772)}),
    ("HSDP", "Auto", "per_microbatch"): (
        {"all_gather": (2, 3072), "reduce_scatter": (2, 3072)}, {"all_reduce": (2, 772)}),
    # FSDP + TP: the gathers and reductions over "data" move each device's
    # half (1536 B); nothing is gathered over "model".
    ("FSDP+TP", "Explicit", "once"): (
        {"all_reduce": (2, 132)}, {"all_gather": (2, 1536), "all_reduce": (1, 1536)}),
    ("FSDP+TP", "Explicit", "per_microbatch"): (
        {"all_gather": (2, 1536), "all_reduce": (2, 1668)}, {}),
    ("FSDP+TP", "Auto", "once"): (
        {"all_reduce": (1, 128)},
        {"all_gather": (2, 1536), "reduce_scatter": (2, 1536), "all_reduce": (1, 4)}),
    ("FSDP+TP", "Auto", "per_microbatch"): (
        {"all_reduce": (1, 128), "all_gather": (2, 1536), "reduce_scatter": (2, 1536)},
        {"all_reduce": (1, 4)}),
}


def explicit_loss(params, batch):
  """A loss written for explicit sharding: it names the data axes itself."""
  x, y = batch
  mesh = jax.sharding.get_abstract_mesh()
  data = tuple(a for a in mesh.axis_names if a != "model")
  data = data[0] if len(data) == 1 else data
  hidden = P(data, "model") if "model" in mesh.axis_names else P(data, None)
  h = jnp.tanh(jnp.einsum("bi,ih->bh", x, params["w1"], out_sharding=hidden))
  out = jnp.einsum("bh,ho->bo", h, params["w2"], out_sharding=P(data, None))
  return jnp.mean((out - y) ** 2)


def auto_loss(params, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)


def biased_loss(params, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] - y) ** 2)


def sharded_loss(params, batch):
  """:func:`explicit_loss` (plus a bias ``b1`` where ``params`` has one) naming
  the data axes only where they are Explicit, not manual (under shard_map)."""
  x, y = batch
  mesh = jax.sharding.get_abstract_mesh()
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  data = tuple(a for a in mesh.axis_names if a != "model" and types[a] == AxisType.Explicit)
  data = None if not data else data[0] if len(data) == 1 else data
  hidden = P(data, "model") if "model" in mesh.axis_names else P(data, None)
  h = jnp.einsum("bi,ih->bh", x, params["w1"], out_sharding=hidden) + params.get("b1", 0.0)
  out = jnp.einsum("bh,ho->bo", jnp.tanh(h), params["w2"], out_sharding=P(data, None))
  return jnp.mean((out - y) ** 2)


def _problem():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k1, W1) / 4, "w2": jax.random.normal(k2, W2) / 6}
  x = jax.random.normal(k3, (B, W1[0]))
  return params, (x, jnp.sin(x[:, :W2[1]]))


def _mesh(layout, axis_type):
  shape, names, _, _ = LAYOUTS[layout]
  return jax.make_mesh(shape, names, axis_types=(getattr(AxisType, axis_type),) * len(names))


def _setup(layout, axis_type, mode):
  """The jitted step, its sharded arguments, and the mesh."""
  _, _, data_axis, specs = LAYOUTS[layout]
  mesh = _mesh(layout, axis_type)
  params, batch = _problem()
  params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
  batch = jax.device_put(batch, NamedSharding(mesh, P(data_axis)))
  loss = explicit_loss if axis_type == "Explicit" else auto_loss
  # On Auto axes a parameter's sharding is invisible inside jit: pass it.
  extra = {"param_specs": specs} if axis_type == "Auto" else {}
  step = jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=N, data_axis=data_axis,
                                         fsdp_gather=mode, **extra))
  return step, (params, batch), mesh


def _by_kind(counts, where):
  n, size = getattr(counts, where), getattr(counts.bytes, where)
  return {k: (getattr(n, k), getattr(size, k)) for k in
          ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "collective_permute")
          if getattr(n, k)}


def _params(cases):
  """The cases, those on Explicit axes marked ``needs_reduced``."""
  return [pytest.param(*c, marks=needs_reduced) if "Explicit" in c else c for c in cases]


@pytest.mark.parametrize("layout, axis_type, mode", _params(sorted(EXPECTED)))
def test_layout_equals_the_full_batch_with_its_collectives(layout, axis_type, mode):
  step, args, mesh = _setup(layout, axis_type, mode)
  params, batch = _problem()
  ref_value, ref_grads = jax.value_and_grad(auto_loss)(params, batch)
  with jax.set_mesh(mesh):
    value, grads = step(*args)
    counts = jaxaccum.count_collectives(step, *args)
  assert_rel_close(grads, ref_grads)
  assert_rel_close(value, ref_value)
  specs = LAYOUTS[layout][3]
  for name, g in grads.items():
    assert g.sharding.is_equivalent_to(NamedSharding(mesh, specs[name]), g.ndim), (
        name, g.sharding)
  inside, outside = EXPECTED[layout, axis_type, mode]
  assert _by_kind(counts, "inside_loops") == inside, counts
  # After the loop, older XLA versions leave a combinable all-reduce split in
  # several; what is communicated, kind by kind, is the same.
  got = _by_kind(counts, "outside_loops")
  assert {k: b for k, (_, b) in got.items()} == {k: b for k, (_, b) in outside.items()}, counts
  assert all(got[k][0] >= n for k, (n, _) in outside.items()), counts


@pytest.mark.parametrize("layout, axis_type", _params(
    [(l, t) for l in ("FSDP", "HSDP") for t in ("Explicit", "Auto")]))
def test_default_mode_moves_nothing_gradient_sized_in_the_loop(layout, axis_type):
  step, args, mesh = _setup(layout, axis_type, "once")
  with jax.set_mesh(mesh):
    counts = jaxaccum.count_collectives(step, *args)
  smallest = 4 * min(np.prod(W1), np.prod(W2)) // 8
  assert counts.bytes.inside_loops.total < smallest, counts
  assert counts.inside_loops.all_gather == 0


def test_tensor_parallel_parameters_are_never_gathered():
  for axis_type in ("Explicit", "Auto") if _compat.has_reduced_specs() else ("Auto",):
    step, args, mesh = _setup("TP", axis_type, "once")
    with jax.set_mesh(mesh):
      counts = jaxaccum.count_collectives(step, *args)
    assert counts.total.all_gather == 0, (axis_type, counts)
    assert counts.bytes.outside_loops.all_reduce <= PARAM_BYTES // 2 + 4, (axis_type, counts)


def _gathered(counts):
  """All-gather bytes of one call (the loop's N times)."""
  return N * counts.bytes.inside_loops.all_gather + counts.bytes.outside_loops.all_gather


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("layout, axis_type", _params(
    [(l, t) for l in sorted(LAYOUTS) for t in ("Explicit", "Auto")]))
def test_no_more_is_gathered_than_under_plain_jit(layout, axis_type, defer):
  _, _, data_axis, specs = LAYOUTS[layout]
  _, args, mesh = _setup(layout, axis_type, "once")
  # With defer_reduction the loss runs under shard_map, manual over the data axes.
  loss = sharded_loss if axis_type == "Explicit" else auto_loss
  extra = {"param_specs": specs} if axis_type == "Auto" else {}
  step = jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=N, data_axis=data_axis,
                                         defer_reduction=defer, **extra))
  with jax.set_mesh(mesh):
    counts = jaxaccum.count_collectives(step, *args)
    plain = jaxaccum.count_collectives(jax.jit(jax.value_and_grad(loss)), *args)
  assert _gathered(counts) <= _gathered(plain), (counts, plain)


@needs_reduced
@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("layout", ["TP", "FSDP+TP"])
def test_tensor_parallel_under_shard_map_is_not_gathered(layout, defer):
  # A bias add sends the loss to shard_map (manual over "data"); the Explicit
  # model axis stays Explicit for the loss, is not gathered at the boundary,
  # and FSDP + TP reduce-scatters over "data" alone.
  _, _, _, specs = LAYOUTS[layout]
  mesh = _mesh(layout, "Explicit")
  params, batch = _problem()
  params["b1"] = jnp.full((W1[1],), 0.1)
  ref_value, ref_grads = jax.value_and_grad(biased_loss)(params, batch)
  specs = {**specs, "b1": P("model")}
  params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  step = jax.jit(jaxaccum.value_and_grad(sharded_loss, num_microbatches=N, data_axis="data",
                                         mesh=mesh, defer_reduction=defer))
  value, grads = step(params, batch)  # mesh= alone, no jax.set_mesh
  with jax.set_mesh(mesh):
    counts = jaxaccum.count_collectives(step, params, batch)
    plain = jaxaccum.count_collectives(jax.jit(jax.value_and_grad(sharded_loss)),
                                       params, batch)
  if defer:
    grads = jax.tree.map(lambda g: g.sum(0), grads.partials)
  assert_rel_close(grads, ref_grads)
  assert_rel_close(value, ref_value)
  for name, g in grads.items():
    want = specs[name] if not defer else P(*[None if e == "data" else e for e in specs[name]])
    assert g.sharding.is_equivalent_to(NamedSharding(mesh, want), g.ndim), (name, g.sharding)
  assert _gathered(counts) <= _gathered(plain), (counts, plain)
  assert counts.inside_loops.all_gather == 0, counts


def test_per_microbatch_mode_holds_less_memory_on_auto_axes():
  def temp(mode):
    step, args, mesh = _setup("FSDP", "Auto", mode)
    with jax.set_mesh(mesh):
      return step.lower(*args).compile().memory_analysis().temp_size_in_bytes
  assert temp("per_microbatch") < temp("once")


def test_a_loss_that_cannot_take_reduced_parameters_runs_under_shard_map():
  # A bias add between a reduced parameter and the sharded batch is rejected
  # under plain jit: the step falls back to shard_map, still one reduction.
  mesh = _mesh("FSDP", "Explicit")
  params, batch = _problem()
  params["b1"] = jnp.full((W1[1],), 0.1)
  ref_value, ref_grads = jax.value_and_grad(biased_loss)(params, batch)
  specs = {"w1": P("data", None), "w2": P("data", None), "b1": P()}
  sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  step = jax.jit(jaxaccum.value_and_grad(biased_loss, num_microbatches=N, data_axis="data"))
  with jax.set_mesh(mesh):
    value, grads = step(sharded, batch)
    counts = jaxaccum.count_collectives(step, sharded, batch)
  assert_rel_close(grads, ref_grads)
  assert_rel_close(value, ref_value)
  assert grads["w1"].sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)
  assert counts.inside_loops.total == 0, counts
  assert counts.outside_loops.reduce_scatter == 2, counts


def test_auto_axes_without_param_specs_treat_parameters_as_replicated():
  # Documented limit: the FSDP sharding is not visible inside jit on Auto axes.
  mesh = _mesh("FSDP", "Auto")
  params, batch = _problem()
  ref_value, ref_grads = jax.value_and_grad(auto_loss)(params, batch)
  params = jax.device_put(params, NamedSharding(mesh, P("data", None)))
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  step = jax.jit(jaxaccum.value_and_grad(auto_loss, num_microbatches=N, data_axis="data"))
  with jax.set_mesh(mesh):
    value, grads = step(params, batch)
    counts = jaxaccum.count_collectives(step, params, batch)
  assert_rel_close(grads, ref_grads)
  assert counts.inside_loops.total == 0 and counts.outside_loops.reduce_scatter == 0


def test_multi_steps_accumulator_is_sharded_like_the_parameters():
  for layout in ("FSDP", "TP"):
    mesh = _mesh(layout, "Explicit")
    specs = LAYOUTS[layout][3]
    params, _ = _problem()
    params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    opt = jaxaccum.multi_steps(optax.sgd(0.1), every_k_schedule=2)
    with jax.set_mesh(mesh):
      for state in (opt.init(params), jax.jit(opt.init)(params)):
        for name, a in state.acc_grads.items():
          assert a.sharding.is_equivalent_to(NamedSharding(mesh, specs[name]), a.ndim), (
              layout, name, a.sharding)


def test_options_are_validated():
  loss = auto_loss
  with pytest.raises(ValueError, match="fsdp_gather"):
    jaxaccum.value_and_grad(loss, num_microbatches=2, data_axis="data", fsdp_gather="never")
  with pytest.raises(TypeError, match="fsdp_gather"):
    jaxaccum.value_and_grad(loss, num_microbatches=2, data_axis="data", fsdp_gather=1)
  with pytest.raises(ValueError, match="only used with data_axis"):
    jaxaccum.value_and_grad(loss, num_microbatches=2, fsdp_gather="per_microbatch")
  with pytest.raises(ValueError, match="only used with data_axis"):
    jaxaccum.value_and_grad(loss, num_microbatches=2, param_specs=P())
  with pytest.raises(TypeError, match="param_specs"):
    jaxaccum.value_and_grad(loss, num_microbatches=2, data_axis="data", param_specs="data")
  with pytest.raises(ValueError, match="param_specs"):
    jaxaccum.value_and_grad(loss, num_microbatches=2, data_axis="data", argnums=(0,),
                            param_specs=P())


def test_planner_accounts_for_the_fsdp_mode():
  # plan_microbatches compiles the real step, so the estimate follows the mode:
  # gathering per micro-batch (sharded accumulator) plans less memory.
  _, _, data_axis, specs = LAYOUTS["FSDP"]
  mesh = _mesh("FSDP", "Auto")
  params, batch = _problem()
  params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
  batch = jax.device_put(batch, NamedSharding(mesh, P(data_axis)))
  with jax.set_mesh(mesh):
    plans = {mode: jaxaccum.plan_microbatches(
        auto_loss, params, batch, memory_budget=2**40, candidates=[N], data_axis=data_axis,
        fsdp_gather=mode, param_specs=specs) for mode in ("once", "per_microbatch")}
  assert plans["per_microbatch"].estimates[N] < plans["once"].estimates[N]
