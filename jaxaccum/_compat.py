"""Every difference between the supported jax / flax versions, in one place.

Each shim detects the feature it needs (never a version number), so a release
that adds, renames or removes an API changes one line here, not the call sites.
The rest of the package calls these names instead of the moving jax APIs:

* :func:`pcast_to_varying`: ``lax.pcast(x, axes, to="varying")`` (jax >= 0.8.2),
  else ``lax.pvary`` (its name until then; deprecated in 0.8.2, removed in
  0.10), else the identity (a jax that tracks no device variance).
* :func:`nnx_merge_copy`: ``nnx.merge(..., copy=True)`` (flax >= 0.11.2), else
  ``nnx.merge``, which copied the Variables unconditionally before it grew the
  ``copy`` option.
* :data:`enable_x64`: ``jax.enable_x64`` (jax >= 0.8), else
  ``jax.experimental.enable_x64`` (deprecated in 0.8, removed in 0.9).
* :data:`use_abstract_mesh`: ``jax.sharding.use_abstract_mesh`` (public from
  jax 0.8 on), else ``None``.
* :func:`has_reduced_specs`: whether ``PartitionSpec(reduced=..., unreduced=...)``
  shardings work (jax >= 0.8), for code that must fall back where they do not.

* :func:`require_flax`: flax is an optional dependency (the ``flax`` extra);
  :mod:`jaxaccum.nnx` and :mod:`jaxaccum.linen` call it before importing it.

This module imports flax only inside the functions the Flax adapters call, so
the core stays free of flax.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import inspect
from collections.abc import Hashable
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


# Looked up in this order because touching ``lax.pvary`` where ``lax.pcast``
# exists emits a DeprecationWarning (0.8.2 to 0.9) or raises (0.10 on).
if hasattr(lax, "pcast"):

  def pcast_to_varying(x: Any, axes: tuple[Hashable, ...]) -> Any:
    """Marks ``x`` as device-varying over ``axes`` inside ``shard_map``."""
    return lax.pcast(x, axes, to="varying")

elif hasattr(lax, "pvary"):

  def pcast_to_varying(x: Any, axes: tuple[Hashable, ...]) -> Any:
    """Marks ``x`` as device-varying over ``axes`` inside ``shard_map``."""
    return lax.pvary(x, axes)

else:

  def pcast_to_varying(x: Any, axes: tuple[Hashable, ...]) -> Any:
    """The identity: this jax does not track device variance."""
    del axes
    return x


def _enable_x64():
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64
  from jax import experimental
  return experimental.enable_x64


enable_x64 = _enable_x64()
"""Context manager: ``with enable_x64(True):`` computes in 64 bits inside."""

use_abstract_mesh = getattr(jax.sharding, "use_abstract_mesh", None)
"""Context manager: ``with use_abstract_mesh(mesh):`` traces under ``mesh``'s
axis types; ``None`` where this jax does not export it."""


@functools.cache
def has_reduced_specs() -> bool:
  """Whether sharding with ``PartitionSpec(reduced=..., unreduced=...)`` works.

  True where the gradient of a parameter placed with ``reduced={axis}`` comes
  out ``unreduced`` over ``axis`` (its all-reduce deferred to a later
  ``reshard``): jax 0.8 on. Older jax builds such specs but rejects placing an
  array with them (0.7.1) or reduces the gradient at once (0.7.2).

  A function, not a constant: the probe needs a device, and initializing the
  backend at import would come before ``jax.distributed.initialize``. It may be
  called anywhere, under ``jax.jit`` or a mesh context too.
  """
  # Its own thread: jax's trace and mesh contexts are per thread, so the
  # caller's do not reach the probe.
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    return pool.submit(_probe_reduced_specs).result()


def _probe_reduced_specs() -> bool:
  mesh = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Explicit,),
                       devices=jax.devices()[:1])
  reduced = NamedSharding(mesh, PartitionSpec(reduced={"x"}))
  with jax.set_mesh(mesh):
    try:
      jax.device_put(np.zeros((), np.float32), reduced)
      w = jax.ShapeDtypeStruct((2,), np.float32, sharding=reduced)
      x = jax.ShapeDtypeStruct((4, 2), np.float32,
                               sharding=NamedSharding(mesh, PartitionSpec("x")))
      grad = jax.eval_shape(jax.grad(lambda w, x: (x @ w).sum()), w, x)
    except (TypeError, ValueError, NotImplementedError):
      return False
  return "x" in grad.sharding.spec.unreduced


def require_flax(module: str) -> None:
  """Imports flax, or raises an ImportError that names the extra to install."""
  try:
    importlib.import_module("flax")
  except ImportError as e:
    raise ImportError(
        f"{module} needs flax, which is not installed: pip install 'jaxaccum[flax]' "
        "(or pip install flax)", name="flax") from e


@functools.cache
def _merge_takes_copy() -> bool:
  from flax import nnx
  return "copy" in inspect.signature(nnx.merge).parameters


def nnx_merge_copy(graphdef: Any, *states: Any) -> Any:
  """``nnx.merge(graphdef, *states)`` onto fresh copies of the Variables.

  Mutating the merged module (a forward pass updating batch statistics)
  therefore never touches the Variables of ``states``.
  """
  from flax import nnx
  if _merge_takes_copy():
    return nnx.merge(graphdef, *states, copy=True)
  return nnx.merge(graphdef, *states)
