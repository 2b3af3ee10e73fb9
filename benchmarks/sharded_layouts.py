"""Collectives, bytes and compiled memory per sharded layout, on 8 CPU devices.

For each layout (DDP, FSDP, TP, HSDP, FSDP + TP), mesh axis type and ``fsdp_gather``
mode, compiles ``jaxaccum.value_and_grad(..., data_axis=...)`` and, for
comparison, plain GSPMD (a ``jit`` scan over micro-batches without
``data_axis``), and prints the collectives inside / outside the micro-batch
loop with their bytes per device, and ``temp_size_in_bytes`` per device.
Nothing is executed. Run from the repository root:
``python -m benchmarks.sharded_layouts [--hidden 512]``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jaxaccum  # noqa: E402

N = 4
BATCH = 64
LAYOUTS = {
    "DDP": ((8,), ("data",), "data", {"w1": P(), "w2": P()}),
    "FSDP": ((8,), ("data",), "data", {"w1": P("data", None), "w2": P("data", None)}),
    "TP": ((4, 2), ("data", "model"), "data", {"w1": P(None, "model"), "w2": P("model", None)}),
    "HSDP": ((2, 4), ("replica", "shard"), ("replica", "shard"),
             {"w1": P("shard", None), "w2": P("shard", None)}),
    "FSDP+TP": ((4, 2), ("data", "model"), "data",
                {"w1": P("data", "model"), "w2": P("model", "data")}),
}


def loss(params, batch):
  """A two-layer MLP; under an Explicit mesh it names the data axes itself."""
  x, y = batch
  mesh = jax.sharding.get_abstract_mesh()
  explicit = not mesh.empty and AxisType.Explicit in mesh.axis_types
  data = tuple(a for a in mesh.axis_names if a != "model")
  data = data[0] if len(data) == 1 else data
  spec = (lambda s: s) if explicit else (lambda s: None)
  hidden = P(data, "model") if "model" in mesh.axis_names else P(data, None)
  h = jnp.tanh(jnp.einsum("bi,ih->bh", x, params["w1"], out_sharding=spec(hidden)))
  out = jnp.einsum("bh,ho->bo", h, params["w2"], out_sharding=spec(P(data, None)))
  return jnp.mean((out - y) ** 2)


def gspmd(params, batch):
  """Plain GSPMD: a scan over strided micro-batches, no data_axis."""
  strided = jax.tree.map(lambda a: a.reshape(a.shape[0] // N, N, *a.shape[1:]), batch)

  def body(acc, i):
    micro = jax.tree.map(lambda a: a[:, i], strided)
    value, grads = jax.value_and_grad(loss)(params, micro)
    return jax.tree.map(jnp.add, acc, (value, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, (jnp.float32(0), params))
  (value, grads), _ = jax.lax.scan(body, zeros, jnp.arange(N))
  return jax.tree.map(lambda a: a / N, (value, grads))


def _describe(counts) -> str:
  def side(where):
    n, b = getattr(counts, where), getattr(counts.bytes, where)
    parts = [f"{k}={getattr(n, k)}x/{getattr(b, k)}B" for k in n._fields if getattr(n, k)]
    return " ".join(parts) or "-"
  return f"in loop: {side('inside_loops'):48} after/before: {side('outside_loops')}"


def measure(layout: str, axis_type: str, mode: str | None, hidden: int) -> str:
  shape, names, data_axis, specs = LAYOUTS[layout]
  mesh = jax.make_mesh(shape, names, axis_types=(getattr(AxisType, axis_type),) * len(names))
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k1, (128, hidden)), "w2": jax.random.normal(k2, (hidden, 8))}
  x = jax.random.normal(k3, (BATCH, 128))
  with jax.set_mesh(mesh):
    params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    batch = jax.device_put((x, x[:, :8]), NamedSharding(mesh, P(data_axis)))
    if mode is None:
      step = jax.jit(gspmd)
    else:
      extra = {"param_specs": specs} if axis_type == "Auto" else {}
      step = jax.jit(jaxaccum.value_and_grad(loss, num_microbatches=N, data_axis=data_axis,
                                             fsdp_gather=mode, **extra))
    compiled = step.lower(params, batch).compile()
    counts = jaxaccum.count_collectives(compiled)
  temp = compiled.memory_analysis().temp_size_in_bytes
  return f"{layout:5} {axis_type:8} {mode or 'GSPMD':15} temp={temp:>9,}  {_describe(counts)}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=512)
  args = parser.parse_args()
  size = 4 * (128 * args.hidden + args.hidden * 8)
  print(f"parameters: {size:,} bytes (float32); batch {BATCH}, N={N}, 8 CPU devices")
  for layout in LAYOUTS:
    modes = ("once", "per_microbatch") if "SDP" in layout else ("once",)
    for axis_type in ("Explicit", "Auto"):
      for mode in modes:
        print(measure(layout, axis_type, mode, args.hidden))
    print(measure(layout, "Explicit", None, args.hidden))


if __name__ == "__main__":
  main()
