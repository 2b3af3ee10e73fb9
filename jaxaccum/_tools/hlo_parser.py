"""Reading optimized HLO text: computations, instructions, shapes and bytes.

The text is what ``jax.jit(f).lower(*args).compile().as_text()`` prints: a
``HloModule`` line, then computations, each a header line ending in ``{``,
one instruction per indented line (``[ROOT] name = shape opcode(operands),
attributes``) and a closing ``}``. Names may carry a ``%`` prefix or not
(newer XLA versions drop it), and operands may be printed with their shapes
or without; both forms are read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import NamedTuple

# Attributes naming the computations an instruction calls.
LOOP_ATTRS = ("body", "condition")
BRANCH_ATTRS = ("branch_computations", "true_computation", "false_computation")
_CALL_ATTRS = ("calls", "to_apply", "called_computations")
_ATTR_RE = re.compile(
    r"\b(" + "|".join(LOOP_ATTRS + BRANCH_ATTRS + _CALL_ATTRS)
    + r")=(\{[^}]*\}|%?[\w.\-]+)")
_NAME_RE = re.compile(r"%?([\w.\-]+)")
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)")
_INSTRUCTION_RE = re.compile(r"^\s+(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_OPCODE_RE = re.compile(r"\s*([\w\-]+)\(")
_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_BITS_RE = re.compile(r"(?:s|u|f|bf|c)(\d+)(?:[a-z][a-z0-9]*)?")
# Opcodes whose parenthesized payload is a literal, not operand names.
_LITERAL_OPCODES = ("parameter", "constant")


class Instruction(NamedTuple):
  """One HLO instruction.

  Attributes:
    name: its name, without ``%``.
    shape: its result shape as printed, e.g. ``f32[8,4]{1,0}`` or a
      parenthesized tuple ``(s32[], f32[4]{0})``.
    opcode: e.g. ``all-reduce``, ``fusion``, ``while``.
    operands: the operands' names, without ``%``.
    operand_shapes: the operands' shapes where the text prints them, else
      ``""`` for each.
    calls: ``(attribute, computation)`` for each computation it calls, e.g.
      ``("body", "region_1")``.
    root: whether it is its computation's ``ROOT``.
    text: everything after ``name =``, for reading other attributes.
  """

  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  operand_shapes: tuple[str, ...]
  calls: tuple[tuple[str, str], ...]
  root: bool
  text: str


class Module(NamedTuple):
  """A parsed HLO module.

  Attributes:
    computations: each computation's instructions, in order, by name.
    entry: the name of the ``ENTRY`` computation.
  """

  computations: dict[str, list[Instruction]]
  entry: str


def parse(text: str) -> Module:
  """The computations and entry of optimized HLO text.

  Raises:
    ValueError: ``text`` is not HLO text (it does not start with
      ``HloModule``: empty, StableHLO, anything else) or holds no ``ENTRY``
      computation.
  """
  _check_is_hlo(text)
  computations: dict[str, list[Instruction]] = {}
  entry = None
  current = None
  for line in text.splitlines():
    if not line.strip():
      continue
    if not line[0].isspace():
      if line.rstrip().endswith("{") and not line.startswith("HloModule"):
        header = _HEADER_RE.match(line)
        current = computations.setdefault(header.group(2), [])
        if header.group(1):
          entry = header.group(2)
      elif line.startswith("}"):
        current = None
      continue
    if current is not None:
      instruction = _instruction(line)
      if instruction is not None:
        current.append(instruction)
  if entry is None:
    raise ValueError(
        "the HLO text holds no computation marked ENTRY: pass the whole "
        "optimized HLO module, jax.jit(f).lower(*args).compile().as_text()")
  return Module(computations, entry)


def _check_is_hlo(text: str) -> None:
  """Raises a ValueError saying what text is taken, unless ``text`` is HLO."""
  first = next((line.strip() for line in text.splitlines() if line.strip()), "")
  if first.startswith("HloModule"):
    return
  if not first:
    got = "empty text"
  elif "stablehlo." in text or first.startswith("module"):
    got = ("StableHLO (the text of a Lowered, before XLA optimizes it and "
           "inserts the collectives); pass the Lowered itself or "
           "lowered.compile().as_text()")
  else:
    got = f"text starting {first[:60]!r}"
  raise ValueError(
      "expected the optimized HLO text of a compiled function, starting with "
      "'HloModule': jax.jit(f).lower(*args).compile().as_text() (or pass the "
      f"function and its arguments instead); got {got}")


def _instruction(line: str) -> Instruction | None:
  """The instruction on ``line``, or None for a line that holds none."""
  match = _INSTRUCTION_RE.match(line)
  if match is None:
    return None
  root, name, rest = match.groups()
  end_of_shape = _skip_shape(rest)
  opcode = _OPCODE_RE.match(rest, end_of_shape)
  if opcode is None:
    return None
  close = _closing(rest, opcode.end() - 1)
  operands = [] if opcode.group(1) in _LITERAL_OPCODES else [
      item.strip() for item in _split_top_level(rest[opcode.end():close]) if item.strip()]
  # "f32[8]{0} %p" or "%p": the name is the last token.
  names = [item.rsplit(None, 1)[-1].lstrip("%") for item in operands]
  shapes = [item[:len(item) - len(item.rsplit(None, 1)[-1])].strip() for item in operands]
  calls = tuple((attr, callee) for attr, value in _ATTR_RE.findall(rest[close:])
                for callee in _NAME_RE.findall(value))
  return Instruction(name=name.lstrip("%"), shape=rest[:end_of_shape],
                     opcode=opcode.group(1), operands=tuple(names),
                     operand_shapes=tuple(shapes), calls=calls, root=bool(root),
                     text=rest)


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


def _closing(text: str, start: int) -> int:
  """Index of the bracket closing the one at ``text[start]`` (or the end)."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i
  return len(text)


def _split_top_level(text: str) -> Iterator[str]:
  """``text`` split at the commas outside any brackets."""
  depth, start = 0, 0
  for i, char in enumerate(text):
    if char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      yield text[start:i]
      start = i + 1
  yield text[start:]


def tuple_elements(shape: str) -> list[str]:
  """The top-level elements of a tuple shape; ``[shape]`` for an array."""
  shape = re.sub(r"/\*.*?\*/", "", shape).strip()
  if not shape.startswith("("):
    return [shape]
  return [s.strip() for s in _split_top_level(shape[1:_closing(shape, 0)])]


def shape_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape (a tuple's elements summed).

  ``f32[1024,256]{1,0}`` is ``4 * 1024 * 256``; sub-byte types (``s4``) are
  packed; a dynamic dimension (``<=8``) counts at its bound; ``token[]`` is 0.

  Raises:
    ValueError: an element type or dimension it cannot size.
  """
  total = 0
  for dtype, dims in _ARRAY_RE.findall(re.sub(r"\{[^}]*\}", "", shape)):
    elements = math.prod(_dimension(d, shape) for d in dims.split(",") if d.strip())
    total += -(-elements * _bits(dtype, shape) // 8)
  return total


def _bits(dtype: str, shape: str) -> int:
  if dtype == "pred":
    return 8
  if dtype == "token":
    return 0
  match = _BITS_RE.fullmatch(dtype)
  if match is None:
    raise ValueError(f"unknown HLO element type {dtype!r} in shape {shape!r}")
  return int(match.group(1))


def _dimension(text: str, shape: str) -> int:
  text = text.strip().removeprefix("<=")
  if not text.isdigit():
    raise ValueError(f"cannot size dimension {text!r} of shape {shape!r}")
  return int(text)


def reachable(module: Module, start: str | None = None) -> set[str]:
  """The computations ``start`` (default: the entry) calls, at any depth, and itself."""
  seen: set[str] = set()
  todo = [module.entry if start is None else start]
  while todo:
    name = todo.pop()
    if name in seen or name not in module.computations:
      continue
    seen.add(name)
    todo.extend(callee for ins in module.computations[name] for _, callee in ins.calls)
  return seen
