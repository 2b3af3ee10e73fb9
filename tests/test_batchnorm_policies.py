"""What each ``state_policy`` does to BatchNorm running statistics, vs the full batch.

A two-BatchNorm Linen model, one accumulated step against one full-batch step
from the same statistics (``benchmarks/batchnorm_policies.py`` measures the
same on a ResNet):

- ``"mean"``: the first layer's running mean equals the full batch's; a deeper
  layer's does not (its input was normalized with micro-batch statistics);
- ``"sequential"``: the statistics move about ``(1 - m**N) / (1 - m)`` times
  as far as in the full-batch step (momentum ``m``); with momentum
  ``m ** (1 / N)`` about as far as with ``"mean"``.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jaxaccum

N = 4
B = 32
MOMENTUM = 0.9


class TwoBN(nn.Module):
  momentum: float = MOMENTUM

  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=False, momentum=self.momentum)(nn.Dense(8)(x))
    x = nn.Dense(8)(jnp.tanh(x))
    x = nn.BatchNorm(use_running_average=False, momentum=self.momentum)(x)
    return nn.Dense(1)(jnp.tanh(x))


def make_loss(model):
  def loss_fn(params, x, batch_stats):
    y, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                             mutable=["batch_stats"])
    return jnp.mean(y ** 2), updates["batch_stats"]
  return loss_fn


@functools.cache
def inputs():
  """Parameters, batch, initial statistics and the full batch's new statistics."""
  kx, ki = jax.random.split(jax.random.key(0))
  x = 2.0 * jax.random.normal(kx, (B, 5)) + 1.0
  variables = TwoBN().init(ki, x[:2])
  params, stats = variables["params"], variables["batch_stats"]
  (_, full), _ = jax.jit(jax.value_and_grad(make_loss(TwoBN()), has_aux=True))(
      params, x, stats)
  return params, x, stats, full


@functools.cache
def accumulated(policy, momentum=MOMENTUM):
  params, x, stats, _ = inputs()
  grad_fn = jaxaccum.value_and_grad(make_loss(TwoBN(momentum)), num_microbatches=N,
                                    state_argnums=2, state_policy=policy)
  (_, new), _ = jax.jit(grad_fn)(params, x, stats)
  return new


def rel_diff(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def move_ratio(new, layer, stat):
  """How far a running statistic moved, relative to the full-batch step."""
  _, _, old, full = inputs()
  return float(jnp.linalg.norm(new[layer][stat] - old[layer][stat])
               / jnp.linalg.norm(full[layer][stat] - old[layer][stat]))


def test_mean_policy_gives_the_full_batch_mean_in_the_first_layer_only():
  full = inputs()[3]
  new = accumulated("mean")
  # The running mean starts at zero: this is also the error of the step.
  assert rel_diff(new["BatchNorm_0"]["mean"], full["BatchNorm_0"]["mean"]) < 1e-6
  assert rel_diff(new["BatchNorm_1"]["mean"], full["BatchNorm_1"]["mean"]) > 1e-3
  # The running variance: the mean of the micro-batch variances, lower.
  assert bool(jnp.all(new["BatchNorm_0"]["var"] < full["BatchNorm_0"]["var"]))


def test_sequential_policy_moves_the_statistics_further():
  new = accumulated("sequential")
  expected = (1 - MOMENTUM ** N) / (1 - MOMENTUM)  # 3.44 at N=4, momentum 0.9
  assert move_ratio(new, "BatchNorm_0", "mean") == pytest.approx(expected, rel=0.05)
  for layer in ("BatchNorm_0", "BatchNorm_1"):
    for stat in ("mean", "var"):
      assert move_ratio(new, layer, stat) > 2.0


def test_momentum_to_the_power_one_over_n_moves_sequential_as_far_as_mean():
  compensated = accumulated("sequential", momentum=MOMENTUM ** (1 / N))
  mean = accumulated("mean")
  assert move_ratio(compensated, "BatchNorm_0", "mean") == pytest.approx(1.0, abs=0.02)
  for layer in ("BatchNorm_0", "BatchNorm_1"):
    for stat in ("mean", "var"):
      assert move_ratio(compensated, layer, stat) == pytest.approx(
          move_ratio(mean, layer, stat), abs=0.05)
  # It weights the last micro-batches most: not the full batch's mean.
  full = inputs()[3]
  assert rel_diff(compensated["BatchNorm_0"]["mean"], full["BatchNorm_0"]["mean"]) > 1e-3
