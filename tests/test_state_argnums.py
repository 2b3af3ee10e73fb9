"""Flax Linen ``batch_stats`` through micro-batches, and the TrainState step.

``jaxaccum.value_and_grad(..., state_argnums=2, state_policy=...)`` with a
``flax.linen.BatchNorm`` model is compared with a hand-written Python loop
over the strided micro-batches ``x[i::N]``:

- ``"sequential"``: micro-batch ``i`` starts from the statistics micro-batch
  ``i - 1`` left; the result is the last micro-batch's statistics;
- ``"mean"``: every micro-batch starts from the input statistics; the result
  is the mean of the ``N`` updated statistics.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import Mesh

import jaxaccum
from _models import assert_rel_close, assert_trees_equal

N = 4
B = 16


class BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(3)(jnp.tanh(x))


MODEL = BNNet()


def loss_fn(params, batch, batch_stats):
  """Cross-entropy, and the updated statistics (the ``state_argnums`` form)."""
  x, labels = batch
  logits, updates = MODEL.apply({"params": params, "batch_stats": batch_stats}, x,
                                train=True, mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, updates["batch_stats"]


def loss_with_accuracy(params, batch, batch_stats):
  """``(loss, (aux, new_state))``: the ``has_aux=True`` form."""
  x, labels = batch
  logits, updates = MODEL.apply({"params": params, "batch_stats": batch_stats}, x,
                                train=True, mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return loss, (accuracy, updates["batch_stats"])


def setup(rows=B):
  kx, kl, ki = jax.random.split(jax.random.key(0), 3)
  x = 2.0 * jax.random.normal(kx, (rows, 5)) + 1.0
  labels = jax.random.randint(kl, (rows,), 0, 3)
  variables = MODEL.init(ki, x[:2], train=False)
  return variables["params"], variables["batch_stats"], (x, labels)


def reference(policy, params, batch, batch_stats, n=N):
  """The hand-written loop: mean loss, mean grads and the policy's state."""
  losses, grads, states = [], [], []
  state = batch_stats
  for i in range(n):
    start = state if policy == "sequential" else batch_stats
    (loss, state), g = jax.value_and_grad(loss_fn, has_aux=True)(
        params, jax.tree.map(lambda a: a[i::n], batch), start)
    losses.append(loss)
    grads.append(g)
    states.append(state)
  final = states[-1] if policy == "sequential" else jax.tree.map(
      lambda *s: sum(s) / n, *states)
  return (sum(losses) / n, final), jax.tree.map(lambda *g: sum(g) / n, *grads)


def max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("policy", ["sequential", "mean"])
def test_state_policy_matches_hand_written_loop(policy):
  params, batch_stats, batch = setup()
  grad_fn = jax.jit(jaxaccum.value_and_grad(
      loss_fn, num_microbatches=N, state_argnums=2, state_policy=policy))
  (loss, new_stats), grads = grad_fn(params, batch, batch_stats)
  (ref_loss, ref_stats), ref_grads = reference(policy, params, batch, batch_stats)
  assert_rel_close(new_stats, ref_stats)
  # BatchNorm over 4 rows amplifies float32 rounding (jit vs eager): 1e-4.
  assert_rel_close(grads, ref_grads, tol=1e-4)
  assert_rel_close(loss, ref_loss)
  # The two policies give different statistics here, so the check can fail.
  other = reference("mean" if policy == "sequential" else "sequential",
                    params, batch, batch_stats)[0][1]
  assert max_diff(new_stats, other) > 1e-3


def test_mean_policy_gives_the_full_batch_running_mean():
  """Averaging N momentum updates of the mean = one update with the batch mean.

  The running variance is lower than the full batch's: the mean of the
  micro-batch variances leaves out the spread of the micro-batch means.
  """
  params, batch_stats, batch = setup()
  (_, new_stats), _ = jaxaccum.value_and_grad(
      loss_fn, num_microbatches=N, state_argnums=2, state_policy="mean")(
          params, batch, batch_stats)
  _, full_stats = loss_fn(params, batch, batch_stats)
  assert_rel_close(new_stats["BatchNorm_0"]["mean"], full_stats["BatchNorm_0"]["mean"])
  assert bool(jnp.all(new_stats["BatchNorm_0"]["var"] < full_stats["BatchNorm_0"]["var"]))


def test_has_aux_with_state():
  params, batch_stats, batch = setup()
  (loss, (accuracy, new_stats)), grads = jaxaccum.value_and_grad(
      loss_with_accuracy, num_microbatches=N, state_argnums=2, has_aux=True)(
          params, batch, batch_stats)
  (ref_loss, ref_stats), ref_grads = reference("sequential", params, batch, batch_stats)
  assert_rel_close(new_stats, ref_stats)
  assert_rel_close(grads, ref_grads, tol=1e-4)
  assert_rel_close(loss, ref_loss)
  accuracies, state = [], batch_stats
  for i in range(N):
    _, (acc, state) = loss_with_accuracy(params, jax.tree.map(lambda a: a[i::N], batch), state)
    accuracies.append(acc)
  assert_rel_close(accuracy, sum(accuracies) / N)


def test_one_microbatch_is_the_plain_flax_step():
  params, batch_stats, batch = setup()
  out = jaxaccum.value_and_grad(loss_fn, num_microbatches=1, state_argnums=2)(
      params, batch, batch_stats)
  ref = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, batch_stats)
  assert_trees_equal(out, ref)


class TrainState(train_state.TrainState):
  batch_stats: Any


def make_train_step(num_microbatches):
  """The idiomatic Flax step, with the gradient from jaxaccum."""
  grad_fn = jaxaccum.value_and_grad(loss_with_accuracy, num_microbatches=num_microbatches,
                                    state_argnums=2, has_aux=True)

  @jax.jit
  def train_step(state, batch):
    (loss, (accuracy, batch_stats)), grads = grad_fn(state.params, batch, state.batch_stats)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, loss, accuracy

  return train_step


def test_train_state_step_matches_reference_step():
  params, batch_stats, batch = setup()
  tx = optax.sgd(0.5, momentum=0.9)
  state = TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx,
                            batch_stats=batch_stats)
  step = make_train_step(N)
  new_state = state
  for _ in range(2):
    new_state, loss, _ = step(new_state, batch)

  p, s, opt = params, batch_stats, tx.init(params)
  for _ in range(2):
    (ref_loss, s), g = reference("sequential", p, batch, s)
    updates, opt = tx.update(g, opt, p)
    p = optax.apply_updates(p, updates)
  assert int(new_state.step) == 2
  assert max_diff(new_state.params, params) > 1e-2  # it trained
  assert_rel_close(new_state.params, p, tol=1e-4)
  assert_rel_close(new_state.batch_stats, s, tol=1e-4)
  assert_rel_close(loss, ref_loss, tol=1e-4)


def test_per_argument_policies_and_integer_state():
  """A tuple of states: statistics averaged, a call counter sequential."""
  params, batch_stats, batch = setup()

  def counted(params, batch, batch_stats, calls):
    loss, new_stats = loss_fn(params, batch, batch_stats)
    return loss, (new_stats, calls + 1)

  (_, (new_stats, calls)), _ = jax.jit(jaxaccum.value_and_grad(
      counted, num_microbatches=N, state_argnums=(2, 3),
      state_policy=("mean", "sequential")))(params, batch, batch_stats, jnp.int32(0))
  assert int(calls) == N
  assert_rel_close(new_stats, reference("mean", params, batch, batch_stats)[0][1])
  (_, (_, calls)), _ = jaxaccum.value_and_grad(
      counted, num_microbatches=N, state_argnums=(2, 3))(params, batch, batch_stats,
                                                         jnp.int32(0))
  assert int(calls) == N
  (_, (_, calls)), _ = jaxaccum.value_and_grad(
      counted, num_microbatches=N, state_argnums=(2, 3), state_policy="mean")(
          params, batch, batch_stats, jnp.int32(0))
  assert int(calls) == 1  # every micro-batch starts from 0 and counts 1


def test_data_axis_averages_the_state_over_devices():
  devices = 2
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  params, batch_stats, batch = setup()
  n = 2
  (loss, new_stats), grads = jax.jit(jaxaccum.value_and_grad(
      loss_fn, num_microbatches=n, state_argnums=2, data_axis="data", mesh=mesh))(
          params, batch, batch_stats)
  # Each device runs the sequential loop over its own contiguous block of rows.
  per_device = [reference("sequential", params,
                          jax.tree.map(lambda a: a[d * B // devices:(d + 1) * B // devices],
                                       batch), batch_stats, n=n)
                for d in range(devices)]
  assert_rel_close(new_stats, jax.tree.map(lambda *s: sum(s) / devices,
                                           *[r[0][1] for r in per_device]))
  assert_rel_close(grads, jax.tree.map(lambda *g: sum(g) / devices,
                                       *[r[1] for r in per_device]), tol=1e-4)
  assert_rel_close(loss, sum(r[0][0] for r in per_device) / devices)
