"""Where an in-step accumulation loop spends beyond the gradient passes.

Compiles the one-jit-step variants of :mod:`benchmarks.variants` at ``N``
micro-batches (``jaxaccum``, the hand-written ``scan``, and
``optax_microbatch``) and reads their optimized HLO:

* the ``while`` body's top-level ops by opcode, and the bytes its ``copy``
  ops move per iteration (loop-carried buffers copied instead of updated in
  place);
* ``convert`` ops inside the body that read a loop-invariant operand (a
  parameter cast to the compute dtype again in every micro-step) and their
  bytes per iteration;
* the accumulate: the body's element-wise ``add`` ops producing a
  parameter-shaped value, and whether each is fused with the op computing
  the gradient or is a separate pass over the gradient buffers;
* donation: how many step outputs alias a donated input.

It also times the ``jaxaccum`` and ``scan`` steps alternately in one process
(interleaved, so machine load hits both alike). Prints JSON::

  PYTHONPATH=. python3 benchmarks/hlo_probe.py [--config tiny] [--dtype bfloat16] [--n 8]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from jaxaccum._tools.hlo_parser import parse, reachable, shape_bytes  # noqa: E402


def analyze(text: str, param_shapes: set[str]) -> dict:
  """The loop facts listed in the module docstring, from optimized HLO text."""
  module = parse(text)
  comps = module.computations
  whiles = [i for c in reachable(module) for i in comps[c] if i.opcode == "while"]
  if len(whiles) != 1:
    return {"while_loops": len(whiles)}
  body = comps[dict(whiles[0].calls)["body"]]
  ops = collections.Counter(i.opcode for i in body)

  # Loop-invariant values: carry elements the body passes through unchanged.
  param = next(i.name for i in body if i.opcode == "parameter")
  gte = {i.name: int(re.search(r"index=(\d+)", i.text).group(1))
         for i in body if i.opcode == "get-tuple-element" and i.operands == (param,)}
  root = next(i for i in body if i.root)
  invariant = {name for name, k in gte.items()
               if k < len(root.operands) and root.operands[k] == name}

  def inner_ops(ins):
    return [j for _, c in ins.calls for j in comps.get(c, [])] if ins.calls else [ins]

  constants = {i.name for i in body if i.opcode == "constant"}
  casts, cast_bytes = 0, 0
  for ins in body:
    # A cast whose inputs are all loop-invariant: recomputed every iteration.
    inputs = set(ins.operands) - constants
    if (inputs and inputs <= invariant
        and any(j.opcode == "convert" for j in inner_ops(ins))):
      casts += 1
      cast_bytes += shape_bytes(ins.shape)

  def strip(shape):
    return re.sub(r"\{[^}]*\}", "", shape)

  separate, fused = 0, 0
  sep_bytes = 0
  for ins in body:
    shape = strip(ins.shape)
    if shape not in param_shapes:
      continue
    inner = inner_ops(ins)
    if not any(j.opcode == "add" and j.root for j in inner) and ins.opcode != "add":
      continue
    if not set(ins.operands) & set(gte):
      continue  # not reading the loop carry: not an accumulate
    heavy = {"dot", "convolution", "reduce", "custom-call"}
    if any(j.opcode in heavy for j in inner):
      fused += 1
    else:
      separate += 1
      sep_bytes += 3 * shape_bytes(shape)  # read acc, read grad, write acc
  copies = [i for i in body if i.opcode == "copy"]
  return {
      "while_loops": 1,
      "body_top_level_ops": dict(ops.most_common()),
      "body_copies": len(copies),
      "body_copy_bytes_per_iteration": sum(shape_bytes(i.shape) for i in copies),
      "body_invariant_casts": casts,
      "body_invariant_cast_bytes_per_iteration": cast_bytes,
      "accumulate_adds_separate": separate,
      "accumulate_adds_fused_with_producer": fused,
      "accumulate_separate_bytes_per_iteration": sep_bytes,
      "donated_outputs": text.split("\n", 1)[0].count("may-alias")
      + text.split("\n", 1)[0].count("must-alias"),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny")
  parser.add_argument("--dtype", default=None, help="override the compute dtype")
  parser.add_argument("--n", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
  parser.add_argument("--dump-dir", default=None, help="also write the HLO text here")
  args = parser.parse_args()

  import jax

  from benchmarks import gpt, variants

  config = gpt.CONFIGS[args.config]
  if args.dtype:
    config = dataclasses.replace(config, dtype=args.dtype)
  params = gpt.init_params(config)
  hlo_dtype = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
  param_shapes = {f"{hlo_dtype[x.dtype.name]}[{','.join(map(str, x.shape))}]"
                  for x in jax.tree.leaves(params)}
  report = {"config": dataclasses.asdict(config), "n": args.n,
            "device": jax.devices()[0].device_kind, "variants": {}}
  runs = {}
  for name in ("jaxaccum", "scan", "optax_microbatch"):
    v = variants.build(name, config, args.n)
    (program,) = v.programs
    compiled = program.fn.lower(*program.args).compile()
    text = compiled.as_text()
    if args.dump_dir:
      os.makedirs(args.dump_dir, exist_ok=True)
      with open(os.path.join(args.dump_dir, f"{name}-{config.dtype}-n{args.n}.hlo"), "w") as f:
        f.write(text)
    mem = compiled.memory_analysis()
    facts = analyze(text, param_shapes)
    facts["temp_bytes"] = mem.temp_size_in_bytes
    facts["alias_bytes"] = mem.alias_size_in_bytes
    report["variants"][name] = facts
    runs[name] = (v, {"step": compiled})

  times = {name: [] for name in ("jaxaccum", "scan")}
  states = {name: runs[name][0].state for name in times}
  for name in times:  # warm-up
    v, compiled = runs[name]
    for _ in range(2):
      states[name], loss = v.step(compiled, states[name])
    jax.block_until_ready(states[name])
  for _ in range(args.steps):
    for name in times:
      v, compiled = runs[name]
      start = time.perf_counter()
      states[name], loss = v.step(compiled, states[name])
      jax.block_until_ready((states[name], loss))
      times[name].append(time.perf_counter() - start)
  report["interleaved_median_ms"] = {k: statistics.median(t) * 1e3 for k, t in times.items()}
  report["interleaved_min_ms"] = {k: min(t) * 1e3 for k, t in times.items()}
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
