"""Collectives per call of a training step that accumulates across ``k`` calls.

On 8 simulated CPU devices, for each layout (DDP, FSDP, TP, HSDP, FSDP + TP)
and mesh axis type, compiles two ``jit`` training steps over a batch sharded
on the data axes and prints what each call communicates (collectives and
bytes per device, from :func:`jaxaccum.count_collectives`):

- jaxaccum: ``value_and_grad(..., defer_reduction=True)`` then
  ``multi_steps(inner, k, data_axis=...)``: the ``k - 1`` accumulating calls
  run what runs outside the cycle's conditional, the completing call that
  and the conditional's collectives;
- optax: ``value_and_grad(...)`` (reduced) then ``optax.MultiSteps(inner,
  k)``: every call the same;

and, for reference, the loss under plain ``jax.jit(jax.value_and_grad(loss))``
on the call's batch, no accumulation: what the layout itself communicates.

Collectives inside the micro-batch loop count once per micro-batch. Nothing is
executed. Run from the repository root:
``python -m benchmarks.multi_steps_collectives [--hidden 32]``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jaxaccum  # noqa: E402
from benchmarks.sharded_layouts import LAYOUTS  # noqa: E402

K = 4  # calls per cycle
N = 2  # micro-batches per call
BATCH = 64  # rows per call
KINDS = {"all_reduce": "AR", "reduce_scatter": "RS", "all_gather": "AG",
         "all_to_all": "A2A", "collective_permute": "CP"}


def loss(params, batch):
  """A two-layer MLP; on an Explicit tensor-parallel mesh it names the output
  shardings of its contractions."""
  x, y = batch
  mesh = jax.sharding.get_abstract_mesh()
  types = {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_types))
  if types.get("model") != AxisType.Explicit:
    return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)
  data = "data" if types["data"] == AxisType.Explicit else None
  h = jnp.tanh(jnp.einsum("bi,ih->bh", x, params["w1"], out_sharding=P(data, "model")))
  out = jnp.einsum("bh,ho->bo", h, params["w2"], out_sharding=P(data, None))
  return jnp.mean((out - y) ** 2)


def per_call(counts, conditional: bool) -> dict[str, tuple[int, int]]:
  """Kind -> (ops, bytes) one call runs: the loop's ``N`` times, what is
  outside every conditional, and, for the completing call, the conditional."""
  out = {}
  for kind in KINDS:
    n = (N * getattr(counts.inside_loops, kind) + getattr(counts.outside_loops, kind)
         - (0 if conditional else getattr(counts.in_conditionals, kind)))
    size = (N * getattr(counts.bytes.inside_loops, kind)
            + getattr(counts.bytes.outside_loops, kind)
            - (0 if conditional else getattr(counts.bytes.in_conditionals, kind)))
    if n:
      out[kind] = (n, size)
  return out


def describe(calls: dict[str, tuple[int, int]]) -> str:
  if not calls:
    return "none"
  return ", ".join(f"{KINDS[k]} {n}x {size:,} B" for k, (n, size) in calls.items())


def steps(layout: str, axis_type: str):
  """The two jitted steps and their arguments on the layout's mesh."""
  shape, names, data_axis, specs = LAYOUTS[layout]
  mesh = jax.make_mesh(shape, names, axis_types=(getattr(AxisType, axis_type),) * len(names))
  extra = {"param_specs": specs} if axis_type == "Auto" else {}
  inner = optax.adamw(1e-3)
  ms = jaxaccum.multi_steps(inner, K, data_axis=data_axis, mesh=mesh, **extra)
  deferred = jaxaccum.value_and_grad(loss, num_microbatches=N, data_axis=data_axis,
                                     mesh=mesh, defer_reduction=True, **extra)
  reduced = jaxaccum.value_and_grad(loss, num_microbatches=N, data_axis=data_axis,
                                    mesh=mesh, **extra)
  theirs = optax.MultiSteps(inner, K)

  def step(grad_fn, tx):
    @jax.jit
    def train_step(params, state, batch):
      value, grads = grad_fn(params, batch)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, value
    return train_step

  return mesh, specs, data_axis, (step(deferred, ms), ms), (step(reduced, theirs), theirs)


def measure(layout: str, axis_type: str, hidden: int) -> str:
  mesh, specs, data_axis, (ours, ms), (with_optax, theirs) = steps(layout, axis_type)
  key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(key1, (16, hidden)), "w2": jax.random.normal(key2, (hidden, 8))}
  x = jax.random.normal(key3, (BATCH, 16))
  with jax.set_mesh(mesh):
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    batch = jax.device_put((x, x[:, :8]), NamedSharding(mesh, P(data_axis)))
    counts = jaxaccum.count_collectives(ours, params, ms.init(params), batch)
    try:
      optax_counts = describe(per_call(jaxaccum.count_collectives(
          with_optax, params, theirs.init(params), batch), conditional=True))
    except Exception as e:  # noqa: BLE001 -- reported in the table
      optax_counts = f"error: {type(e).__name__}"
    plain = describe(per_call(jaxaccum.count_collectives(
        jax.jit(jax.value_and_grad(loss)), params, batch), conditional=True))
  return (f"| {layout} | {axis_type} | {describe(per_call(counts, False))} | "
          f"{describe(per_call(counts, True))} | {optax_counts} | {plain} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=32, help="hidden width of the MLP")
  args = parser.parse_args()
  grads = 4 * (16 * args.hidden + args.hidden * 8)
  print(f"jax {jax.__version__}, {jax.device_count()} devices, k={K}, N={N}, "
        f"float32 gradients: {grads:,} B")
  print("| layout | axes | jaxaccum, k - 1 accumulating calls | jaxaccum, completing call "
        "| optax.MultiSteps, every call | plain jit, no accumulation |")
  print("|---|---|---|---|---|---|")
  for layout in LAYOUTS:
    for axis_type in ("Explicit", "Auto"):
      print(measure(layout, axis_type, args.hidden), flush=True)


if __name__ == "__main__":
  main()
