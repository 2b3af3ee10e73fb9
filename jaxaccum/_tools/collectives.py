"""Where a compiled step communicates: collectives inside and outside loops.

Reads the optimized HLO text of a compiled function (what XLA will run, after
sharding propagation, SPMD partitioning and collective combining) and counts
the collectives of each kind, and the bytes they handle, by where they sit:
in the body or condition of a ``while`` loop (run once per iteration, i.e.
once per micro-batch for a ``lax.scan``), or outside every loop (run once per
call). A computation counts as inside a loop when it is reachable from a
``while`` through any chain of calls (``body=``, ``condition=``, ``calls=``,
``to_apply=``, conditional branches, ...), so a collective nested in a
fusion, a call or a conditional inside the loop is found too.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jaxaccum._tools import hlo_parser

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
# Asynchronous starts whose result is a tuple (operands, results, ...).
_TUPLE_STARTS = ("all-gather-start", "collective-permute-start")


class CollectivesByKind(NamedTuple):
  """Collective operations of a compiled program, by kind: numbers or bytes.

  In :class:`jaxaccum.CollectiveCounts` each field is a number of
  operations; in its ``bytes`` each field is the bytes those operations
  handle on one device (see :func:`jaxaccum.count_collectives`).

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
    """All collectives (or their bytes), of every kind."""
    return sum(self)

  @property
  def moving_data(self) -> int:
    """All-gathers, all-to-alls and collective-permutes: ops that move rows."""
    return self.all_gather + self.all_to_all + self.collective_permute

  def __repr__(self) -> str:
    # Only the kinds present, so a printed count reads at a glance.
    fields = ", ".join(f"{k}={v}" for k, v in zip(self._fields, self) if v)
    return f"{type(self).__name__}({fields})"


class _Placement(NamedTuple):
  inside_loops: CollectivesByKind
  outside_loops: CollectivesByKind
  in_conditionals: CollectivesByKind


class CollectiveCounts(_Placement):
  """Where the collectives of a compiled function sit, and their bytes.

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
    bytes: the same split in bytes, a ``CollectiveCounts`` whose fields hold
      the bytes the collectives handle on one device (each counted once, like
      the operations); ``None`` for counts built by hand. Not one of the
      tuple's fields: equality, unpacking and ``jax.tree`` functions see the
      three counts only.

  Example:

    >>> import jax, jaxaccum
    >>> f = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i")
    >>> counts = jaxaccum.count_collectives(f, jax.numpy.ones((8, 256)))
    >>> counts
    CollectiveCounts(inside_loops=CollectivesByKind(),
                     outside_loops=CollectivesByKind(all_reduce=1),
                     in_conditionals=CollectivesByKind())
    >>> counts.total.all_reduce
    1

    Each device all-reduces its 256 float32 values, 1 KiB:

    >>> counts.bytes.outside_loops
    CollectivesByKind(all_reduce=1024)
    >>> counts.bytes.inside_loops.total
    0
  """

  def __new__(cls, inside_loops: CollectivesByKind, outside_loops: CollectivesByKind,
              in_conditionals: CollectivesByKind, bytes: CollectiveCounts | None = None):
    self = super().__new__(cls, inside_loops, outside_loops, in_conditionals)
    self.__dict__["_bytes"] = bytes
    return self

  @property
  def bytes(self) -> CollectiveCounts | None:
    """The bytes of the collectives, split as the counts are."""
    # Absent on a copy made by _replace or jax.tree.map: its counts may differ.
    return self.__dict__.get("_bytes")

  @property
  def total(self) -> CollectivesByKind:
    """All collectives of the program, by kind."""
    return CollectivesByKind(*(a + b for a, b in zip(self.inside_loops,
                                                     self.outside_loops)))


def count_collectives(fn: Callable[..., Any] | jax.stages.Lowered | jax.stages.Compiled | str,
                      *args: Any, **kwargs: Any) -> CollectiveCounts:
  """Counts a compiled function's collectives, and their bytes, by placement.

  Compiles ``fn`` for ``args`` (``fn.lower(*args, **kwargs).compile()``, the
  same as the first call would) and reads the optimized HLO, so what is
  counted is what XLA will run, after sharding propagation and the combining
  of collectives, for the devices and shardings ``args`` have. Nothing is
  executed.

  Bytes are read from the HLO shapes, per device: each collective counts the
  full data it reduces, gathers or sends on one device, the larger of its
  input and output buffers. An all-reduce counts its result (the reduced
  data), an all-gather its result (the gathered data), a reduce-scatter its
  operand (the data reduced, ``n`` times its result over ``n`` devices), an
  all-to-all or collective-permute its result. A tuple (combined) collective
  counts all its arrays; an asynchronous ``*-start`` counts the data it
  produces once. A ring algorithm sends about ``(n - 1) / n`` of these bytes
  per device (twice that for an all-reduce). Bytes count operations in the
  program, not executions, like the counts: a collective inside a loop runs
  once per iteration.

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
    all-gathers, all-to-alls and collective-permutes; its ``bytes``, the
    same in bytes.

  Raises:
    TypeError: ``fn`` is none of the above.
    ValueError: ``args`` given with a ``Lowered``, ``Compiled`` or HLO text;
      or text that is not optimized HLO (empty, StableHLO from
      ``lowered.as_text()``, anything not starting with ``HloModule``) or
      holds no ``ENTRY`` computation.

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
    >>> counts.bytes.outside_loops.all_reduce  # the (4, 2) float32 gradient
    32

    Without ``data_axis``, XLA reduces the gradient in every micro-step:

    >>> naive = jax.jit(jaxaccum.grad(loss, num_microbatches=4))
    >>> naive_counts = jaxaccum.count_collectives(naive, w, x)
    >>> naive_counts.inside_loops.all_reduce, naive_counts.bytes.inside_loops.all_reduce
    (1, 32)
  """
  if isinstance(fn, (str, jax.stages.Lowered, jax.stages.Compiled)) and (args or kwargs):
    raise ValueError(
        "arguments are only taken with a function to compile, not with a "
        f"{type(fn).__name__}: got {len(args)} positional and {sorted(kwargs)} "
        "keyword arguments")
  if isinstance(fn, str):
    text = fn
  elif isinstance(fn, jax.stages.Lowered):
    text = fn.compile().as_text()
  elif isinstance(fn, jax.stages.Compiled):
    text = fn.as_text()
  elif callable(fn):
    text = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args, **kwargs).compile().as_text()
  else:
    raise TypeError(
        f"count_collectives takes a function, a Lowered, a Compiled or optimized "
        f"HLO text, got {fn!r} of type {type(fn).__name__}")
  return _count(hlo_parser.parse(text))


def _count(module: hlo_parser.Module) -> CollectiveCounts:
  """Counts a module's collectives, and their bytes, by where they sit."""
  # Per placement (inside loops, outside loops, in conditionals) and kind.
  numbers = [collections.Counter() for _ in CollectiveCounts._fields]
  sizes = [collections.Counter() for _ in CollectiveCounts._fields]
  for name, reached in _placements(module).items():
    # A computation reached both ways is counted where it is costlier.
    in_loop = any(loop for loop, _ in reached)
    in_branch = any(branch for _, branch in reached)
    places = [0 if in_loop else 1] + ([2] if in_branch else [])
    instructions = module.computations[name]
    for ins in instructions:
      if ins.opcode in _KINDS:
        size = _data_bytes(ins, instructions)
        for place in places:
          numbers[place][_KINDS[ins.opcode]] += 1
          sizes[place][_KINDS[ins.opcode]] += size
  return CollectiveCounts(*(CollectivesByKind(**c) for c in numbers),
                          bytes=CollectiveCounts(*(CollectivesByKind(**c) for c in sizes)))


def _placements(module: hlo_parser.Module) -> dict[str, set[tuple[bool, bool]]]:
  """``{computation: {(in a loop, in a branch)}}`` for those the entry reaches."""
  # Each computation is reached with some of the flags; propagate every
  # combination along the call edges.
  reached = collections.defaultdict(set)
  stack = [(module.entry, False, False)]
  while stack:
    name, in_loop, in_branch = stack.pop()
    if name not in module.computations or (in_loop, in_branch) in reached[name]:
      continue
    reached[name].add((in_loop, in_branch))
    for ins in module.computations[name]:
      for attr, callee in ins.calls:
        stack.append((callee, in_loop or attr in hlo_parser.LOOP_ATTRS,
                      in_branch or attr in hlo_parser.BRANCH_ATTRS))
  return reached


def _data_bytes(ins: hlo_parser.Instruction, computation: list[hlo_parser.Instruction]) -> int:
  """Bytes of the data collective ``ins`` reduces, gathers or sends, per device."""
  if ins.opcode == "reduce-scatter":
    # The data reduced, before it is scattered; operands are printed with
    # their shapes or must be looked up.
    defined = {other.name: other.shape for other in computation}
    try:
      return sum(hlo_parser.shape_bytes(shape or defined[name])
                 for name, shape in zip(ins.operands, ins.operand_shapes))
    except KeyError as e:
      raise ValueError(f"operand {e} of {ins.name} is not defined in its computation") from None
  shape = ins.shape
  if ins.opcode in _TUPLE_STARTS:
    elements = hlo_parser.tuple_elements(shape)
    shape = elements[1] if len(elements) > 1 else elements[0]
  return hlo_parser.shape_bytes(shape)
