"""``data_axis``: the data-parallel plan of a step, and the strategy of one call.

:class:`DataAxis` is the public value (mesh axes, mesh, parameter specs,
FSDP mode), validated once and shared by a gradient function and its
``multi_steps``; :class:`DataStrategy` picks one of the two strategies of
:mod:`jaxaccum._devices.data_strategies` at trace time (see
``docs/sharded.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxaccum import _compat
from jaxaccum._core import checks
from jaxaccum._devices.data_strategies import BatchLayout, ExplicitData, ShardMapData
from jaxaccum._devices.specs import (Axes, PyTree, axis_spec, entry_axes, explicit_axes, is_spec,
                                     prefix_specs, spec_of)

if TYPE_CHECKING:
  from jaxaccum._core.options import Options

FsdpGather = Literal["once", "per_microbatch"]
FSDP_GATHER: tuple[str, ...] = get_args(FsdpGather)


@dataclasses.dataclass(frozen=True, init=False)
class DataAxis:
  """The data-parallel plan of a training step under plain ``jax.jit``.

  One value, validated once, for a step and its optimizer:
  :func:`jaxaccum.value_and_grad`, :func:`jaxaccum.grad`,
  ``jaxaccum.nnx.*`` and :func:`jaxaccum.multi_steps` all take it as
  ``data_axis=``. A bare axis name (or a tuple of them) is the shorthand for
  ``DataAxis(name)``, and the keywords ``mesh=``, ``param_specs=`` and
  ``fsdp_gather=`` of those functions build one too.

  Attributes:
    axes: the mesh axes the batch is sharded over (HSDP: ``("replica",
      "shard")``), a tuple.
    mesh: the ``jax.sharding.Mesh`` (or abstract mesh); ``None``: the mesh
      set with ``jax.set_mesh`` when the step traces.
    param_specs: on Auto mesh axes, the parameters' ``PartitionSpec`` pytree
      (or a prefix of it; a tuple of one per argument with a tuple
      ``argnums``); ``None``: replicated over the data axes. On Explicit
      axes the arrays' types give it.
    fsdp_gather: ``"once"`` or ``"per_microbatch"``: when a parameter
      sharded over a data axis is gathered for the loss (``docs/sharded.md``).

  Example:

    >>> import jax, jax.numpy as jnp, optax, jaxaccum
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> data = jaxaccum.DataAxis("data", mesh=mesh)
    >>> loss = lambda w, x: jnp.mean((x @ w) ** 2)
    >>> grad_fn = jaxaccum.value_and_grad(loss, num_microbatches=2, data_axis=data,
    ...                                   defer_reduction=True)
    >>> opt = jaxaccum.multi_steps(optax.sgd(0.1), 4, data_axis=data)
    >>> data.axes, data.devices()
    (('data',), 8)
  """

  axes: Axes
  mesh: Any
  param_specs: Any
  fsdp_gather: FsdpGather

  def __init__(self, axes: Any, *, mesh: Any = None, param_specs: Any = None,
               fsdp_gather: FsdpGather = "once"):
    if isinstance(axes, DataAxis):
      raise TypeError(f"DataAxis takes axis names, got {axes!r}")
    object.__setattr__(self, "axes", checks.axes("data_axis", axes, required=True))
    object.__setattr__(self, "mesh", checks.mesh("mesh", mesh))
    object.__setattr__(self, "param_specs", checks.param_specs("param_specs", param_specs))
    object.__setattr__(self, "fsdp_gather", checks.choice("fsdp_gather", fsdp_gather,
                                                          FSDP_GATHER))
    if mesh is not None:
      self.resolve_mesh()  # a mesh known now is checked now

  @classmethod
  def of(cls, data_axis: Any, **keywords: Any) -> DataAxis | None:
    """``data_axis=`` as given (``None``, axis names or a :class:`DataAxis`),
    with the keyword spellings ``mesh=``, ``param_specs=``, ``fsdp_gather=``."""
    defaults = {"mesh": None, "param_specs": None, "fsdp_gather": "once"}
    given = {k: v for k, v in keywords.items()
             if (v is not None if defaults[k] is None else v != defaults[k])}
    if data_axis is None:
      for name, value in given.items():
        raise ValueError(f"{name}= is only used with data_axis= (got {name}={value!r}); pass "
                         "data_axis= too: the mesh axis or axes the batch is sharded over")
      return None
    if isinstance(data_axis, DataAxis):
      if given:
        raise ValueError(
            f"{sorted(given)} given both as keywords and in data_axis={data_axis!r}; "
            "give each once, in the DataAxis")
      return data_axis
    return cls(data_axis, **given)

  def __hash__(self):
    leaves, treedef = jax.tree.flatten(self.param_specs, is_leaf=is_spec)
    return hash((self.axes, self.mesh, self.fsdp_gather, treedef, tuple(leaves)))

  @property
  def spec(self) -> Any:
    """The ``PartitionSpec`` entry (and collective axis name) of the axes."""
    return axis_spec(self.axes)

  def resolve_mesh(self, who: str = "") -> Any:
    """The mesh (or the ambient one), checked to have the axes; ``who``: the
    function named in the message."""
    mesh = jax.sharding.get_abstract_mesh() if self.mesh is None else self.mesh
    missing = [a for a in self.axes if a not in mesh.axis_names]
    if missing:
      given = f"{who}(data_axis={self.spec!r})" if who else f"data_axis={self.spec!r}"
      raise ValueError(
          f"{given} names axes {missing} that the mesh does not have (mesh axes: "
          f"{tuple(mesh.axis_names)}); use the mesh's axis names, pass mesh= (or "
          "DataAxis(..., mesh=)), or trace the step under jax.set_mesh(mesh)")
    return mesh

  def devices(self, who: str = "") -> int:
    """The number of devices along the axes."""
    mesh = self.resolve_mesh(who)
    return int(np.prod([mesh.shape[a] for a in self.axes]))

  def explicit(self, mesh: Any) -> bool:
    """Whether the axes are Explicit axes of ``mesh``."""
    return explicit_axes(mesh, self.axes)

  def specs(self, tree: PyTree, mesh: Any, given: Any) -> PyTree:
    """Per leaf of ``tree``, its ``PartitionSpec``: from its type on Explicit
    axes, else from ``given`` (``param_specs`` or its entry for ``tree``;
    ``None``: replicated)."""
    if self.explicit(mesh) or given is None:
      # On Auto axes a sharding is invisible inside jit: replicated over data.
      return jax.tree.map(spec_of if self.explicit(mesh) else (lambda _: P()), tree)
    try:
      specs = prefix_specs(given, tree)
    except ValueError as e:
      raise ValueError(
          f"param_specs={given!r} must be a pytree prefix of the parameters (the "
          f"differentiated arguments), of structure {jax.tree.structure(tree)}") from e
    jax.tree.map(lambda s, x: _check_spec(s, x, mesh), specs, tree, is_leaf=is_spec)
    return specs


def data_devices(data: DataAxis | None) -> int:
  """The number of devices along ``data``'s axes (1 without it)."""
  return 1 if data is None else data.devices()


@dataclasses.dataclass(frozen=True)
class DataStrategy:
  """A ``jax.jit`` step over a batch sharded along the axes of ``data``.

  Picks the strategy at trace time, from the mesh's axis types and the
  differentiated arguments' shardings: on Explicit data axes
  :class:`ExplicitData` (plain ``jit``), unless the loss or the options
  cannot take reduced parameters; otherwise :class:`ShardMapData`. Trying
  the first costs one more trace of the loss where it fails.

  Attributes:
    data: the data-parallel plan.
    options: the function's options.
    batch: where the call's batch and differentiated arguments are.
  """

  data: DataAxis
  options: Options
  batch: BatchLayout

  def run(self, loop: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    o, data = self.options, self.data
    mesh = data.resolve_mesh()
    diff = tuple(args[i] for i in o.argnums)
    explicit = data.explicit(mesh)
    specs = self._specs(diff, mesh)
    first_error = None
    if explicit and _compat.has_reduced_specs() and not (
        o.with_stats or o.skip_nonfinite or o.defer_reduction):
      # Norms and finiteness checks of unreduced gradients are rejected, and
      # so is an elementwise op between a reduced parameter and a
      # data-sharded array (a bias add): such losses run under shard_map, as
      # everything does where this jax cannot defer a reduction this way.
      try:
        return loop(ExplicitData(data.axes, data.fsdp_gather, specs, o.argnums_is_int),
                    args, kwargs)
      except Exception as e:  # noqa: BLE001 -- any rejection falls back
        first_error = e
    strategy = ShardMapData(mesh, data.axes, data.fsdp_gather, specs, o.argnums_is_int,
                            self.batch, o.defer_reduction)
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

  def _specs(self, diff: tuple, mesh: Any) -> tuple:
    """Per differentiated argument, a pytree of PartitionSpecs matching it."""
    given = self.data.param_specs
    if self.options.argnums_is_int:
      return (self.data.specs(diff[0], mesh, given),)
    per_argument = (None,) * len(diff) if given is None else given
    return tuple(self.data.specs(d, mesh, g) for d, g in zip(diff, per_argument, strict=True))


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
