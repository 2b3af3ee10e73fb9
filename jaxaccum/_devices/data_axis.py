"""``data_axis``: the mesh, its devices, and the strategy of one call.

:class:`DataStrategy` picks one of the two strategies of
:mod:`jaxaccum._devices.data_strategies` at trace time (see ``docs/sharded.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxaccum import _compat
from jaxaccum._devices.data_strategies import ExplicitData, ShardMapData
from jaxaccum._devices.specs import Axes, axis_spec, entry_axes, explicit_axes, is_spec, prefix_specs, spec_of

@dataclasses.dataclass(frozen=True)
class DataStrategy:
  """A ``jax.jit`` step over a batch sharded along ``axes`` of a mesh.

  Picks the strategy at trace time, from the mesh's axis types and the
  differentiated arguments' shardings: on Explicit data axes
  :class:`ExplicitData` (plain ``jit``), unless the loss or the options
  cannot take reduced parameters; otherwise :class:`ShardMapData`. Trying
  the first costs one more trace of the loss where it fails.
  """

  axes: Axes
  options: Any
  plan: Any

  def run(self, loop: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    o = self.options
    mesh = resolve_mesh(self.axes, o.mesh)
    diff = tuple(args[i] for i in o.argnums)
    explicit = explicit_axes(mesh, self.axes)
    specs = _specs(o, diff, explicit, mesh)
    first_error = None
    if explicit and _compat.has_reduced_specs() and not (
        o.with_stats or o.skip_nonfinite or o.defer_reduction):
      # Norms and finiteness checks of unreduced gradients are rejected, and
      # so is an elementwise op between a reduced parameter and a
      # data-sharded array (a bias add): such losses run under shard_map, as
      # everything does where this jax cannot defer a reduction this way.
      try:
        return loop(ExplicitData(self.axes, o.fsdp_gather, specs, o.argnums_is_int),
                    args, kwargs)
      except Exception as e:  # noqa: BLE001 -- any rejection falls back
        first_error = e
    positions = {"argnums": o.argnums, "batch_argnums": self.plan.positions,
                 "batch_argnames": self.plan.names, "in_axes": self.plan.axes,
                 "aux_reduction": o.aux_reduction}
    strategy = ShardMapData(mesh, self.axes, o.fsdp_gather, specs, o.argnums_is_int,
                            positions, o.defer_reduction)
    try:
      return strategy.run(loop, args, kwargs)
    except Exception as e:
      if first_error is not None:
        e.add_note("With reduced parameters under plain jit (Explicit data axes) "
                   f"it failed first with: {type(first_error).__name__}: {first_error}")
      elif explicit and not _compat.has_reduced_specs():
        e.add_note("This jax cannot defer a reduction with reduced / unreduced "
                   "sharding (jax 0.8 on can), so the loss ran under shard_map, where "
                   "the data axes are Manual: a loss that names them needs a newer jax")
      raise


def _specs(options: Any, diff: tuple, explicit: bool, mesh: Any) -> tuple:
  """Per differentiated argument, a pytree of PartitionSpecs matching it."""
  if explicit or options.param_specs is None:
    # On Auto axes a sharding is invisible inside jit: replicated over data.
    return jax.tree.map(spec_of if explicit else (lambda _: P()), diff)
  given = (options.param_specs,) if options.argnums_is_int else tuple(options.param_specs)
  try:
    specs = tuple(prefix_specs(g, d) for g, d in zip(given, diff, strict=True))
  except ValueError as e:
    raise ValueError(
        f"param_specs={options.param_specs!r} must be a pytree prefix of the "
        f"differentiated arguments (argnums={options.argnums}) of structure "
        f"{jax.tree.structure(diff if not options.argnums_is_int else diff[0])}") from e
  jax.tree.map(lambda s, x: _check_spec(s, x, mesh), specs, diff, is_leaf=is_spec)
  return specs


def _check_spec(spec: P, x: Any, mesh: Any) -> None:
  """A ``param_specs`` entry must fit its parameter and name the mesh's axes."""
  unknown = [a for entry in spec for a in entry_axes(entry) if a not in mesh.axis_names]
  if unknown:
    raise ValueError(
        f"param_specs entry {spec} names mesh axes {unknown} that the mesh does not "
        f"have (mesh axes: {mesh.axis_names}); use the mesh's axis names")
  if len(spec) > np.ndim(x):
    raise ValueError(
        f"param_specs entry {spec} has {len(spec)} entries for a parameter of shape "
        f"{np.shape(x)}; give at most one entry per dimension")


def resolve_mesh(axes: Axes, mesh: Any) -> Any:
  """``mesh`` (or the ambient mesh), checked to have ``axes``."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(
        f"data_axis={axis_spec(axes)!r} names axes {missing} that the mesh does "
        f"not have (mesh axes: {mesh.axis_names}); pass mesh= or set one with "
        "jax.set_mesh")
  return mesh


def data_devices(axes: Axes, mesh: Any) -> int:
  """The number of devices along ``axes`` of ``mesh`` (1 without axes)."""
  if not axes:
    return 1
  mesh = resolve_mesh(axes, mesh)
  return int(np.prod([mesh.shape[a] for a in axes]))

