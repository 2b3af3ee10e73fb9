"""Step time, floor and memory of gradient accumulation on a GPT-2-shaped model.

Every variant of :mod:`benchmarks.variants` runs in its own Python process (so
compile caches and memory peaks do not leak between variants) and reports:

* the median wall time of one optimizer step over ``--steps`` steps after
  ``--warmup`` steps (each step ends with ``jax.block_until_ready``);
* the compile time of its jitted programs;
* peak memory: on a GPU ``memory_stats()["peak_bytes_in_use"]``; on a CPU
  ``temp + argument + output - alias`` of ``compile().memory_analysis()``
  (for variants of several programs: the largest of them, plus the live
  buffers, such as the other micro-batches, that it does not take as
  arguments);
* the loss of its first step and a random projection of the parameter change
  it made, which must agree across variants (they all compute the same
  update).

The floor at ``N`` micro-batches is ``N x pass(B / N) + update``: ``N`` bare
gradient passes on ``B / N`` rows plus one optimizer update, each measured in
this same run. No accumulation scheme can beat it; the full-batch step shows
what micro-batching costs on top of it.

Writes ``<out-dir>/<device>-<config>-<date>.json`` and ``.md`` (a Markdown
table) and ``-time.png`` / ``-memory.png`` plots against ``N``:

  PYTHONPATH=. python3 benchmarks/bench_step.py                  # tiny, CPU
  PYTHONPATH=. python3 benchmarks/bench_step.py --config gpt2-small  # a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

RESULT_PREFIX = "BENCH_RESULT "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  # Run as a script, ``benchmarks`` must be importable without PYTHONPATH=. too.
  sys.path.insert(0, ROOT)

LABELS = {
    "full": "full batch",
    "full_remat": "full batch, nn.remat per block",
    "jaxaccum": "jaxaccum.value_and_grad",
    "scan": "plain lax.scan",
    "optax_microbatch": "optax.microbatching.microbatch (MEAN)",
    "jaxaccum_multi_steps": "jaxaccum.multi_steps (N jit calls)",
    "optax_multisteps": "optax.MultiSteps (N jit calls)",
    "python_loop": "Python loop of N jitted grads + 1 update",
}


def _tree_bytes(tree) -> int:
  import jax
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _projection(before, after) -> float:
  """The parameter change projected on a fixed random direction (float64).

  Adam's first step is close to ``-lr * sign(grad)`` whatever the gradient's
  scale, so its norm says nothing; a random projection of it changes when
  any gradient component changes sign.
  """
  import jax
  import numpy as np
  rng = np.random.default_rng(0)
  return float(sum(
      np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64))
             * rng.standard_normal(np.shape(b)))
      for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)))


def worker(job: dict) -> dict:
  """Compiles and times one variant; returns its measurements."""
  import jax

  from benchmarks import gpt, variants

  config = gpt.Config(**job["config"])
  variant = variants.build(job["variant"], config, job["n"])
  compiled, memory, compile_s = {}, {}, 0.0
  for program in variant.programs:
    start = time.perf_counter()
    compiled[program.name] = program.fn.lower(*program.args).compile()
    compile_s += time.perf_counter() - start
    stats = compiled[program.name].memory_analysis()
    memory[program.name] = {
        "temp": stats.temp_size_in_bytes, "argument": stats.argument_size_in_bytes,
        "output": stats.output_size_in_bytes, "alias": stats.alias_size_in_bytes}
  state = variant.state
  resident = _tree_bytes(variant.resident(state))
  before = jax.device_get(gpt.init_params(config))
  # The largest program's footprint, plus the live buffers it does not take.
  estimate = resident + max(m["temp"] + m["output"] - m["alias"] for m in memory.values())

  state, loss = variant.step(compiled, state)
  first_loss = float(loss)
  params = state[0] if isinstance(state, tuple) else state
  checksum = _projection(before, params)
  for _ in range(job["warmup"] - 1):
    state, loss = variant.step(compiled, state)
  jax.block_until_ready((state, loss))
  times = []
  for _ in range(job["steps"]):
    start = time.perf_counter()
    state, loss = variant.step(compiled, state)
    jax.block_until_ready((state, loss))
    times.append(time.perf_counter() - start)

  device = jax.devices()[0]
  device_stats = device.memory_stats() or {}
  return {
      "variant": job["variant"], "n": job["n"],
      "median_s": statistics.median(times), "times_s": times,
      "compile_s": compile_s,
      "peak_bytes_in_use": device_stats.get("peak_bytes_in_use"),
      "compiled_footprint_bytes": estimate,
      "temp_bytes": max(m["temp"] for m in memory.values()),
      "memory_analysis": memory, "resident_bytes": resident,
      "first_loss": first_loss, "first_update_projection": checksum,
      "device": {"platform": device.platform, "kind": device.device_kind,
                 "count": jax.device_count()},
  }


def _run_job(job: dict, timeout: float) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.bench_step", "--worker", json.dumps(job)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  raise RuntimeError(
      f"variant {job['variant']} N={job['n']} failed (exit {proc.returncode}):\n"
      f"{proc.stderr[-4000:]}")


def _merge(runs: list[dict]) -> dict:
  """One result from the rounds of a variant: the median over all their steps."""
  merged = dict(runs[0])
  merged["times_s"] = [t for r in runs for t in r["times_s"]]
  merged["median_s"] = statistics.median(merged["times_s"])
  merged["round_medians_s"] = [r["median_s"] for r in runs]
  merged["compile_s"] = statistics.median(r["compile_s"] for r in runs)
  peaks = [r["peak_bytes_in_use"] for r in runs if r["peak_bytes_in_use"] is not None]
  merged["peak_bytes_in_use"] = max(peaks) if peaks else None
  return merged


def _memory(result: dict) -> int:
  peak = result["peak_bytes_in_use"]
  return peak if peak is not None else result["compiled_footprint_bytes"]


def summarize(results: list[dict], ns: list[int]) -> dict:
  """Floors and ratios from the raw results of one run."""
  by = {(r["variant"], r["n"]): r for r in results}
  update = by[("update", 1)]["median_s"] if ("update", 1) in by else None
  floor = {}
  for n in [1, *ns]:
    if ("pass", n) in by and update is not None:
      floor[n] = n * by[("pass", n)]["median_s"] + update
  full = by.get(("full", 1))
  ref_loss = full["first_loss"] if full else None
  ref_sum = full["first_update_projection"] if full else None
  rows = []
  for r in results:
    if r["variant"] in ("pass", "update"):
      continue
    row = {"variant": r["variant"], "n": r["n"], "median_s": r["median_s"],
           "min_s": min(r["times_s"]),
           "memory_bytes": _memory(r), "temp_bytes": r["temp_bytes"],
           "compile_s": r["compile_s"]}
    if full:
      row["vs_full"] = r["median_s"] / full["median_s"]
      row["memory_vs_full"] = _memory(r) / _memory(full)
      row["loss_rel_diff"] = abs(r["first_loss"] - ref_loss) / abs(ref_loss)
      row["update_rel_diff"] = abs(r["first_update_projection"] - ref_sum) / abs(ref_sum)
    if r["n"] in floor:
      row["floor_s"] = floor[r["n"]]
      row["vs_floor"] = r["median_s"] / floor[r["n"]]
    rows.append(row)
  return {"update_s": update,
          "pass_s": {n: by[("pass", n)]["median_s"] for n in [1, *ns] if ("pass", n) in by},
          "floor_s": floor, "rows": rows}


def _mib(b: float) -> str:
  return f"{b / 2**20:.1f}"


def markdown(meta: dict, summary: dict) -> str:
  """The results as a Markdown section: machine, command, tables."""
  memory_kind = ("peak_bytes_in_use" if meta["platform"] == "gpu" else
                 "compiled temp + argument + output - alias")
  lines = [
      f"Machine: {meta['machine']}; jax {meta['versions']['jax']}, flax "
      f"{meta['versions']['flax']}, optax {meta['versions']['optax']}, jaxaccum "
      f"{meta['versions']['jaxaccum']}; {meta['date']}.",
      f"Model: `{meta['config_name']}` {meta['config']}, AdamW, params and optimizer "
      f"state donated to the step. Median of {meta['steps']} steps after "
      f"{meta['warmup']} warm-up steps, each variant in a fresh process"
      + (f", {meta['rounds']} rounds (round-robin; median over all their steps)"
         if meta["rounds"] > 1 else "") + ". Memory: "
      f"{memory_kind}.",
      "",
      f"Command: `{meta['command']}`",
      "",
      "| variant | N | ms/step (median) | min | vs full batch | floor(N) ms | vs floor(N) "
      "| memory MiB | vs full | compile s |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in summary["rows"]:
    fmt = lambda key, spec: format(r[key], spec) if key in r else "-"
    lines.append(
        f"| {LABELS[r['variant']]} | {r['n']} | {r['median_s'] * 1e3:.1f} | "
        f"{r['min_s'] * 1e3:.1f} | "
        f"{fmt('vs_full', '.2f')} | "
        f"{format(r['floor_s'] * 1e3, '.1f') if 'floor_s' in r else '-'} | "
        f"{fmt('vs_floor', '.2f')} | {_mib(r['memory_bytes'])} | "
        f"{fmt('memory_vs_full', '.2f')} | {r['compile_s']:.1f} |")
  lines += ["", "Floor pieces (same run): one optimizer update alone "
            f"{summary['update_s'] * 1e3:.1f} ms; one gradient pass (no update) on "
            "B/N rows: " + ", ".join(f"N={n}: {t * 1e3:.1f} ms"
                                     for n, t in summary["pass_s"].items()) + "."]
  loss_diff = max((r.get("loss_rel_diff", 0.0) for r in summary["rows"]), default=0.0)
  update_diff = max((r.get("update_rel_diff", 0.0) for r in summary["rows"]), default=0.0)
  lines += ["", "Sanity check: against the full-batch step, the largest relative "
            f"difference of a variant's first-step loss is {loss_diff:.1e}, and of its "
            f"first parameter update (a random projection of it) {update_diff:.1e}."]
  return "\n".join(lines) + "\n"


def plots(summary: dict, stem: str, title: str) -> list[str]:
  """Time and memory against N, one line per accumulation scheme."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  for key, ylabel, suffix in (("median_s", "ms per optimizer step", "time"),
                              ("memory_bytes", "memory (MiB)", "memory")):
    scale = 1e3 if key == "median_s" else 1 / 2**20
    fig, ax = plt.subplots(figsize=(7, 4.5))
    schemes = sorted({r["variant"] for r in summary["rows"]
                      if r["variant"] not in ("full", "full_remat")},
                     key=list(LABELS).index)
    for v in schemes:
      pts = sorted((r["n"], r[key] * scale) for r in summary["rows"] if r["variant"] == v)
      ax.plot(*zip(*pts), marker="o", label=LABELS[v])
    if key == "median_s" and summary["floor_s"]:
      pts = sorted((n, t * 1e3) for n, t in summary["floor_s"].items() if n > 1)
      ax.plot(*zip(*pts), "k--", label="floor(N) = N x pass(B/N) + update")
    for v, style in (("full", "-"), ("full_remat", ":")):
      ref = [r for r in summary["rows"] if r["variant"] == v]
      if ref:
        ax.axhline(ref[0][key] * scale, color="gray", linestyle=style, label=LABELS[v])
    ax.set_xscale("log", base=2)
    if key == "memory_bytes":
      ax.set_yscale("log")
    ax.set_xlabel("N (micro-batches per optimizer step)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = f"{stem}-{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def _device_slug(device: dict) -> str:
  if device["platform"] == "cpu":
    return f"cpu-{os.cpu_count()}core"
  return "-".join(device["kind"].lower().split())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny", help="tiny (default) or gpt2-small")
  for field in ("layers", "d_model", "heads", "seq", "vocab", "batch"):
    parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None,
                        help=f"override the config's {field}")
  parser.add_argument("--dtype", default=None, help="override the compute dtype")
  parser.add_argument("--ns", default="2,4,8,16", help="numbers of micro-batches")
  parser.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (>= 10)")
  parser.add_argument("--warmup", type=int, default=3, help="warm-up steps (>= 1)")
  parser.add_argument("--rounds", type=int, default=1,
                      help="run every variant this many times, round-robin, and take "
                           "the median over all their steps (evens out a shared "
                           "machine's load)")
  parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
  parser.add_argument("--name", default=None, help="file stem (default: device-config-date)")
  parser.add_argument("--timeout", type=float, default=600, help="seconds per variant")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker is not None:
    print(RESULT_PREFIX + json.dumps(worker(json.loads(args.worker))), flush=True)
    return

  from benchmarks import gpt, variants

  if args.steps < 10 or args.warmup < 1:
    parser.error(f"need --steps >= 10 and --warmup >= 1, got {args.steps=}, {args.warmup=}")
  if args.config not in gpt.CONFIGS:
    parser.error(f"unknown --config {args.config!r}; known: {sorted(gpt.CONFIGS)}")
  overrides = {f: getattr(args, f) for f in ("layers", "d_model", "heads", "seq", "vocab",
                                              "batch", "dtype")
               if getattr(args, f) is not None}
  config = dataclasses.replace(gpt.CONFIGS[args.config], **overrides)
  ns = [int(n) for n in args.ns.split(",")]
  names = args.variants.split(",") if args.variants else list(variants.STEP_VARIANTS)
  unknown = set(names) - set(variants.STEP_VARIANTS)
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; known: {variants.STEP_VARIANTS}")

  jobs = [(v, 1) for v in names if v not in variants.ACCUMULATING]
  jobs += [(v, n) for v in names if v in variants.ACCUMULATING for n in ns]
  if any(v in variants.ACCUMULATING for v in names):
    jobs += [("pass", n) for n in [1, *ns]] + [("update", 1)]
  started = time.perf_counter()
  rounds = {}
  for r in range(args.rounds):
    for v, n in jobs:
      job = {"variant": v, "n": n, "config": dataclasses.asdict(config),
             "steps": args.steps, "warmup": args.warmup}
      result = _run_job(job, args.timeout)
      rounds.setdefault((v, n), []).append(result)
      print(f"round {r + 1}/{args.rounds} {v:>22} N={n:<3} "
            f"{result['median_s'] * 1e3:9.2f} ms/step  temp "
            f"{_mib(result['temp_bytes']):>8} MiB  compile {result['compile_s']:.1f} s",
            flush=True)
  results = [_merge(runs) for runs in rounds.values()]

  import flax
  import jax
  import optax

  import jaxaccum

  device = results[0]["device"]
  date = datetime.date.today().isoformat()
  config_name = args.config + ("+" + ",".join(f"{k}={v}" for k, v in overrides.items())
                               if overrides else "")
  stem = args.name or f"{_device_slug(device)}-{args.config}-{date}"
  os.makedirs(args.out_dir, exist_ok=True)
  base = os.path.join(args.out_dir, stem)
  machine = (f"{device['kind']} ({device['platform']}), host {platform.machine()} with "
             f"{os.cpu_count()} cores")
  meta = {
      "machine": machine, "platform": device["platform"], "date": date,
      "versions": {"jax": jax.__version__, "flax": flax.__version__,
                   "optax": optax.__version__, "jaxaccum": jaxaccum.__version__,
                   "python": platform.python_version()},
      "config_name": config_name, "config": dataclasses.asdict(config),
      "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
      "command": " ".join(["PYTHONPATH=. python3 benchmarks/bench_step.py",
                           *(argv if argv is not None else sys.argv[1:])]),
      "wall_s": time.perf_counter() - started,
  }
  summary = summarize(results, ns)
  with open(base + ".json", "w") as f:
    json.dump({"meta": meta, "summary": summary, "results": results}, f, indent=1)
  title = f"{config_name} on {device['kind']}, {date}"
  pngs = plots(summary, base, title)
  md = markdown(meta, summary)
  md += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})"
                         for p in pngs) + "\n"
  with open(base + ".md", "w") as f:
    f.write(md)
  print(md)
  print(f"wrote {base}.json, {base}.md, {', '.join(pngs)} in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
  main()
