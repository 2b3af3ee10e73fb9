"""One process of the two-process test in ``test_multihost.py``.

Run as ``python _multihost_worker.py --coordinator 127.0.0.1:PORT
--process-id I --num-processes 2 --out RESULT.npz``: joins the distributed
system with 4 CPU devices, builds the global 8-device mesh, runs
``jaxaccum.value_and_grad(..., data_axis="data")`` on a batch sharded over
all 8 devices of both processes, and saves the value, the gradients and the
collective counts of the compiled step. With ``--layout fsdp`` the mesh's
axis is Explicit and the parameters are sharded over it (FSDP,
:func:`fsdp_problem`): the gradients come back sharded like them. With
``--layout multi_steps`` it trains :data:`CYCLES` cycles of
``multi_steps(..., data_axis="data")`` on the gradients of
``value_and_grad(..., defer_reduction=True)``, and saves the parameters and the update's
collectives on every call and in the cycle's conditional. Importing
this module has no side effect: the test imports it for the problems and
losses.
"""

from __future__ import annotations

import argparse

import numpy as np

GLOBAL_BATCH = 32
NUM_MICROBATCHES = 2
K = 2  # multi_steps calls per cycle
CYCLES = 2


def problem() -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Parameters and the global batch ``(x, y, mask)``, the same in every process.

  Rows are masked unevenly, so each process holds a different number of
  unmasked rows and only a global token-weighted mean is right.
  """
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(3, 8)).astype(np.float32) / 2,
            "b1": np.full((8,), 0.1, np.float32),
            "w2": rng.normal(size=(8, 2)).astype(np.float32) / 3}
  x = rng.normal(size=(GLOBAL_BATCH, 3)).astype(np.float32)
  y = np.sin(x[:, :2]).astype(np.float32)
  mask = (np.arange(GLOBAL_BATCH) % 7 < np.arange(GLOBAL_BATCH) % 5).astype(np.float32)
  mask[: GLOBAL_BATCH // 2 : 3] = 1.0
  return params, (x, y, mask)


def masked_loss(params, batch):
  """Squared error averaged over the unmasked rows."""
  import jax.numpy as jnp

  x, y, mask = batch
  pred = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
  err = jnp.sum(jnp.square(pred - y), axis=-1)
  return jnp.sum(err * mask) / jnp.sum(mask)


def fsdp_problem() -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Parameters with a leading size divisible by 8 devices, and a batch ``(x, y)``."""
  rng = np.random.default_rng(1)
  params = {"w1": rng.normal(size=(8, 16)).astype(np.float32) / 3,
            "w2": rng.normal(size=(16, 8)).astype(np.float32) / 4}
  x = rng.normal(size=(GLOBAL_BATCH, 8)).astype(np.float32)
  return params, (x, np.sin(x).astype(np.float32))


def fsdp_loss(params, batch):
  """Mean squared error, written for explicit sharding of the batch (under a
  mesh; the single-device reference has none)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  x, y = batch
  spec = None if jax.sharding.get_abstract_mesh().empty else P("data", None)
  h = jnp.tanh(jnp.einsum("bi,ih->bh", x, params["w1"], out_sharding=spec))
  return jnp.mean((h @ params["w2"] - y) ** 2)


def plain_loss(params, batch):
  """Mean squared error of the FSDP problem's network, with no sharding in it."""
  import jax.numpy as jnp

  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)


def calls_of(batch):
  """The rows of each ``multi_steps`` call, in order."""
  n = K * CYCLES
  return [tuple(a[i::n] for a in batch) for i in range(n)]


def multi_steps_inner():
  import optax

  return optax.adam(0.05)


def run_multi_steps(mesh, process_id, num_processes):
  """Trains the cycles on this process's rows of each call; returns the
  parameters and the update's collective counts."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import jaxaccum

  params, batch = fsdp_problem()
  ms = jaxaccum.multi_steps(multi_steps_inner(), K, data_axis="data", mesh=mesh)
  update = jax.jit(ms.update)
  grad_fn = jaxaccum.grad(plain_loss, num_microbatches=1, data_axis="data",
                          mesh=mesh, defer_reduction=True)

  @jax.jit
  def step(params, state, batch):
    updates, state = ms.update(grad_fn(params, batch), state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), state

  params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), params)
  with jax.set_mesh(mesh):
    state = ms.init(params)
    for call in calls_of(batch):
      rows = len(call[0]) // num_processes
      local = slice(process_id * rows, (process_id + 1) * rows)
      call = tuple(jax.make_array_from_process_local_data(
          NamedSharding(mesh, P("data")), a[local]) for a in call)
      params, state = step(params, state, call)
    counts = jaxaccum.count_collectives(update, grad_fn(params, call), state, params)
  return params, counts


def num_rows(batch):
  import jax.numpy as jnp

  return jnp.sum(batch[2])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--coordinator", required=True)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--local-devices", type=int, default=4)
  parser.add_argument("--out", required=True)
  parser.add_argument("--layout", choices=("ddp", "fsdp", "multi_steps"), default="ddp")
  args = parser.parse_args()

  import jax

  # Before any computation: CPU only, this many local devices, and gloo
  # for the collectives between processes (jax 0.10's default, set to be
  # explicit).
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.local_devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes,
                             process_id=args.process_id,
                             initialization_timeout=120)

  from jax.sharding import NamedSharding, PartitionSpec as P

  import jaxaccum

  devices = args.num_processes * args.local_devices
  if (jax.device_count(), jax.local_device_count()) != (devices, args.local_devices):
    raise SystemExit(f"expected {devices} devices, {args.local_devices} local; got "
                     f"{jax.device_count()} and {jax.local_device_count()}")
  fsdp = args.layout == "fsdp"
  axis_type = jax.sharding.AxisType.Explicit if fsdp else jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((devices,), ("data",), axis_types=(axis_type,))
  from jax.experimental import multihost_utils
  whole = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  if args.layout == "multi_steps":
    params, counts = run_multi_steps(mesh, args.process_id, args.num_processes)
    np.savez(args.out, **{f"param_{k}": whole(v) for k, v in params.items()},
             outside_loops=np.asarray(counts.outside_loops),
             outside_bytes=np.asarray(counts.bytes.outside_loops),
             in_conditionals=np.asarray(counts.in_conditionals),
             conditional_bytes=np.asarray(counts.bytes.in_conditionals))
    jax.distributed.shutdown()
    return

  params, batch = fsdp_problem() if fsdp else problem()
  # Each process loads only its own rows, as a data loader would; the
  # parameters are the same everywhere and so replicated.
  rows = GLOBAL_BATCH // args.num_processes
  local_rows = slice(args.process_id * rows, (args.process_id + 1) * rows)
  batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      NamedSharding(mesh, P("data")), x[local_rows]), batch)
  # Parameters: replicated, or (FSDP) each process holds its rows of them.
  spec = P("data", None) if fsdp else P()
  params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec)), params)
  if fsdp:
    step = jax.jit(jaxaccum.value_and_grad(
        fsdp_loss, num_microbatches=NUM_MICROBATCHES, data_axis="data", mesh=mesh))
  else:
    step = jax.jit(jaxaccum.value_and_grad(
        masked_loss, num_microbatches=NUM_MICROBATCHES, weight_fn=num_rows,
        data_axis="data", mesh=mesh))
  with jax.set_mesh(mesh):
    value, grads = step(params, batch)
    counts = jaxaccum.count_collectives(step, params, batch)
  sharded = [g.sharding.is_equivalent_to(NamedSharding(mesh, spec), g.ndim)
             for g in grads.values()]
  np.savez(args.out, value=whole(value), sharded=np.asarray(sharded),
           **{f"grad_{k}": whole(v) for k, v in grads.items()},
           inside_loops=np.asarray(counts.inside_loops),
           outside_loops=np.asarray(counts.outside_loops),
           inside_bytes=np.asarray(counts.bytes.inside_loops))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
