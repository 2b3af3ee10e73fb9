"""Where a compiled step communicates: collectives inside and outside loops.

Reads the optimized HLO text of a compiled function (what XLA will run, after
sharding propagation, SPMD partitioning and collective combining) and counts
the collectives of each kind by where they sit: in the body or condition of a
``while`` loop (run once per iteration, i.e. once per micro-batch for a
``lax.scan``), or outside every loop (run once per call). A computation
counts as inside a loop when it is reachable from a ``while`` through any
chain of calls (``body=``, ``condition=``, ``calls=``, ``to_apply=``,
conditional branches, ...), so a collective nested in a fusion, a call or a
conditional inside the loop is found too.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

# HLO opcode -> field of CollectivesByKind. An asynchronous collective is a
# ``*-start`` / ``*-done`` pair; only the start is counted.
_KINDS = {
    "all-reduce": "all_reduce",
    "all-reduce-start": "all_reduce",
    "reduce-scatter": "reduce_scatter",
    "all-gather": "all_gather",
    "all-gather-start": "all_gather",
    "all-to-all": "all_to_all",
    "ragged-all-to-all": "all_to_all",
    "collective-permute": "collective_permute",
    "collective-permute-start": "collective_permute",
}
_LOOP_ATTRS = ("body", "condition")
_BRANCH_ATTRS = ("branch_computations", "true_computation", "false_computation")
_CALL_ATTRS = ("calls", "to_apply", "called_computations")
_ATTR_RE = re.compile(
    r"\b(" + "|".join(_LOOP_ATTRS + _BRANCH_ATTRS + _CALL_ATTRS)
    + r")=(\{[^}]*\}|%?[\w.\-]+)")
_NAME_RE = re.compile(r"%?([\w.\-]+)")
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)")
_INSTRUCTION_RE = re.compile(r"^\s+(?:ROOT\s+)?%?[^\s=]+\s*=\s*(.*)$")
_OPCODE_RE = re.compile(r"\s*([\w\-]+)\(")


class CollectivesByKind(NamedTuple):
  """Numbers of collective operations in a compiled program, by kind.

  Attributes:
    all_reduce: ``all-reduce`` (and asynchronous ``all-reduce-start``) ops:
      what ``psum`` / ``pmean`` and a sharded gradient reduction compile to.
      XLA combines the all-reduces of many parameters into one tuple
      all-reduce, which counts once.
    reduce_scatter: ``reduce-scatter`` ops.
    all_gather: ``all-gather`` ops: data gathered onto more devices.
    all_to_all: ``all-to-all`` (and ``ragged-all-to-all``) ops.
    collective_permute: ``collective-permute`` ops: data sent device to
      device.

  Example:

    >>> import jaxaccum
    >>> counts = jaxaccum.CollectivesByKind(all_reduce=2, all_gather=1)
    >>> counts, counts.total, counts.moving_data
    (CollectivesByKind(all_reduce=2, all_gather=1), 3, 1)
  """

  all_reduce: int = 0
  reduce_scatter: int = 0
  all_gather: int = 0
  all_to_all: int = 0
  collective_permute: int = 0

  @property
  def total(self) -> int:
    """All collectives, of every kind."""
    return sum(self)

  @property
  def moving_data(self) -> int:
    """All-gathers, all-to-alls and collective-permutes: ops that move rows."""
    return self.all_gather + self.all_to_all + self.collective_permute

  def __repr__(self) -> str:
    # Only the kinds present, so a printed count reads at a glance.
    fields = ", ".join(f"{k}={v}" for k, v in zip(self._fields, self) if v)
    return f"{type(self).__name__}({fields})"


class CollectiveCounts(NamedTuple):
  """Where the collectives of a compiled function sit.

  ``inside_loops`` and ``outside_loops`` split every collective of the
  program in two; ``in_conditionals`` counts again those of either that run
  only in a branch of a conditional (``lax.cond`` / ``lax.switch``).

  Attributes:
    inside_loops: collectives in a ``while`` loop's body or condition, at any
      depth: they run once per iteration (per micro-batch of a
      ``lax.scan``). An accumulation loop should have none.
    outside_loops: collectives outside every loop: they run (at most) once
      per call.
    in_conditionals: collectives, inside or outside loops, that sit in a
      branch of a conditional and so run only when that branch is taken.

  Example:

    >>> import jax, jaxaccum
    >>> f = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i")
    >>> counts = jaxaccum.count_collectives(f, jax.numpy.ones((8, 2)))
    >>> counts
    CollectiveCounts(inside_loops=CollectivesByKind(),
                     outside_loops=CollectivesByKind(all_reduce=1),
                     in_conditionals=CollectivesByKind())
    >>> counts.total.all_reduce
    1
  """

  inside_loops: CollectivesByKind
  outside_loops: CollectivesByKind
  in_conditionals: CollectivesByKind

  @property
  def total(self) -> CollectivesByKind:
    """All collectives of the program, by kind."""
    return CollectivesByKind(*(a + b for a, b in zip(self.inside_loops,
                                                     self.outside_loops)))


def count_collectives(fn: Callable[..., Any] | jax.stages.Lowered | jax.stages.Compiled | str,
                      *args: Any, **kwargs: Any) -> CollectiveCounts:
  """Counts a compiled function's collectives inside and outside while loops.

  Compiles ``fn`` for ``args`` (``fn.lower(*args, **kwargs).compile()``, the
  same as the first call would) and reads the optimized HLO, so what is
  counted is what XLA will run, after sharding propagation and the combining
  of collectives, for the devices and shardings ``args`` have. Nothing is
  executed.

  Args:
    fn: a ``jax.jit`` or ``jax.pmap`` function (any other callable is wrapped
      in ``jax.jit``); or an already lowered (``jax.stages.Lowered``) or
      compiled (``jax.stages.Compiled``) function, or the optimized HLO text
      itself (``compiled.as_text()``), in which case no ``args`` are given.
    *args: the arguments to compile ``fn`` for: arrays (with the shardings
      the real call will have) or ``jax.ShapeDtypeStruct``.
    **kwargs: keyword arguments for ``fn``.

  Returns:
    A :class:`jaxaccum.CollectiveCounts`: for ``inside_loops``,
    ``outside_loops`` and ``in_conditionals``, a
    :class:`jaxaccum.CollectivesByKind` of all-reduces, reduce-scatters,
    all-gathers, all-to-alls and collective-permutes.

  Raises:
    ValueError: ``args`` given with a ``Lowered``, ``Compiled`` or HLO text,
      or HLO text that holds no computation.

  Example:

    >>> import jax, jax.numpy as jnp, jaxaccum
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> def loss(w, x):
    ...   return jnp.mean((x @ w) ** 2)
    >>> w = jnp.ones((4, 2))
    >>> x = jax.device_put(jnp.ones((64, 4)), NamedSharding(mesh, P("data")))
    >>> step = jaxaccum.grad(loss, num_microbatches=4, data_axis="data", mesh=mesh)
    >>> counts = jaxaccum.count_collectives(jax.jit(step), w, x)
    >>> counts.inside_loops.total, counts.outside_loops.all_reduce
    (0, 1)

    Without ``data_axis``, XLA reduces the gradient in every micro-step:

    >>> naive = jax.jit(jaxaccum.grad(loss, num_microbatches=4))
    >>> jaxaccum.count_collectives(naive, w, x).inside_loops.all_reduce
    1
  """
  if isinstance(fn, (str, jax.stages.Lowered, jax.stages.Compiled)) and (args or kwargs):
    raise ValueError(
        "arguments are only taken with a function to compile, not with a "
        f"{type(fn).__name__}: got {len(args)} positional and {sorted(kwargs)} "
        "keyword arguments")
  if isinstance(fn, str):
    text = fn
  else:
    if isinstance(fn, jax.stages.Lowered):
      fn = fn.compile()
    elif not isinstance(fn, jax.stages.Compiled):
      fn = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args, **kwargs).compile()
    text = fn.as_text()
  return _count(text)


def _count(text: str) -> CollectiveCounts:
  """Counts the collectives of optimized HLO text by where they sit."""
  computations, entry = _parse(text)
  if not computations:
    raise ValueError("the HLO text holds no computation (pass the optimized HLO: "
                     "jax.jit(f).lower(*args).compile().as_text())")
  # Each computation is reached with some of the flags (in a loop, in a
  # branch); propagate every combination along the call edges.
  called = {callee for comp in computations.values() for callee, _ in comp[1]}
  roots = [entry] if entry is not None else [c for c in computations if c not in called]
  reached = collections.defaultdict(set)
  stack = [(root, False, False) for root in roots]
  while stack:
    name, in_loop, in_branch = stack.pop()
    if name not in computations or (in_loop, in_branch) in reached[name]:
      continue
    reached[name].add((in_loop, in_branch))
    for callee, edge in computations[name][1]:
      stack.append((callee, in_loop or edge == "loop", in_branch or edge == "branch"))

  inside = collections.Counter()
  outside = collections.Counter()
  branches = collections.Counter()
  for name, flags in reached.items():
    for kind in computations[name][0]:
      # A computation reached both ways is counted where it is costlier.
      (inside if any(loop for loop, _ in flags) else outside)[kind] += 1
      if any(branch for _, branch in flags):
        branches[kind] += 1
  return CollectiveCounts(
      inside_loops=CollectivesByKind(**inside),
      outside_loops=CollectivesByKind(**outside),
      in_conditionals=CollectivesByKind(**branches))


def _parse(text: str) -> tuple[dict[str, tuple[list[str], list[tuple[str, str]]]], str | None]:
  """Each computation's collectives and call edges, and the entry's name.

  Returns ``({name: (collective kinds, [(callee, edge)])}, entry)`` where
  ``edge`` is ``"loop"``, ``"branch"`` or ``"call"``.
  """
  computations = {}
  entry = None
  current = None
  for line in text.splitlines():
    if not line.strip():
      continue
    if not line[0].isspace():
      if line.rstrip().endswith("{") and not line.startswith("HloModule"):
        header = _HEADER_RE.match(line)
        current = ([], [])
        computations[header.group(2)] = current
        if header.group(1):
          entry = header.group(2)
      elif line.startswith("}"):
        current = None
      continue
    if current is None:
      continue
    instruction = _INSTRUCTION_RE.match(line)
    if instruction is None:
      continue
    rest = instruction.group(1)
    opcode = _OPCODE_RE.match(rest, _skip_shape(rest))
    if opcode is not None and opcode.group(1) in _KINDS:
      current[0].append(_KINDS[opcode.group(1)])
    for attr, value in _ATTR_RE.findall(rest):
      edge = ("loop" if attr in _LOOP_ATTRS else
              "branch" if attr in _BRANCH_ATTRS else "call")
      current[1].extend((callee, edge) for callee in _NAME_RE.findall(value))
  return computations, entry


def _skip_shape(rest: str) -> int:
  """Index just past the result shape that starts ``rest``.

  A shape is one token (``f32[2,16]{1,0}``) or a parenthesized tuple of them,
  possibly with spaces and ``/*index=5*/`` comments inside.
  """
  depth = 0
  for i, char in enumerate(rest):
    if char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char.isspace() and depth == 0:
      return i
  return len(rest)
