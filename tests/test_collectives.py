"""``jaxaccum.count_collectives``: which collectives a compiled step runs, where, and their bytes.

Hand-written steps with a known placement (a ``psum`` in a scan body versus
after the scan, in a ``cond`` inside or outside a loop, each collective kind)
and known sizes, compiled on 8 CPU devices, and hand-written HLO text for
what the CPU compiler never emits (asynchronous start/done pairs,
``async-start`` wrappers, ``true_computation=``, other element types) and for
the parser's edge cases; text that is not optimized HLO is an error.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxaccum
from _models import mlp_batch, mlp_init, mlp_loss

MESH = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
ROWS = jax.device_put(jnp.arange(64.0, dtype=jnp.float32).reshape(64, 1),
                      NamedSharding(MESH, P("x")))
NONE = jaxaccum.CollectivesByKind()


def _per_device(f):
  """``f`` on each device's 8 rows of ``ROWS`` (no vma checks: raw collectives)."""
  return jax.jit(jax.shard_map(f, mesh=MESH, in_specs=P("x"), out_specs=P("x"),
                               check_vma=False))


def _scan_rows(body):
  """Scans over a device's rows with ``carry = body(carry, row)``."""
  return lambda a: lax.scan(lambda c, r: (body(c, r), None), jnp.zeros_like(a[0]), a)[0]


def test_psum_in_every_micro_step_is_inside_the_loop():
  bad = _per_device(_scan_rows(lambda c, r: c + lax.psum(r, "x")))
  counts = jaxaccum.count_collectives(bad, ROWS)
  assert counts.inside_loops == jaxaccum.CollectivesByKind(all_reduce=1)
  assert counts.outside_loops == NONE


def test_psum_after_the_loop_is_outside():
  good = _per_device(lambda a: lax.psum(_scan_rows(lambda c, r: c + r)(a), "x"))
  counts = jaxaccum.count_collectives(good, ROWS)
  assert counts.inside_loops == NONE
  assert counts.outside_loops == jaxaccum.CollectivesByKind(all_reduce=1)
  assert counts.in_conditionals == NONE


def test_collective_in_a_cond_inside_a_loop_is_inside():
  # The branch computation is reached from the while body through the
  # conditional: it must be followed transitively.
  step = _per_device(_scan_rows(
      lambda c, r: c + lax.cond(r[0] > 3.0, lambda: lax.psum(r, "x"), lambda: r)))
  counts = jaxaccum.count_collectives(step, ROWS)
  assert counts.inside_loops.all_reduce == 1
  assert counts.outside_loops == NONE
  assert counts.in_conditionals.all_reduce == 1


def test_collective_in_a_cond_outside_loops():
  step = _per_device(lambda a: lax.cond(a[0, 0] > 3.0, lambda: lax.psum(a, "x"), lambda: a))
  counts = jaxaccum.count_collectives(step, ROWS)
  assert counts.inside_loops == NONE
  assert counts.outside_loops.all_reduce == 1
  assert counts.in_conditionals.all_reduce == 1


def test_loop_nested_in_a_loop():
  inner = lambda c, r: lax.fori_loop(0, 2, lambda i, v: v + lax.pmax(r, "x"), c)
  counts = jaxaccum.count_collectives(_per_device(_scan_rows(inner)), ROWS)
  assert counts.inside_loops.all_reduce == 1
  assert counts.outside_loops == NONE


@pytest.mark.parametrize("kind, f", [
    ("all_reduce", lambda a: lax.psum(a, "x")),
    ("all_gather", lambda a: lax.all_gather(a, "x", tiled=True)),
    ("reduce_scatter", lambda a: lax.psum_scatter(a, "x", scatter_dimension=0, tiled=True)),
    ("all_to_all", lambda a: lax.all_to_all(a, "x", 0, 0, tiled=True)),
    ("collective_permute", lambda a: lax.ppermute(a, "x", [(i, (i + 1) % 8) for i in range(8)])),
])
def test_each_kind_is_counted_as_itself(kind, f):
  counts = jaxaccum.count_collectives(_per_device(f), ROWS)
  assert counts.outside_loops == jaxaccum.CollectivesByKind(**{kind: 1})
  assert counts.total == counts.outside_loops
  assert counts.outside_loops.total == 1
  assert counts.outside_loops.moving_data == int(
      kind in ("all_gather", "all_to_all", "collective_permute"))


def test_gspmd_accumulation_reduces_in_every_micro_step():
  # The mistake count_collectives exists to catch: plain jit over a sharded
  # batch, with the gradient all-reduce inside the micro-batch loop.
  params = mlp_init(jax.random.key(0))
  batch = jax.device_put(mlp_batch(jax.random.key(1), 64), NamedSharding(MESH, P("x")))
  naive = jax.jit(jaxaccum.grad(mlp_loss, num_microbatches=4))
  good = jax.jit(jaxaccum.grad(mlp_loss, num_microbatches=4, data_axis="x", mesh=MESH))
  assert jaxaccum.count_collectives(naive, params, batch).inside_loops.all_reduce >= 1
  counts = jaxaccum.count_collectives(good, params, batch)
  assert counts.inside_loops == NONE
  assert counts.outside_loops.all_reduce >= 1


def test_pmap_function():
  f = jax.pmap(lambda a: lax.psum(a, "i"), axis_name="i")
  counts = jaxaccum.count_collectives(f, jnp.ones((8, 3)))
  assert counts.outside_loops.all_reduce == 1


def test_accepts_a_plain_function_lowered_compiled_and_text():
  f = lambda a: lax.psum(_scan_rows(lambda c, r: c + r)(a), "x")
  step = _per_device(f)
  expected = jaxaccum.count_collectives(step, ROWS)
  lowered = step.lower(ROWS)
  assert jaxaccum.count_collectives(lowered) == expected
  assert jaxaccum.count_collectives(lowered.compile()) == expected
  assert jaxaccum.count_collectives(lowered.compile().as_text()) == expected
  not_jitted = jax.shard_map(f, mesh=MESH, in_specs=P("x"), out_specs=P("x"),
                             check_vma=False)
  assert jaxaccum.count_collectives(not_jitted, ROWS) == expected


def test_keyword_arguments_reach_the_function():
  step = jax.jit(lambda a, *, scale: jax.shard_map(
      lambda b: lax.psum(b * scale, "x"), mesh=MESH, in_specs=P("x"), out_specs=P("x"),
      check_vma=False)(a))
  assert jaxaccum.count_collectives(step, ROWS, scale=2.0).outside_loops.all_reduce == 1


def test_arguments_with_a_compiled_function_are_rejected():
  compiled = jax.jit(lambda a: a + 1).lower(jnp.ones(3)).compile()
  with pytest.raises(ValueError, match="1 positional"):
    jaxaccum.count_collectives(compiled, jnp.ones(3))
  with pytest.raises(ValueError, match="Compiled"):
    jaxaccum.count_collectives(compiled, x=jnp.ones(3))


def test_text_without_computations_is_rejected():
  with pytest.raises(ValueError, match="no computation"):
    jaxaccum.count_collectives("HloModule empty\n")


def test_result_is_a_pytree_of_ints_with_a_short_repr():
  counts = jaxaccum.count_collectives(_per_device(lambda a: lax.psum(a, "x")), ROWS)
  assert jax.tree.leaves(counts) == [0] * 5 + [1, 0, 0, 0, 0] + [0] * 5
  assert repr(counts.outside_loops) == "CollectivesByKind(all_reduce=1)"
  assert repr(NONE) == "CollectivesByKind()"


# Hand-written optimized HLO: what GPU/TPU compilers print for asynchronous
# collectives, which the CPU compiler does not produce.
_HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

FileNames
1 "step.py {"

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%wrapped_reduce_scatter (p: f32[8]) -> f32[1] {
  %p = f32[8]{0} parameter(0)
  ROOT %rs = f32[1]{0} reduce-scatter(f32[8]{0} %p), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
}

%gather_in_call (q: f32[4]) -> f32[32] {
  %q = f32[4]{0} parameter(0)
  ROOT %ag = f32[32]{0} all-gather(f32[4]{0} %q), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[4]{0}) %t), index=0
  %x = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %t), index=1
  %ars = f32[4]{0} all-reduce-start(f32[4]{0} %x), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %ard = f32[4]{0} all-reduce-done(f32[4]{0} %ars)
  %g = f32[32]{0} call(f32[4]{0} %ard), to_apply=%gather_in_call
  ROOT %out = (s32[], /*index=1*/f32[4]{0}) tuple(s32[] %i, f32[4]{0} %ard)
}

%cond (c: (s32[], f32[4])) -> pred[] {
  %c = (s32[], f32[4]{0}) parameter(0)
  %n = s32[] get-tuple-element((s32[], f32[4]{0}) %c), index=0
  %four = s32[] constant(4)
  ROOT %lt = pred[] compare(s32[] %n, s32[] %four), direction=LT
}

%on_true (y: f32[4]) -> f32[4] {
  %y = f32[4]{0} parameter(0)
  %cps = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(f32[4]{0} %y), source_target_pairs={{0,1},{1,0}}
  ROOT %cpd = f32[4]{0} collective-permute-done((f32[4]{0}, f32[4]{0}, u32[], u32[]) %cps)
}

%on_false (z: f32[4]) -> f32[4] {
  ROOT %z = f32[4]{0} parameter(0)
}

%never_called (u: f32[4]) -> f32[4] {
  %u = f32[4]{0} parameter(0)
  ROOT %a2a = f32[4]{0} all-to-all(f32[4]{0} %u), replica_groups={{0,1}}, dimensions={0}
}

ENTRY %main (x0: f32[4], x8: f32[8], p: pred[]) -> f32[4] {
  %x0 = f32[4]{0} parameter(0)
  %x8 = f32[8]{0} parameter(1)
  %p = pred[] parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(s32[] %zero, f32[4]{0} %x0)
  %loop = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %acc = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %loop), index=1
  %branch = f32[4]{0} conditional(pred[] %p, f32[4]{0} %acc, f32[4]{0} %acc), true_computation=%on_true, false_computation=%on_false
  %rss = ((f32[8]{0}), f32[1]{0}) async-start(f32[8]{0} %x8), calls=%wrapped_reduce_scatter
  %rsd = f32[1]{0} async-done(((f32[8]{0}), f32[1]{0}) %rss), calls=%wrapped_reduce_scatter
  ROOT %r = f32[4]{0} add(f32[4]{0} %branch, f32[4]{0} %branch)
}
"""


def test_hand_written_hlo():
  counts = jaxaccum.count_collectives(_HLO)
  # The async all-reduce pair counts once; the all-gather is reached through
  # a call from the loop body.
  assert counts.inside_loops == jaxaccum.CollectivesByKind(all_reduce=1, all_gather=1)
  # The collective-permute pair counts once; the unused computation's
  # all-to-all does not count.
  assert counts.outside_loops == jaxaccum.CollectivesByKind(reduce_scatter=1,
                                                            collective_permute=1)
  assert counts.in_conditionals == jaxaccum.CollectivesByKind(collective_permute=1)


def test_hand_written_hlo_without_percent_signs():
  # Newer XLA versions print instruction and computation names without "%".
  assert jaxaccum.count_collectives(_HLO.replace("%", "")) == jaxaccum.count_collectives(_HLO)


def test_branch_computations_list_inside_a_loop():
  text = """\
HloModule m

%b0 (x: f32[2]) -> f32[2] {
  ROOT %x = f32[2]{0} parameter(0)
}

%b1 (x: f32[2]) -> f32[2] {
  %x = f32[2]{0} parameter(0)
  ROOT %ag = f32[2]{0} all-reduce(f32[2]{0} %x), replica_groups={}, to_apply=%b0
}

%b2 (x: f32[2]) -> f32[2] {
  %x = f32[2]{0} parameter(0)
  ROOT %a2a = f32[2]{0} all-to-all(f32[2]{0} %x), dimensions={0}
}

%body (x: f32[2]) -> f32[2] {
  %x = f32[2]{0} parameter(0)
  %i = s32[] constant(1)
  ROOT %c = f32[2]{0} conditional(s32[] %i, f32[2]{0} %x, f32[2]{0} %x, f32[2]{0} %x), branch_computations={%b0, %b1, %b2}
}

%cond (x: f32[2]) -> pred[] {
  %x = f32[2]{0} parameter(0)
  ROOT %t = pred[] constant(true)
}

ENTRY %main (x: f32[2]) -> f32[2] {
  %x = f32[2]{0} parameter(0)
  ROOT %w = f32[2]{0} while(f32[2]{0} %x), condition=%cond, body=%body
}
"""
  counts = jaxaccum.count_collectives(text)
  assert counts.inside_loops == jaxaccum.CollectivesByKind(all_reduce=1, all_to_all=1)
  assert counts.in_conditionals == counts.inside_loops
  assert counts.outside_loops == NONE



# Bytes: per device, the data each collective reduces, gathers or sends.

WIDE = jax.device_put(jnp.ones((64, 256), jnp.float32), NamedSharding(MESH, P("x")))
SHARD_BYTES = 8 * 256 * 4  # one device's (8, 256) float32 rows of WIDE


@pytest.mark.parametrize("kind, f, expected", [
    ("all_reduce", lambda a: lax.psum(a, "x"), SHARD_BYTES),
    ("all_reduce", lambda a: lax.psum(a.astype(jnp.int32), "x"), SHARD_BYTES),
    ("all_gather", lambda a: lax.all_gather(a, "x", tiled=True), 8 * SHARD_BYTES),
    # The data reduced, not the (1, 256) result each device keeps.
    ("reduce_scatter", lambda a: lax.psum_scatter(a, "x", scatter_dimension=0, tiled=True),
     SHARD_BYTES),
    ("all_to_all", lambda a: lax.all_to_all(a, "x", 0, 0, tiled=True), SHARD_BYTES),
    ("collective_permute",
     lambda a: lax.ppermute(a, "x", [(i, (i + 1) % 8) for i in range(8)]), SHARD_BYTES),
])
def test_bytes_of_each_kind(kind, f, expected):
  counts = jaxaccum.count_collectives(_per_device(f), WIDE)
  assert counts.bytes.outside_loops == jaxaccum.CollectivesByKind(**{kind: expected})
  assert counts.bytes.inside_loops == NONE
  assert counts.bytes.total.total == expected


def test_bytes_inside_and_outside_loops():
  # Per micro-step a (256,) row is reduced; after the loop the (2, 256) sum.
  def f(a):
    summed = _scan_rows(lambda c, r: c + lax.psum(r, "x"))(a)
    return lax.psum(jnp.stack([summed, summed * 2.0]), "x")

  counts = jaxaccum.count_collectives(_per_device(f), WIDE)
  assert counts.inside_loops == counts.outside_loops == jaxaccum.CollectivesByKind(all_reduce=1)
  assert counts.bytes.inside_loops == jaxaccum.CollectivesByKind(all_reduce=256 * 4)
  assert counts.bytes.outside_loops == jaxaccum.CollectivesByKind(all_reduce=2 * 256 * 4)
  assert counts.bytes.in_conditionals == NONE


def test_bytes_in_a_conditional():
  step = _per_device(lambda a: lax.cond(a[0, 0] > 3.0, lambda: lax.psum(a, "x"), lambda: a))
  counts = jaxaccum.count_collectives(step, WIDE)
  assert counts.bytes.outside_loops == jaxaccum.CollectivesByKind(all_reduce=SHARD_BYTES)
  assert counts.bytes.in_conditionals == counts.bytes.outside_loops


def test_bytes_under_pmap():
  f = jax.pmap(lambda a: lax.psum(a, "i"), axis_name="i")
  counts = jaxaccum.count_collectives(f, jnp.ones((8, 3, 100), jnp.float32))
  assert counts.bytes.outside_loops == jaxaccum.CollectivesByKind(all_reduce=3 * 100 * 4)


def test_bytes_reveal_a_gradient_sized_reduction_per_micro_step():
  params = mlp_init(jax.random.key(0))
  gradient_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  batch = jax.device_put(mlp_batch(jax.random.key(1), 64), NamedSharding(MESH, P("x")))
  naive = jax.jit(jaxaccum.grad(mlp_loss, num_microbatches=4))
  good = jax.jit(jaxaccum.grad(mlp_loss, num_microbatches=4, data_axis="x", mesh=MESH))
  assert jaxaccum.count_collectives(naive, params, batch).bytes.inside_loops.total >= gradient_bytes
  counts = jaxaccum.count_collectives(good, params, batch)
  assert counts.bytes.inside_loops == NONE
  assert counts.bytes.outside_loops.all_reduce == gradient_bytes


def test_bytes_of_hand_written_hlo():
  counts = jaxaccum.count_collectives(_HLO)
  # f32[4] all-reduce-start; f32[32] all-gather reached through a call.
  assert counts.bytes.inside_loops == jaxaccum.CollectivesByKind(all_reduce=16, all_gather=128)
  # The reduce-scatter's f32[8] operand; the permute's f32[4] output, not
  # the whole (input, output, context, context) tuple of the start.
  assert counts.bytes.outside_loops == jaxaccum.CollectivesByKind(reduce_scatter=32,
                                                                  collective_permute=16)
  assert counts.bytes.in_conditionals == jaxaccum.CollectivesByKind(collective_permute=16)
  assert jaxaccum.count_collectives(_HLO.replace("%", "")).bytes == counts.bytes


def _one_collective(shape, opcode="all-reduce", operands="%p"):
  return f"""\
HloModule m, is_scheduled=true

ENTRY %main (p: f32[8], q: bf16[16]) -> f32[1] {{
  %p = f32[8]{{0}} parameter(0)
  %q = bf16[16]{{0}} parameter(1)
  ROOT %c = {shape} {opcode}({operands}), replica_groups={{{{0,1,2,3,4,5,6,7}}}}
}}
"""


@pytest.mark.parametrize("shape, expected", [
    ("f32[1024,256]{1,0}", 4 * 1024 * 256),
    ("f32[1024,256]{1,0:T(8,128)}", 4 * 1024 * 256),
    ("bf16[3,5]{1,0}", 30),
    ("f16[7]{0}", 14),
    ("s32[2,2]{1,0}", 16),
    ("u32[3]{0}", 12),
    ("pred[5]{0}", 5),
    ("f64[2]{0}", 16),
    ("c64[3]{0}", 24),
    ("c128[1]{0}", 16),
    ("s8[6]{0}", 6),
    ("u16[3]{0}", 6),
    ("s64[2]{0}", 16),
    ("f8e4m3fn[10]{0}", 10),
    ("s4[5]{0}", 3),
    ("f32[]", 4),
    ("f32[<=6,2]{1,0}", 48),
    ("(f32[2]{0}, bf16[4]{0}, /*index=2*/s32[])", 8 + 8 + 4),
])
def test_bytes_of_a_result_shape(shape, expected):
  counts = jaxaccum.count_collectives(_one_collective(shape))
  assert counts.bytes.outside_loops == jaxaccum.CollectivesByKind(all_reduce=expected)


@pytest.mark.parametrize("shape, opcode, operands, kind, expected", [
    # Asynchronous starts: the data produced, once.
    ("f32[8]{0}", "all-reduce-start", "%p", "all_reduce", 32),
    ("(f32[8]{0}, bf16[16]{0})", "all-reduce-start", "%p, %q", "all_reduce", 64),
    ("(f32[8]{0}, f32[64]{0})", "all-gather-start", "%p", "all_gather", 256),
    ("((f32[8]{0}, bf16[16]{0}), (f32[64]{0}, bf16[128]{0}))", "all-gather-start",
     "%p, %q", "all_gather", 256 + 256),
    ("(f32[8]{0}, f32[8]{0}, u32[], u32[])", "collective-permute-start", "%p",
     "collective_permute", 32),
    # A reduce-scatter counts its operands, looked up or printed inline.
    ("f32[1]{0}", "reduce-scatter", "%p", "reduce_scatter", 32),
    ("f32[1]{0}", "reduce-scatter", "f32[8]{0} %p", "reduce_scatter", 32),
    ("(f32[1]{0}, bf16[2]{0})", "reduce-scatter", "p, q", "reduce_scatter", 64),
    ("f32[8]{0}", "ragged-all-to-all", "%p, %p", "all_to_all", 32),
])
def test_bytes_of_async_and_reduce_scatter_ops(shape, opcode, operands, kind, expected):
  counts = jaxaccum.count_collectives(_one_collective(shape, opcode, operands))
  assert counts.outside_loops == jaxaccum.CollectivesByKind(**{kind: 1})
  assert counts.bytes.outside_loops == jaxaccum.CollectivesByKind(**{kind: expected})


def test_unknown_element_type_is_an_error():
  with pytest.raises(ValueError, match="unknown HLO element type 'xyz'"):
    jaxaccum.count_collectives(_one_collective("xyz[3]{0}"))


def test_bytes_are_kept_by_copies_and_dropped_by_edits():
  import copy
  import pickle

  counts = jaxaccum.count_collectives(_one_collective("f32[2]{0}"))
  assert copy.deepcopy(counts).bytes == counts.bytes
  assert pickle.loads(pickle.dumps(counts)).bytes == counts.bytes
  assert counts._replace(inside_loops=NONE).bytes is None
  assert jax.tree.map(lambda n: n, counts).bytes is None
  assert jaxaccum.CollectiveCounts(NONE, NONE, NONE).bytes is None


# Text that is not optimized HLO is an error, not zero collectives.

def test_stablehlo_text_is_rejected():
  lowered = _per_device(lambda a: lax.psum(a, "x")).lower(ROWS)
  with pytest.raises(ValueError, match=r"StableHLO.*compile\(\)\.as_text\(\)"):
    jaxaccum.count_collectives(lowered.as_text())


@pytest.mark.parametrize("text", ["", "\n  \n", "junk {\n  x = y\n}\n",
                                  "module @m {\n  func.func @main() {\n  }\n}\n"])
def test_text_that_is_not_hlo_is_rejected(text):
  with pytest.raises(ValueError, match=r"optimized HLO text .*HloModule"):
    jaxaccum.count_collectives(text)


def test_text_without_an_entry_computation_is_rejected():
  text = "HloModule m\n\n%c (x: f32[]) -> f32[] {\n  ROOT %x = f32[] parameter(0)\n}\n"
  with pytest.raises(ValueError, match="no computation marked ENTRY"):
    jaxaccum.count_collectives(text)


def test_not_a_function_is_a_type_error():
  with pytest.raises(TypeError, match="takes a function"):
    jaxaccum.count_collectives(3)
