"""Every option of the public functions, defined once, and validated once.

:data:`OPTIONS` holds each option's name, default, check and one-line
description, and which entry points take it: ``value_and_grad`` (also
``grad``, the planner and the ``jaxaccum.linen`` helpers), ``nnx``
(``jaxaccum.nnx.value_and_grad`` / ``grad``) and ``multi_steps``. The entry
points keep explicit signatures for readers and IDEs; a test holds each of
them to this table, and ``docs/options.md`` is generated from it.

:func:`validate` checks the options an entry point was given: each value by
its option's check (:mod:`jaxaccum._core.checks`), then the rules that
relate several options (:data:`RULES`), each written once. :class:`Options`
is the validated result for the in-step core.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, Literal, NamedTuple, get_args

import jax.numpy as jnp

from jaxaccum._core import checks
from jaxaccum._devices.data_axis import DataAxis

Reduction = Literal["mean", "sum"]
AuxReduction = Literal["mean", "sum", "stack", "concat"]
StatePolicy = Literal["sequential", "mean"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
AUX_REDUCTIONS: tuple[str, ...] = get_args(AuxReduction)
STATE_POLICIES: tuple[str, ...] = get_args(StatePolicy)

VG, NNX, MS = "value_and_grad", "nnx", "multi_steps"
REQUIRED = object()  # the default of an option without one


class Option(NamedTuple):
  """One option, defined once.

  Attributes:
    name: the keyword.
    default: its default (:data:`REQUIRED`: none).
    check: ``check(name, value) -> normalized value``; raises TypeError /
      ValueError naming the option.
    doc: what it does, in one line.
    takers: the entry points that take it.
  """

  name: str
  default: Any
  check: Callable[[str, Any], Any]
  doc: str
  takers: tuple[str, ...] = (VG, NNX)


def _in_data_axis(name: str, value: Any) -> Any:
  """Checked by :class:`DataAxis` (the rule ``_axes`` builds it; the options
  other than ``data_axis`` need it first)."""
  del name
  return value


def _state_policy(name: str, value: Any) -> tuple[str, ...] | str:
  if isinstance(value, str):
    return checks.choice(name, value, STATE_POLICIES)
  if not isinstance(value, (list, tuple)):
    fix = "; leave it out for the default 'sequential'" if value is None else ""
    raise TypeError(f"{name} must be one of {STATE_POLICIES} or a tuple of them, got "
                    f"{name}={value!r}{fix}")
  return tuple(checks.choice(name, p, STATE_POLICIES) for p in value)


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("num_microbatches", None, checks.positive,
           "`N`, the number of micro-batches (exactly one of this and `microbatch_size`)"),
    Option("microbatch_size", None, checks.positive, "rows per micro-batch, `B / N`"),
    Option("argnums", 0, checks.nonempty_argnums,
           "the positional argument(s) to differentiate"),
    Option("batch_argnums", None, checks.optional_argnums,
           "the batch argument(s), split into micro-batches (default `1`; none with "
           "`batch_argnames` alone)"),
    Option("batch_argnames", (), checks.names, "keyword batch argument(s)"),
    Option("has_aux", False, checks.boolean, "whether the loss returns `(loss, aux)`"),
    Option("weight_fn", None, checks.optional_callable,
           "`weight_fn(*micro_batch)`: one micro-batch's weight (e.g. its tokens)"),
    Option("reduction", "mean", checks.one_of(REDUCTIONS),
           "`\"mean\"` or `\"sum\"` over micro-batches"),
    Option("aux_reduction", "mean",
           lambda n, v: checks.aux_reduction(n, v, AUX_REDUCTIONS),
           "`\"mean\"`, `\"sum\"`, `\"stack\"`, `\"concat\"`, or a pytree prefix of the aux "
           "of these"),
    Option("accumulator_dtype", jnp.float32, checks.accumulator_dtype,
           "the least precise dtype gradients are summed in (`None`: their own)",
           (VG, NNX, MS)),
    Option("rng_argnums", (), checks.argnums,
           "PRNG key argument(s); micro-batch `i` gets `fold_in(key, i)`", (VG,)),
    Option("axis_name", None, checks.axes,
           "inside `pmap` / `shard_map`: the axis to reduce over, once", (VG, NNX, MS)),
    Option("data_axis", None, _in_data_axis,
           "under plain `jit`: the mesh axis (axes) the batch is sharded over, or a "
           "`jaxaccum.DataAxis`", (VG, NNX, MS)),
    Option("mesh", None, _in_data_axis, "the mesh of `data_axis` (default: `jax.set_mesh`'s)",
           (VG, NNX, MS)),
    Option("state_argnums", (), checks.argnums,
           "mutable state argument(s), such as BatchNorm statistics", (VG,)),
    Option("state_policy", "sequential", _state_policy,
           "`\"sequential\"` or `\"mean\"`, per state argument (NNX: `BatchStat`)"),
    Option("with_stats", False, checks.boolean,
           "also return `jaxaccum.AccumulationStats` (noise scale)"),
    Option("skip_nonfinite", False, checks.boolean,
           "leave out micro-batches with a non-finite loss or gradient"),
    Option("fsdp_gather", "once", _in_data_axis,
           "`\"once\"` or `\"per_microbatch\"`: when FSDP parameters are gathered"),
    Option("param_specs", None, _in_data_axis,
           "on Auto mesh axes: the parameters' `PartitionSpec` pytree (or a prefix)",
           (VG, NNX, MS)),
    Option("defer_reduction", False, checks.boolean,
           "return `jaxaccum.DeferredGrads`, reduced once a cycle by `multi_steps`"),
    Option("in_axes", 0, checks.in_axes,
           "the batch axis of each batch argument (one int for all)"),
    Option("num_real_microbatches", None, checks.real_microbatches,
           "compute the first `n <= N` micro-batches only (may be traced)"),
    Option("every_k_schedule", REQUIRED, checks.schedule,
           "calls per optimizer step: an int, or a function of the step", (MS,)),
    Option("use_grad_mean", True, checks.boolean,
           "the cycle's mean gradient (`False`: its sum)", (MS,)),
    Option("should_skip_update_fn", None, checks.optional_callable,
           "`fn(updates, gradient_step, params) -> (skip, state)`, as in optax", (MS,)),
)}


def taken_by(entry: str) -> tuple[Option, ...]:
  """The options ``entry`` takes, in the table's order."""
  return tuple(o for o in OPTIONS.values() if entry in o.takers)


def validate(entry: str, given: dict[str, Any]) -> dict[str, Any]:
  """Every option of ``entry``: given ones checked, the others at their
  defaults, then the rules that relate several options."""
  unknown = sorted(set(given) - {o.name for o in taken_by(entry)})
  if unknown:
    raise TypeError(f"{entry} got unexpected keyword argument(s) {unknown}")
  values = {o.name: given.get(o.name, o.default) for o in taken_by(entry)}
  raw = dict(values)
  for o in taken_by(entry):
    if values[o.name] is not REQUIRED:
      values[o.name] = o.check(o.name, values[o.name])
  for rule in RULES:
    rule(values, raw)
  return values


def _one_size(values: dict, raw: dict) -> None:
  if "num_microbatches" in values and (
      (values["num_microbatches"] is None) == (values["microbatch_size"] is None)):
    raise ValueError(
        "exactly one of num_microbatches and microbatch_size must be given, got "
        f"num_microbatches={raw['num_microbatches']!r} and "
        f"microbatch_size={raw['microbatch_size']!r}")


def _batch(values: dict, raw: dict) -> None:
  """``batch_argnames`` alone replaces the default batch argument ``1``."""
  if "batch_argnums" not in values:
    return
  if values["batch_argnums"] is None:
    values["batch_argnums"] = () if values["batch_argnames"] else (1,)
  if not values["batch_argnums"] and not values["batch_argnames"]:
    raise ValueError(
        f"batch_argnums and batch_argnames name no argument (batch_argnums="
        f"{raw['batch_argnums']!r}, batch_argnames={raw['batch_argnames']!r}); name the "
        "batch argument(s) to split")


def _disjoint(values: dict, raw: dict) -> None:
  names = [n for n in ("batch_argnums", "argnums", "rng_argnums", "state_argnums")
           if n in values]
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      if set(values[a]) & set(values[b]):
        shown = {n: raw[n] if raw[n] is not None else values[n] for n in (a, b)}
        raise ValueError(f"{a} and {b} overlap: {a}={shown[a]!r}, {b}={shown[b]!r}; "
                         "each argument plays one role")


def _axes(values: dict, raw: dict) -> None:
  """``axis_name`` or ``data_axis``; the ``data_axis`` keywords become one
  :class:`DataAxis`, and what only ``data_axis`` uses needs it."""
  if values["axis_name"] and values["data_axis"]:
    raise ValueError(f"give axis_name or data_axis, not both: axis_name={raw['axis_name']!r}, "
                     f"data_axis={raw['data_axis']!r}; axis_name inside pmap / shard_map, "
                     "data_axis under plain jit")
  keywords = {k: raw[k] for k in ("mesh", "param_specs", "fsdp_gather") if k in raw}
  values["data_axis"] = DataAxis.of(raw["data_axis"], **keywords)
  if values.get("defer_reduction") and values["data_axis"] is None:
    raise ValueError("defer_reduction= is only used with data_axis= (got "
                     "defer_reduction=True); pass data_axis= too: the mesh axis or axes "
                     "the batch is sharded over")


def _defer(values: dict, raw: dict) -> None:
  if not values.get("defer_reduction"):
    return
  if values["with_stats"]:
    raise ValueError(
        "defer_reduction=True leaves the gradients unreduced, but with_stats=True "
        "needs their reduced norms; drop one of them")
  if values["data_axis"].fsdp_gather == "per_microbatch":
    raise ValueError(
        "defer_reduction=True keeps each device's unreduced gradient sums, but "
        "fsdp_gather='per_microbatch' reduce-scatters them in every micro-batch; use "
        "fsdp_gather='once' with defer_reduction")


def _specs_per_argument(values: dict, raw: dict) -> None:
  data = values["data_axis"]
  if "argnums" not in values or data is None or data.param_specs is None:
    return
  specs, argnums = data.param_specs, raw["argnums"]
  if checks.is_sequence(argnums) and (
      not isinstance(specs, (tuple, list)) or len(specs) != len(values["argnums"])):
    raise ValueError(
        f"with a sequence argnums={argnums!r}, param_specs must be a tuple of one entry "
        f"per argument, got param_specs={specs!r}")


def _in_axes(values: dict, raw: dict) -> None:
  if "in_axes" not in values:
    return
  count = len(values["batch_argnums"]) + len(values["batch_argnames"])
  if isinstance(values["in_axes"], int):
    values["in_axes"] = (values["in_axes"],) * count
  elif len(values["in_axes"]) != count:
    raise ValueError(
        f"in_axes={raw['in_axes']!r} must give one axis per batch argument (batch_argnums "
        f"then batch_argnames: {count} of them), or one int for all")


def _real(values: dict, raw: dict) -> None:
  n, real = values.get("num_microbatches"), values.get("num_real_microbatches")
  if isinstance(real, int) and n is not None and real > n:
    raise ValueError(f"num_real_microbatches={real} exceeds num_microbatches={n}; "
                     "it counts the micro-batches to compute, at most N")


def _policies(values: dict, raw: dict) -> None:
  if "state_argnums" not in values:
    return
  policy, states = values["state_policy"], values["state_argnums"]
  if not states and raw["state_policy"] != "sequential":
    raise ValueError(
        f"state_policy={raw['state_policy']!r} is given without state_argnums; name the "
        "state argument(s) with state_argnums=")
  if isinstance(policy, str):
    values["state_policy"] = (policy,) * len(states)
  elif len(policy) != len(states):
    raise ValueError(
        f"state_policy={raw['state_policy']!r} must be one of {STATE_POLICIES}, or one of "
        f"them per entry of state_argnums={states}")


# The rules that relate several options, in order; each applies to the
# entry points that take its options.
RULES = (_one_size, _batch, _disjoint, _axes, _defer, _specs_per_argument, _in_axes,
         _real, _policies)


@dataclasses.dataclass(frozen=True)
class Options:
  """The validated static options of one accumulated function.

  Built with :meth:`create` from the keyword arguments of
  :func:`jaxaccum.value_and_grad` (see :data:`OPTIONS` for what each one
  means): positions as tuples, axes as tuples of names, the data-parallel
  keywords as one :class:`~jaxaccum.DataAxis`; then the facts derived from
  them, once.
  """

  num_microbatches: int | None
  microbatch_size: int | None
  argnums: tuple[int, ...]
  batch_argnums: tuple[int, ...]
  batch_argnames: tuple[str, ...]
  has_aux: bool
  weight_fn: Callable[..., Any] | None
  reduction: Reduction
  aux_reduction: Any
  accumulator_dtype: Any
  rng_argnums: tuple[int, ...]
  axis_name: tuple[Hashable, ...]
  data: DataAxis | None
  state_argnums: tuple[int, ...]
  state_policies: tuple[StatePolicy, ...]
  with_stats: bool
  skip_nonfinite: bool
  defer_reduction: bool
  in_axes: tuple[int, ...]
  num_real_microbatches: Any
  # Derived once: how the options were given, and what they imply.
  argnums_is_int: bool
  state_is_tuple: bool
  weighted: bool
  positions: tuple[int, ...]

  @classmethod
  def create(cls, **given: Any) -> Options:
    """Validates the keyword arguments of ``value_and_grad``; raises TypeError /
    ValueError."""
    v = validate(VG, given)
    v["state_policies"] = v.pop("state_policy")
    v["data"] = v.pop("data_axis")
    for name in ("mesh", "param_specs", "fsdp_gather"):
      del v[name]  # held by the DataAxis
    return cls(**v, argnums_is_int=not checks.is_sequence(given.get("argnums", 0)),
               state_is_tuple=checks.is_sequence(given.get("state_argnums", ())),
               # Micro-batches carry weights (weight_fn or skipping).
               weighted=v["weight_fn"] is not None or v["skip_nonfinite"],
               # The positional arguments an option names, other than the batch
               # (which may be passed by keyword where fun's signature allows).
               positions=v["argnums"] + v["rng_argnums"] + v["state_argnums"])

  @property
  def data_axis(self) -> tuple[Hashable, ...]:
    """The data axes (empty without ``data_axis``)."""
    return () if self.data is None else self.data.axes

  def describe_positions(self) -> str:
    """The positional options, for messages (one position shown as an int)."""
    shown = {name: nums[0] if len(nums) == 1 else nums for name, nums in (
        ("argnums", self.argnums), ("rng_argnums", self.rng_argnums),
        ("state_argnums", self.state_argnums)) if nums}
    return ", ".join(f"{k}={v!r}" for k, v in shown.items())


ENTRY_POINTS = {VG: "`value_and_grad`, `grad`", NNX: "`nnx.value_and_grad`, `nnx.grad`",
                MS: "`multi_steps`"}


def markdown_table() -> str:
  """The option table of ``docs/options.md``, from :data:`OPTIONS`."""
  def shown(default):
    if default is REQUIRED:
      return "(required)"
    return "`jnp.float32`" if default is jnp.float32 else f"`{default!r}`"

  rows = ["| option | default | what it does | taken by |", "|---|---|---|---|"]
  rows += [f"| `{o.name}` | {shown(o.default)} | {o.doc} | "
           f"{', '.join(ENTRY_POINTS[t] for t in o.takers)} |" for o in OPTIONS.values()]
  return "\n".join(rows)
