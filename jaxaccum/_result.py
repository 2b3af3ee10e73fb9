"""How a result is nested for the user, coded once.

``jax.value_and_grad`` nests its result by ``has_aux``; state arguments add
the final state where the aux would be, and ``with_stats`` pairs the whole
with the statistics. The core and :mod:`jaxaccum.nnx` both nest through a
:class:`Layout`.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Layout(NamedTuple):
  """The nesting of one accumulated function's result.

  Attributes:
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    num_states: how many state arguments there are.
    state_is_tuple: whether the states come back as a tuple (a tuple
      ``state_argnums``) rather than one state.
    with_stats: whether the result is paired with the statistics.
  """

  has_aux: bool
  num_states: int = 0
  state_is_tuple: bool = False
  with_stats: bool = False

  def _aux_slot(self, aux: Any, states: tuple) -> Any:
    if not self.num_states:
      return aux
    state = states if self.state_is_tuple else states[0]
    return (aux, state) if self.has_aux else state

  @property
  def has_aux_slot(self) -> bool:
    return self.has_aux or bool(self.num_states)

  def value_and_grad(self, outputs: Any) -> Any:
    """``(value, grads)`` or ``((value, aux), grads)``, and the statistics."""
    value = outputs.value
    if self.has_aux_slot:
      value = (value, self._aux_slot(outputs.aux, outputs.states))
    return self._with_stats((value, outputs.grads), outputs.stats)

  def grad(self, outputs: Any) -> Any:
    """``grads`` or ``(grads, aux)``, and the statistics."""
    grads = outputs.grads
    if self.has_aux_slot:
      grads = (grads, self._aux_slot(outputs.aux, outputs.states))
    return self._with_stats(grads, outputs.stats)

  def _with_stats(self, result: Any, stats: Any) -> Any:
    return (result, stats) if self.with_stats else result
