"""Time to the first step: ``jaxaccum.value_and_grad`` against a hand-written scan.

Both build the same training step (accumulated gradients over ``N``
micro-batches, then AdamW) on the GPT-2-shaped model of
:mod:`benchmarks.gpt`. Each measurement runs in a fresh Python process (no
trace or compile cache carries over) and reports:

* ``trace_lower``: ``jax.jit(step).lower(...)``: tracing the user's loss and
  lowering to StableHLO, the part that grows with the model's Python code;
* ``compile``: ``.compile()`` of that lowering;
* ``first_step``: trace + lower + compile + running the first step.

The table gives the median over ``--rounds`` processes per variant, the two
variants alternating, and the ratio of jaxaccum's to the scan's. Writes
``<out-dir>/compile-time-<device>-<date>.json``:

  PYTHONPATH=. python3 benchmarks/compile_time.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

RESULT_PREFIX = "COMPILE_TIME "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The configuration the time-to-first-step target is stated for.
DEFAULT = dict(layers=24, d_model=128, heads=4, seq=64, vocab=512, batch=32)
VARIANTS = ("jaxaccum", "scan")


def _step(variant: str, config, n: int):
  """The jitted training step of ``variant``."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  import jaxaccum  # pylint: disable=import-outside-toplevel
  from benchmarks import gpt  # pylint: disable=import-outside-toplevel

  loss, opt = gpt.make_loss(config), gpt.optimizer()
  if variant == "jaxaccum":
    grad_fn = jaxaccum.value_and_grad(loss, num_microbatches=n)
  else:
    def grad_fn(params, batch):
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:])
                           .swapaxes(0, 1), batch)

      def body(acc, mb):
        value, grads = jax.value_and_grad(loss)(params, mb)
        return jax.tree.map(jnp.add, acc, (value, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros([]), params))
      (value, grads), _ = jax.lax.scan(body, zeros, micro)
      return value / n, jax.tree.map(lambda g: g / n, grads)

  def step(params, opt_state, batch):
    value, grads = grad_fn(params, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return jax.jit(step, donate_argnums=(0, 1)), opt


def measure(variant: str, sizes: dict, n: int) -> dict:
  """One fresh process's timings (run inside the child)."""
  import jax  # pylint: disable=import-outside-toplevel

  from benchmarks import gpt  # pylint: disable=import-outside-toplevel

  config = gpt.Config(**sizes)
  params, batch = gpt.init_params(config), gpt.make_batch(config)
  step, opt = _step(variant, config, n)
  opt_state = opt.init(params)
  jax.block_until_ready((params, opt_state, batch))
  start = time.perf_counter()
  lowered = step.lower(params, opt_state, batch)
  traced = time.perf_counter()
  compiled = lowered.compile()
  built = time.perf_counter()
  jax.block_until_ready(compiled(params, opt_state, batch))
  done = time.perf_counter()
  return {"trace_lower": traced - start, "compile": built - traced,
          "first_step": done - start}


def _child(variant: str, sizes: dict, n: int) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT)
  code = (f"import json, benchmarks.compile_time as m; print({RESULT_PREFIX!r} + "
          f"json.dumps(m.measure({variant!r}, {sizes!r}, {n})))")
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True).stdout
  line = next(x for x in out.splitlines() if x.startswith(RESULT_PREFIX))
  return json.loads(line[len(RESULT_PREFIX):])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, value in DEFAULT.items():
    parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
  parser.add_argument("--n", type=int, default=4, help="micro-batches")
  parser.add_argument("--rounds", type=int, default=3, help="processes per variant")
  parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
  args = parser.parse_args()
  sizes = {name: getattr(args, name) for name in DEFAULT}
  runs = {v: [] for v in VARIANTS}
  for _ in range(args.rounds):
    for variant in VARIANTS:
      runs[variant].append(_child(variant, sizes, args.n))
  medians = {v: {k: statistics.median(r[k] for r in runs[v]) for k in runs[v][0]}
             for v in VARIANTS}
  ratio = {k: medians["jaxaccum"][k] / medians["scan"][k] for k in medians["scan"]}
  print(f"config {sizes}, N = {args.n}, median of {args.rounds} fresh processes")
  print("| | trace + lower (s) | compile (s) | first step (s) |\n|---|---|---|---|")
  for label, row in (("jaxaccum.value_and_grad", medians["jaxaccum"]),
                     ("hand-written lax.scan", medians["scan"]), ("ratio", ratio)):
    print(f"| {label} | {row['trace_lower']:.2f} | {row['compile']:.2f} | "
          f"{row['first_step']:.2f} |")
  import jax  # pylint: disable=import-outside-toplevel
  device = f"{jax.devices()[0].platform}-{os.cpu_count()}core"
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir,
                      f"compile-time-{device}-{datetime.date.today().isoformat()}.json")
  with open(path, "w") as f:
    json.dump({"config": sizes, "n": args.n, "rounds": args.rounds, "runs": runs,
               "median": medians, "ratio": ratio, "jax": jax.__version__,
               "machine": platform.platform(), "processor": platform.processor()},
              f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
