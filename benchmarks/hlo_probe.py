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

_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR_RE = re.compile(r"^\s+(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_RE = re.compile(r"\s*([\w\-]+)\((.*)$")
_SHAPE_RE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def shape_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape string (tuples summed)."""
  total = 0
  for dtype, dims in _SHAPE_RE.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


def _split_shape(rest: str) -> tuple[str, str]:
  """``"(f32[2], s32[]) tuple(%a, %b)"`` -> the shape and what follows it."""
  if not rest.startswith("("):
    shape, _, tail = rest.partition(" ")
    return shape, tail
  depth = 0
  for k, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rest[:k + 1], rest[k + 1:]
  return rest, ""


def parse(text: str) -> tuple[dict, str]:
  """``{computation: [instruction dicts]}`` and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    m = _COMP_RE.match(line)
    if m and not line.startswith(" "):
      current = m.group(2)
      comps[current] = []
      if m.group(1):
        entry = current
      continue
    m = _INSTR_RE.match(line)
    op = m and _OP_RE.match(_split_shape(m.group(3))[1])
    if m and op and current is not None:
      rest = op.group(2)
      operands = re.findall(r"%([\w.\-]+)", rest.split("),")[0])
      called = re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", rest)
      comps[current].append({"name": m.group(2), "shape": _split_shape(m.group(3))[0],
                             "op": op.group(1),
                             "root": bool(m.group(1)), "operands": operands,
                             "called": called, "line": line})
  return comps, entry


def _reachable(comps: dict, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    for ins in comps[c]:
      todo.extend(ins["called"])
  return seen


def analyze(text: str, param_shapes: set[str]) -> dict:
  """The loop facts listed in the module docstring, from optimized HLO text."""
  comps, entry = parse(text)
  whiles = [i for c in _reachable(comps, entry) for i in comps[c] if i["op"] == "while"]
  if len(whiles) != 1:
    return {"while_loops": len(whiles)}
  body_name = re.search(r"body=%?([\w.\-]+)", whiles[0]["line"]).group(1)
  body = comps[body_name]
  ops = collections.Counter(i["op"] for i in body)

  # Loop-invariant values: carry elements the body passes through unchanged.
  param = next(i["name"] for i in body if i["op"] == "parameter")
  gte = {i["name"]: int(re.search(r"index=(\d+)", i["line"]).group(1))
         for i in body if i["op"] == "get-tuple-element" and i["operands"] == [param]}
  root = next(i for i in body if i["root"])
  invariant = {name for name, k in gte.items()
               if k < len(root["operands"]) and root["operands"][k] == name}

  def inner_ops(ins):
    return [j for c in ins["called"] for j in comps.get(c, [])] if ins["called"] else [ins]

  constants = {i["name"] for i in body if i["op"] == "constant"}
  casts, cast_bytes = 0, 0
  for ins in body:
    # A cast whose inputs are all loop-invariant: recomputed every iteration.
    inputs = set(ins["operands"]) - constants
    if (inputs and inputs <= invariant
        and any(j["op"] == "convert" for j in inner_ops(ins))):
      casts += 1
      cast_bytes += shape_bytes(ins["shape"])

  def strip(shape):
    return re.sub(r"\{[^}]*\}", "", shape)

  separate, fused = 0, 0
  sep_bytes = 0
  for ins in body:
    shape = strip(ins["shape"])
    if shape not in param_shapes:
      continue
    inner = inner_ops(ins)
    if not any(j["op"] == "add" and j["root"] for j in inner) and ins["op"] != "add":
      continue
    if not set(ins["operands"]) & set(gte):
      continue  # not reading the loop carry: not an accumulate
    heavy = {"dot", "convolution", "reduce", "custom-call"}
    if any(j["op"] in heavy for j in inner):
      fused += 1
    else:
      separate += 1
      sep_bytes += 3 * shape_bytes(shape)  # read acc, read grad, write acc
  copies = [i for i in body if i["op"] == "copy"]
  return {
      "while_loops": 1,
      "body_top_level_ops": dict(ops.most_common()),
      "body_copies": len(copies),
      "body_copy_bytes_per_iteration": sum(shape_bytes(i["shape"]) for i in copies),
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
