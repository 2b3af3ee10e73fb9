"""Tiny models and comparison helpers shared by the tests.

Kept small and stable: an MLP regression loss on ``(x, y)`` batches and a
one-layer Flax Linen transformer with a masked token-mean loss on
``{"tokens", "targets", "mask"}`` batches.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 32
SEQ = 8


def mlp_init(key, din=4, hidden=16, dout=2, dtype=jnp.float32):
  """Parameters of a two-layer tanh MLP."""
  k1, k2 = jax.random.split(key)
  return {
      "w1": (jax.random.normal(k1, (din, hidden)) / np.sqrt(din)).astype(dtype),
      "b1": jnp.full((hidden,), 0.1, dtype),
      "w2": (jax.random.normal(k2, (hidden, dout)) / np.sqrt(hidden)).astype(dtype),
      "b2": jnp.zeros((dout,), dtype),
  }


def mlp_apply(params, x):
  x = x.astype(params["w1"].dtype)
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def mlp_loss(params, batch):
  """Mean squared error over the examples of ``batch = (x, y)`` (float32)."""
  x, y = batch
  err = mlp_apply(params, x).astype(jnp.float32) - y.astype(jnp.float32)
  return jnp.mean(jnp.square(err))


def mlp_batch(key, batch_size, din=4, dout=2):
  """A random regression batch ``(x, y)``."""
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (batch_size, din))
  y = jnp.sin(x[:, :dout]) + 0.1 * jax.random.normal(ky, (batch_size, dout))
  return x, y


class TinyTransformer(nn.Module):
  """A pre-LayerNorm causal transformer over ``SEQ`` tokens."""

  vocab: int = VOCAB
  d: int = 16
  heads: int = 2
  layers: int = 1

  @nn.compact
  def __call__(self, tokens):
    pos = self.param("pos", nn.initializers.normal(0.02), (tokens.shape[-1], self.d))
    x = nn.Embed(self.vocab, self.d)(tokens) + pos
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.layers):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(
          num_heads=self.heads, qkv_features=self.d, deterministic=True)(h, h, mask=mask)
      h = nn.LayerNorm()(x)
      x = x + nn.Dense(self.d)(nn.gelu(nn.Dense(2 * self.d)(h)))
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


TRANSFORMER = TinyTransformer()


@jax.jit
def transformer_init(key):
  return TRANSFORMER.init(key, jnp.zeros((1, SEQ), jnp.int32))["params"]


def transformer_loss(params, batch):
  """Token-mean cross-entropy over the non-padding tokens of ``batch``.

  An all-padding batch gives ``0 / 0 = NaN``.
  """
  logits = TRANSFORMER.apply({"params": params}, batch["tokens"])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  mask = batch["mask"].astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.sum(mask)


def num_tokens(batch):
  """``weight_fn`` for :func:`transformer_loss`: the non-padding tokens."""
  return jnp.sum(batch["mask"].astype(jnp.float32))


def token_batch(key, batch_size, lengths=None):
  """Random tokens; row ``r`` has ``lengths[r]`` real tokens (all by default)."""
  kt, kg = jax.random.split(key)
  tokens = jax.random.randint(kt, (batch_size, SEQ), 0, VOCAB, dtype=jnp.int32)
  targets = jax.random.randint(kg, (batch_size, SEQ), 0, VOCAB, dtype=jnp.int32)
  if lengths is None:
    lengths = [SEQ] * batch_size
  mask = jnp.arange(SEQ)[None, :] < jnp.asarray(lengths, jnp.int32)[:, None]
  return {"tokens": tokens, "targets": targets, "mask": mask.astype(jnp.float32)}


def rel_error(actual, expected) -> float:
  """Largest over leaves of ``|actual - expected|_2 / |expected|_2`` (float64).

  A leaf whose exact value is zero (the gradient of an attention key bias,
  say) holds only rounding noise, so each leaf's norm is floored at 1e-3 times
  the norm of the whole ``expected`` tree.
  """
  pairs = [(np.asarray(a, np.float64), np.asarray(e, np.float64))
           for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)]
  total = np.sqrt(sum(np.sum(np.square(e)) for _, e in pairs))
  errs = []
  for a, e in pairs:
    assert a.shape == e.shape, (a.shape, e.shape)
    errs.append(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-3 * total, 1e-30))
  return max(errs)


def assert_rel_close(actual, expected, tol=1e-5):
  """Same tree structure, and every leaf within relative error ``tol``."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  err = rel_error(actual, expected)
  assert err <= tol, f"relative error {err:.3g} > {tol}"


def assert_trees_equal(actual, expected):
  """Same structure, dtypes and bits."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert jnp.asarray(a).dtype == jnp.asarray(e).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def standard_promotion(tx):
  """``tx`` with its init and update traced under standard dtype promotion.

  The tests run with strict promotion to catch implicit dtype mixing in
  jaxaccum, but optax's Adam computes ``b1 ** count`` (a Python float to an
  int32 power), which strict promotion rejects. Only the inner optimizer gets
  standard promotion; jaxaccum's own code around it stays strict.
  """
  import optax

  def init(params):
    with jax.numpy_dtype_promotion("standard"):
      return tx.init(params)

  def update(updates, state, params=None, **extra):
    with jax.numpy_dtype_promotion("standard"):
      return tx.update(updates, state, params, **extra)

  return optax.GradientTransformationExtraArgs(init, update)
