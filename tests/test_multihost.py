"""Two processes on localhost, 4 CPU devices each, one global 8-device mesh.

``tests/_multihost_worker.py`` runs in two subprocesses joined by
``jax.distributed.initialize``; each runs ``value_and_grad(...,
data_axis="data")`` on a batch sharded over all 8 devices, so the gradient
reduction crosses the process boundary. Both must return the gradient of
``jax.value_and_grad`` on the whole batch in this single process, with no
collective inside the micro-batch loop. The FSDP variant shards the
parameters over the 8 devices of an Explicit mesh: the gradients come back
sharded like them, and nothing gradient-sized runs in the loop.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import _multihost_worker as worker
from jaxaccum import _compat
from _models import assert_rel_close, standard_promotion

WORKER = Path(__file__).with_name("_multihost_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env() -> dict:
  """This environment without the test session's 8-device XLA_FLAGS.

  Each worker asks for its own 4 devices through jax's config instead.
  """
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS")}
  # The workers import this checkout's jaxaccum, as the test does.
  root = str(WORKER.parent.parent)
  path = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=path)
  return env


def _run_workers(tmp_path: Path, layout: str = "ddp") -> list[Path]:
  coordinator = f"127.0.0.1:{_free_port()}"
  outs = [tmp_path / f"process{i}.npz" for i in range(NUM_PROCESSES)]
  logs = [tmp_path / f"process{i}.log" for i in range(NUM_PROCESSES)]
  procs = []
  for i in range(NUM_PROCESSES):
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, str(WORKER), "--coordinator", coordinator,
           "--process-id", str(i), "--num-processes", str(NUM_PROCESSES),
           "--out", str(outs[i]), "--layout", layout],
          env=_worker_env(), stdout=log, stderr=subprocess.STDOUT, cwd=WORKER.parent))
  deadline = time.monotonic() + TIMEOUT_S

  def first_failure():
    for i, proc in enumerate(procs):
      if proc.poll() not in (None, 0):
        return f"process {i} exited with code {proc.returncode}"
    if time.monotonic() > deadline:
      return f"the processes did not finish within {TIMEOUT_S} s"
    return None

  try:
    # Poll both, so that one process failing is reported at once rather than
    # after the other has waited for it until the timeout.
    while (failure := first_failure()) is None and any(p.poll() is None for p in procs):
      time.sleep(0.2)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  if failure:
    output = "\n".join(f"--- process {i} output ---\n{log.read_text()[-6000:]}"
                       for i, log in enumerate(logs))
    raise AssertionError(f"{failure}\n{output}")
  return outs


@pytest.mark.slow
def test_data_axis_across_two_processes_equals_one_process(tmp_path):
  outs = _run_workers(tmp_path)
  params, batch = worker.problem()
  with jax.default_device(jax.devices("cpu")[0]):
    ref_value, ref_grads = jax.value_and_grad(worker.masked_loss)(params, batch)
  for i, out in enumerate(outs):
    result = np.load(out)
    grads = {k: result[f"grad_{k}"] for k in ref_grads}
    assert_rel_close(grads, ref_grads)
    assert_rel_close(result["value"], ref_value)
    # inside_loops / outside_loops as (all_reduce, reduce_scatter,
    # all_gather, all_to_all, collective_permute).
    assert result["inside_loops"].sum() == 0, (i, result["inside_loops"])
    assert result["outside_loops"][0] >= 1, (i, result["outside_loops"])
    assert result["outside_loops"][2:].sum() == 0, (i, result["outside_loops"])


@pytest.mark.skipif(not _compat.has_reduced_specs(),
                    reason="this jax has no reduced / unreduced sharding (jax 0.8 on)")
def test_fsdp_across_two_processes_equals_one_process(tmp_path):
  outs = _run_workers(tmp_path, "fsdp")
  params, batch = worker.fsdp_problem()
  with jax.default_device(jax.devices("cpu")[0]):
    ref_value, ref_grads = jax.value_and_grad(worker.fsdp_loss)(params, batch)
  for i, out in enumerate(outs):
    result = np.load(out)
    assert_rel_close({k: result[f"grad_{k}"] for k in ref_grads}, ref_grads)
    assert_rel_close(result["value"], ref_value)
    assert result["sharded"].all(), (i, result["sharded"])
    # The loss reduces its own value (4 bytes) per micro-batch; no gradient.
    assert result["inside_bytes"].sum() <= 4, (i, result["inside_bytes"])
    assert result["outside_loops"][0] >= 1, (i, result["outside_loops"])


@pytest.mark.slow
def test_multi_steps_data_axis_across_two_processes_reduces_once_per_cycle(tmp_path):
  # multi_steps(data_axis=) on deferred gradients, the mesh spanning both
  # processes: the parameters equal the inner optimizer on each cycle's full
  # batch in this process, and the update's only collective is the gradient
  # all-reduce (its bytes those of the parameters), inside the conditional.
  import optax

  outs = _run_workers(tmp_path, "multi_steps")
  params, batch = worker.fsdp_problem()
  calls = worker.calls_of(batch)
  inner = standard_promotion(worker.multi_steps_inner())  # adam mixes int and float
  with jax.default_device(jax.devices("cpu")[0]):
    state = inner.init(params)
    for c in range(worker.CYCLES):
      rows = tuple(np.concatenate(a) for a in zip(*calls[c * worker.K:(c + 1) * worker.K]))
      updates, state = inner.update(jax.grad(worker.plain_loss)(params, rows), state, params)
      params = optax.apply_updates(params, updates)
  param_bytes = sum(4 * np.size(p) for p in params.values())
  for i, out in enumerate(outs):
    result = np.load(out)
    assert_rel_close({k: result[f"param_{k}"] for k in params}, params)
    # (all_reduce, reduce_scatter, all_gather, all_to_all, collective_permute)
    np.testing.assert_array_equal(result["outside_loops"], result["in_conditionals"])
    assert result["conditional_bytes"][0] == param_bytes, (i, result["conditional_bytes"])
    assert result["conditional_bytes"][1:].sum() == 0, (i, result["conditional_bytes"])
