"""BatchNorm running statistics under the two state policies, against the full batch.

One training step of a ResNet in the layout of Flax's ``examples/imagenet``
(a 7x7 stem, four stages of basic blocks; ``--blocks 2 2 2 2 --width 64`` is
ResNet18 with its 20 BatchNorm layers; the default, one block per stage and
width 16, a ResNet10 with 12, takes about 70 s of CPU time) on one batch of
random images, with ``jax.value_and_grad`` over the full batch and with
``jaxaccum.value_and_grad(..., num_microbatches=N, state_argnums=2,
state_policy=...)``, from the same parameters and initial statistics. For
every BatchNorm layer, in forward order, it reports:

- ``diff``: ``|accumulated - full| / |full - old|``, the difference of the new
  running statistic from the full-batch one, relative to the full-batch
  step's change (for the running mean, which starts at zero, this is also its
  relative difference);
- ``move``: ``|accumulated - old| / |full - old|``, how far the running
  statistic moved in one optimizer step, relative to the full-batch step.

``"sequential (momentum**(1/N))"`` is the ``"sequential"`` policy with the
BatchNorm momentum replaced by ``momentum ** (1 / N)`` in the accumulated step.

  python benchmarks/batchnorm_policies.py [--blocks 2 2 2 2 --width 64]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxaccum

POLICIES = ("mean", "sequential", "sequential (momentum**(1/N))")


class Block(nn.Module):
  """A basic residual block, as ``ResNetBlock`` in Flax's imagenet example."""

  filters: int
  strides: int
  momentum: float

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.momentum)
    conv = functools.partial(nn.Conv, use_bias=False)
    y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(x)))
    y = norm(scale_init=nn.initializers.zeros_init())(conv(self.filters, (3, 3))(y))
    if x.shape != y.shape:
      x = norm(name="norm_proj")(conv(self.filters, (1, 1), self.strides,
                                      name="conv_proj")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Flax's imagenet ResNet: ``blocks=(2, 2, 2, 2), width=64`` is ResNet18."""

  blocks: tuple[int, ...] = (2, 2, 2, 2)
  width: int = 64
  momentum: float = 0.9
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (7, 7), 2, padding=[(3, 3), (3, 3)], use_bias=False,
                name="conv_init")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                     name="bn_init")(x)
    x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), padding="SAME")
    for stage, count in enumerate(self.blocks):
      for block in range(count):
        strides = 2 if stage > 0 and block == 0 else 1
        x = Block(self.width * 2**stage, strides, self.momentum)(x, train)
    return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def make_loss(model):
  def loss_fn(params, batch, batch_stats):
    images, labels = batch
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                  images, train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates["batch_stats"]
  return loss_fn


def forward_rank(path):
  """Sorts Flax's alphabetical names into forward order: stem, Block_0, Block_1, ..."""
  if not path.startswith("Block_"):
    return (-1, path)
  block, rest = path[len("Block_"):].split("/", 1)
  return (int(block), rest)


def layers(batch_stats):
  """``{layer path: {"mean", "var"}}`` in forward order."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(batch_stats), sep="/")
  out = {}
  for path, value in sorted(flat.items(), key=lambda kv: forward_rank(kv[0])):
    layer, stat = path.rsplit("/", 1)
    out.setdefault(layer, {})[stat] = np.asarray(value, np.float64)
  return out


def compare(old, full, acc):
  """Per layer and statistic: ``diff`` and ``move`` (see the module docstring)."""
  out = {}
  for layer in full:
    out[layer] = {}
    for stat in ("mean", "var"):
      step = np.linalg.norm(full[layer][stat] - old[layer][stat])
      out[layer][stat] = {
          "diff": float(np.linalg.norm(acc[layer][stat] - full[layer][stat]) / step),
          "move": float(np.linalg.norm(acc[layer][stat] - old[layer][stat]) / step)}
  return out


def new_stats(model, n, policy, params, batch, batch_stats):
  """The running statistics after one step (``n=None``: the full batch)."""
  if n is None:
    grad_fn = jax.value_and_grad(make_loss(model), has_aux=True)
  else:
    if policy.startswith("sequential ("):
      model = model.clone(momentum=model.momentum ** (1 / n))
    grad_fn = jaxaccum.value_and_grad(make_loss(model), num_microbatches=n,
                                      state_argnums=2, state_policy=policy.split()[0])
  (_, stats), _ = jax.jit(grad_fn)(params, batch, batch_stats)
  return layers(stats)


def print_table(results, names):
  """One table per policy: a row per layer, ``diff`` and ``move`` per N."""
  for policy, by_n in results.items():
    print(f"\nstate_policy {policy}")
    print(" " * 21 + "".join(f"{f'N={n}':^33}" for n in by_n))
    print(f"{'layer':<21}" + "  mean diff  move  var diff  move" * len(by_n))
    for layer in names:
      cells = "".join(
          f"  {v['mean']['diff']:9.1e} {v['mean']['move']:5.2f} "
          f"{v['var']['diff']:9.1e} {v['var']['move']:5.2f}"
          for v in (by_layer[layer] for by_layer in by_n.values()))
      print(f"{layer:<21}{cells}")


def summary(results, first):
  """Per policy and N: the first layer, and the range over the deeper layers."""
  out = {}
  for policy, by_n in results.items():
    for n, by_layer in by_n.items():
      for stat in ("mean", "var"):
        for key in ("diff", "move"):
          deeper = [v[stat][key] for layer, v in by_layer.items() if layer != first]
          out[f"{policy}, N={n}, {stat} {key}"] = {
              "first layer": by_layer[first][stat][key],
              "deeper layers min": min(deeper), "deeper layers max": max(deeper)}
  return out


def model_name(blocks, width):
  layers = 2 + 2 * sum(blocks)  # stem and classifier, 2 convolutions per block
  return f"ResNet{layers} layout (blocks per stage {tuple(blocks)}), width {width}"


def default_out():
  return (f"benchmarks/results/batchnorm-policies-{jax.default_backend()}-"
          f"{os.cpu_count()}core-{datetime.date.today().isoformat()}.json")


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--batch", type=int, default=32, help="full batch size")
  parser.add_argument("--size", type=int, default=32, help="image height and width")
  parser.add_argument("--blocks", type=int, nargs=4, default=[1, 1, 1, 1],
                      help="basic blocks per stage (ResNet18: 2 2 2 2)")
  parser.add_argument("--width", type=int, default=16,
                      help="channels of the first stage (ResNet18: 64)")
  parser.add_argument("--momentum", type=float, default=0.9, help="BatchNorm momentum")
  parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8],
                      help="values of N")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=default_out(), help="JSON file to write")
  args = parser.parse_args()
  start = time.perf_counter()

  model = ResNet(tuple(args.blocks), args.width, args.momentum)
  kx, kl, ki = jax.random.split(jax.random.key(args.seed), 3)
  images = jax.random.normal(kx, (args.batch, args.size, args.size, 3))
  batch = (images, jax.random.randint(kl, (args.batch,), 0, 10))
  variables = jax.jit(functools.partial(model.init, train=False))(ki, images[:1])
  params, batch_stats = variables["params"], variables["batch_stats"]

  old = layers(batch_stats)
  full = new_stats(model, None, None, params, batch, batch_stats)
  results = {policy: {n: compare(old, full, new_stats(model, n, policy, params, batch,
                                                      batch_stats))
                      for n in args.microbatches}
             for policy in POLICIES}
  names = list(full)
  print(f"{len(names)} BatchNorm layers in forward order:", ", ".join(names))
  print_table(results, names)
  seconds = time.perf_counter() - start
  print(f"done in {seconds:.1f} s on {jax.default_backend()}")

  record = {
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"{jax.default_backend()}",
      "versions": {"jax": jax.__version__, "flax": flax.__version__,
                   "optax": optax.__version__},
      "settings": {k: v for k, v in vars(args).items() if k != "out"},
      "model": model_name(args.blocks, args.width),
      "layers": names,
      "summary": summary(results, names[0]),
      "per layer": results,
      "seconds": seconds,
  }
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
