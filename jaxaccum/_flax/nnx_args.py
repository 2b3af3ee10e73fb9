"""NNX objects among a loss's arguments: split into arrays, merged back.

An argument of the loss is an NNX object (a module, an ``nnx.Rngs``), a
pytree holding some (``(model, head)``, ``{"encoder": m}``), or arrays. Each
NNX object is split into its variables by role (:data:`PARTS`), so the core
sees arrays only; the loss sees fresh NNX objects merged from them. A
differentiated argument becomes the pytree that :func:`flax.nnx.grad` returns
for it: every NNX object replaced by the :class:`flax.nnx.State` of its
differentiated variables, the arrays beside them kept (and differentiated).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
from flax import nnx

from jaxaccum import _compat

# The variables of each NNX object, in the order nnx.split returns them; the
# first filter that matches a variable wins.
PARTS = ("diff", "stats", "keys", "frozen", "rest")


def filters(diff_filter: Any) -> tuple:
  """The filters of :data:`PARTS`, for an object differentiated by ``diff_filter``."""
  return (diff_filter, nnx.BatchStat, nnx.RngKey, nnx.Param, ...)


def _is_node(x: Any) -> bool:
  return nnx.graph.is_graph_node(x)


class Arguments(NamedTuple):
  """Where the NNX objects are among the arguments.

  Attributes:
    treedefs: per argument, its structure with NNX objects as leaves, or
      ``None`` for an argument that holds none and is not differentiated.
    slots: ``(argument, leaf)`` of every NNX object.
    graphdefs: the graph definition of each slot's object.
    diff: ``((position, filter), ...)`` of the differentiated arguments.
  """

  treedefs: tuple
  slots: tuple[tuple[int, int], ...]
  graphdefs: tuple
  diff: tuple[tuple[int, Any], ...]

  @classmethod
  def split(cls, args: tuple, diff: Mapping[int, Any]) -> tuple[Arguments, dict, tuple]:
    """``(arguments, parts, plain)``: the structure; ``{part: one State per
    slot}``; the core's arguments (a differentiated argument as its tree)."""
    flat = [jax.tree.flatten(a, is_leaf=_is_node) for a in args]
    slots = tuple((i, j) for i, (leaves, _) in enumerate(flat)
                  for j, leaf in enumerate(leaves) if _is_node(leaf))
    holders = {i for i, _ in slots} | set(diff)
    treedefs = tuple(t if i in holders else None for i, (_, t) in enumerate(flat))
    splits = [nnx.split(flat[i][0][j], *filters(diff.get(i, nnx.Nothing))) for i, j in slots]
    arguments = cls(treedefs, slots, tuple(s[0] for s in splits), tuple(diff.items()))
    parts = {name: tuple(s[k + 1] for s in splits) for k, name in enumerate(PARTS)}
    plain = tuple(arguments._replace_nodes(i, flat[i][0], parts["diff"] if i in diff else None)
                  if t is not None else a for i, (a, t) in enumerate(zip(args, treedefs)))
    return arguments, parts, plain

  def _replace_nodes(self, position: int, leaves: list, states: tuple | None) -> Any:
    """Argument ``position`` with each NNX object replaced by its slot's
    entry of ``states`` (``None`` without them)."""
    leaves = list(leaves)
    for k, (i, j) in enumerate(self.slots):
      if i == position:
        leaves[j] = None if states is None else states[k]
    return self.treedefs[position].unflatten(leaves)

  def nodes(self, args: tuple) -> list:
    """The NNX object of each slot, in ``args``."""
    flat = {i: jax.tree.flatten(a, is_leaf=_is_node)[0] for i, a in enumerate(args)
            if self.treedefs[i] is not None}
    return [flat[i][j] for i, j in self.slots]

  def merge(self, plain: tuple, stats: tuple, rest: tuple, keys: tuple,
            frozen: tuple) -> list:
    """The loss's arguments: fresh NNX objects merged from the parts.

    ``plain`` holds the core's arguments, a differentiated one as the tree
    :meth:`split` made of it (its States are the differentiated variables).
    """
    leaves = {i: t.flatten_up_to(plain[i]) for i, t in enumerate(self.treedefs)
              if t is not None}
    diff = dict(self.diff)
    for k, (i, j) in enumerate(self.slots):
      own = leaves[i][j] if i in diff else nnx.State({})
      # A copy, so the forward pass mutates fresh variables, not the caller's.
      leaves[i][j] = _compat.nnx_merge_copy(self.graphdefs[k], own, stats[k], keys[k],
                                            frozen[k], rest[k])
    return [t.unflatten(leaves[i]) if t is not None else a
            for i, (a, t) in enumerate(zip(plain, self.treedefs))]

  def states(self, user: list) -> tuple[tuple, tuple]:
    """``(stats, rest)`` of every slot's object after the loss ran."""
    new = [nnx.split(node, *filters(dict(self.diff).get(i, nnx.Nothing)))
           for node, (i, _) in zip(self.nodes(tuple(user)), self.slots)]
    return tuple(s[2] for s in new), tuple(s[5] for s in new)
