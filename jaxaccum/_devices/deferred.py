"""Gradients whose cross-device reduction is deferred to the cycle's end.

``jaxaccum.value_and_grad(..., data_axis=A, defer_reduction=True)`` returns
them and ``jaxaccum.multi_steps(..., data_axis=A)`` takes them: it adds them
to its accumulator on every call and reduces the accumulator across the
devices of ``A`` once, on the call that completes the cycle.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Hashable
from typing import Any

import jax

_ONLY = "per-device partial sums: pass them to jaxaccum.multi_steps(data_axis=) only"


class _Named(type):
  """Names the one consumer of :class:`DeferredGrads` wherever its type is
  printed: in the pytree structure error of ``optax.apply_updates``,
  ``optax.adamw`` or ``optax.MultiSteps`` given one."""

  def __repr__(cls):
    return f"<class 'jaxaccum.DeferredGrads' ({_ONLY})>"


@dataclasses.dataclass(frozen=True)
class DeferredGrads(metaclass=_Named):
  """Per-device partial sums of gradients, not yet reduced over ``axes``.

  A pytree, so it passes through ``jax.jit``. Its structure is not the
  parameters', so ``optax.apply_updates``, ``optax.adamw`` or
  ``optax.MultiSteps`` given one fails with an error naming
  ``multi_steps(data_axis=)``, and a ``multi_steps`` without ``data_axis`` is
  a ``TypeError``. A transformation that maps over leaves would transform the
  partial sums, not the gradient (``clip_by_global_norm`` would take their
  norm), so ``multi_steps(data_axis=)`` takes only the very value that
  ``value_and_grad`` returned: one rebuilt by a pytree operation (a
  transformation before it in an ``optax.chain``, a ``jax.tree.map``, also
  inside a ``jax.jit`` or ``lax.cond``) is a ``ValueError``; ``jax.jit``,
  ``shard_map``, ``nnx.jit`` and ``eqx.filter_jit`` boundaries, which hand
  the values on unchanged, keep it usable. Put gradient transformations in
  ``multi_steps``' inner optimizer, which sees the reduced gradient.

  Attributes:
    partials: a pytree of the parameters' structure; each leaf has shape
      ``(D, *param.shape)``, where ``D`` is the number of devices along
      ``axes``, is sharded over ``axes`` along its leading dimension (its other
      dimensions keep the parameter's non-data sharding), and holds device
      ``d``'s partial sum at index ``d``, in the accumulator dtype. The sum
      over the leading axis is the reduced gradient the same call would
      return without ``defer_reduction``.
    axes: the mesh axes the reduction is deferred over (static).
    rebuilt: whether a pytree operation rebuilt it (static; set by jaxaccum).

  Example:

    >>> import jax, jax.numpy as jnp, jaxaccum
    >>> g = jaxaccum.DeferredGrads({"w": jnp.ones((2, 3))}, ("data",))
    >>> jax.tree.map(lambda p: p.sum(0), g.partials)["w"].tolist()
    [2.0, 2.0, 2.0]
  """

  partials: Any
  axes: tuple[Hashable, ...]
  rebuilt: bool = dataclasses.field(default=False, repr=False, compare=False)

  def __repr__(self):
    # Printed by some jax versions' pytree structure errors ("Expected dict,
    # got DeferredGrads(...)"), where the type's name is printed by others.
    return f"DeferredGrads(partials={self.partials!r}, axes={self.axes!r}) ({_ONLY})"


def _flatten(g: DeferredGrads) -> tuple:
  # ``rebuilt`` is static: it rides in the treedef through jit, shard_map and
  # cond outputs, so a transformation inside them cannot launder it.
  return ((jax.tree_util.GetAttrKey("partials"), g.partials),), (g.axes, g.rebuilt)


def _unflatten(meta: tuple, children: Any) -> DeferredGrads:
  axes, rebuilt = meta
  return DeferredGrads(children[0], axes, rebuilt or _by_a_tree_map(sys._getframe(1)))


def _by_a_tree_map(frame: Any) -> bool:
  """Whether a Python pytree operation that may change the leaves (a
  ``jax.tree.map`` in optax or user code) rebuilds a :class:`DeferredGrads`,
  rather than a transformation that hands the same values on: ``jax.jit``'s
  C++ fast path calls this directly (no pytree function between), and jax,
  flax's NNX transforms, equinox and jaxaccum call pytree functions to hand
  values on."""
  if frame is None or frame.f_globals.get("__name__") not in _PYTREE_MODULES:
    return False
  while frame is not None and frame.f_globals.get("__name__") in _PYTREE_MODULES:
    frame = frame.f_back
  name = "" if frame is None else frame.f_globals.get("__name__", "")
  return not name.startswith(_TRANSFORMATION_MODULES)


_PYTREE_MODULES = ("jax._src.tree_util", "jax._src.tree", "jax.tree_util", "jax.tree")
_TRANSFORMATION_MODULES = ("jax.", "jaxlib.", "flax.nnx.transforms", "flax.nnx.graph",
                           "equinox.", "jaxaccum.")

jax.tree_util.register_pytree_with_keys(DeferredGrads, _flatten, _unflatten)


def filtered_partials(updates: Any, acc_grads: Any) -> bool:
  """Whether ``updates`` is a pytree ``{"partials": ...}`` (what
  ``nnx.Optimizer.update`` makes of :class:`DeferredGrads`) where the
  accumulator ``acc_grads`` is not."""
  keys = list(updates.keys()) if hasattr(updates, "keys") else []
  return keys == ["partials"] and jax.tree.structure(updates) != jax.tree.structure(acc_grads)


def check_untransformed(updates: Any, acc_grads: Any) -> None:
  """Gradients given to ``multi_steps(data_axis=)``: never transformed partial sums.

  Raises:
    ValueError: :class:`DeferredGrads` rebuilt by a pytree operation.
    TypeError: :class:`DeferredGrads` flattened into a plain pytree (what
      ``nnx.Optimizer.update`` does) that :func:`from_nnx_optimizer` did not
      take back: it came through a transformation, or has other shapes.
  """
  if isinstance(updates, DeferredGrads) and updates.rebuilt:
    raise ValueError(
        "multi_steps(data_axis=...) got DeferredGrads rebuilt by a pytree operation, "
        "such as a transformation before it (optax.chain(optax.clip_by_global_norm(...), "
        "multi_steps(...))) or a jax.tree.map. A transformation of the per-device "
        "partial sums is not that of the gradient (clip_by_global_norm would measure "
        "the partial sums); put it in "
        "multi_steps' inner optimizer, multi_steps(optax.chain(clip, adamw), k, "
        "data_axis=...), and pass it the DeferredGrads value_and_grad returned")
  if filtered_partials(updates, acc_grads):
    raise TypeError(
        "multi_steps(data_axis=...) got a pytree holding DeferredGrads' partials (what "
        "nnx.Optimizer.update makes of DeferredGrads: it filters gradients as an "
        "nnx.State), but not from nnx.Optimizer itself or not of these parameters' "
        "shapes: inside an optax.chain a transformation before it would act on the "
        "per-device partial sums. Give nnx.Optimizer the multi_steps itself, with "
        "gradient transformations in its inner optimizer: nnx.Optimizer(model, "
        "multi_steps(optax.chain(clip, adamw), k, data_axis=...)) (docs/flax.md, "
        "'nnx.Optimizer with multi_steps')")


def from_nnx_optimizer(updates: Any, params: Any, devices: int, axes: tuple,
                       caller: str) -> Any:
  """:class:`DeferredGrads` again, from what ``nnx.Optimizer.update`` makes of them.

  ``nnx.Optimizer.update`` filters the gradients into an ``nnx.State``:
  ``DeferredGrads`` become ``{"partials": sums}``. Given straight from flax's
  optimizer (``caller``, the module that called ``update``: no transformation
  in between) with the paths of ``params`` and one row per device of the
  ``devices`` along ``axes``, the sums are the partial sums, unchanged;
  anything else is returned as it is.
  """
  if not caller.startswith("flax.nnx") or params is None or not hasattr(updates, "keys"):
    return updates
  if list(updates.keys()) != ["partials"]:
    return updates
  inner = updates["partials"]
  leaves = jax.tree_util.tree_leaves_with_path
  got = [(jax.tree_util.keystr(p), jax.numpy.shape(x)) for p, x in leaves(inner)]
  want = [(jax.tree_util.keystr(p), (devices, *jax.numpy.shape(x))) for p, x in leaves(params)]
  if got != want:
    return updates
  return DeferredGrads(jax.tree.structure(params).unflatten(jax.tree.leaves(inner)), axes)
