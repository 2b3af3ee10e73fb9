"""A GPT-2-shaped Flax Linen language model and its training loss.

Pre-LayerNorm blocks (causal multi-head self-attention, a 4x GELU
MLP), learned positions, output logits tied to the token embedding: the
shape of GPT-2 small when built from ``CONFIGS["gpt2-small"]``. Parameters are
float32; ``dtype`` is the compute dtype (bfloat16 on a GPU).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Config:
  """Model and batch sizes of one benchmark configuration.

  Attributes:
    layers: transformer blocks.
    d_model: width of the residual stream.
    heads: attention heads.
    seq: tokens per sequence.
    vocab: vocabulary size.
    batch: sequences in the global batch ``B`` (the whole optimizer step).
    dtype: compute dtype name (``"float32"`` or ``"bfloat16"``).
  """

  layers: int
  d_model: int
  heads: int
  seq: int
  vocab: int
  batch: int
  dtype: str = "float32"


CONFIGS = {
    # Small enough for a 2-core CPU, with activations (batch x seq) large
    # against the parameters, as in real training, so micro-batching has
    # something to save.
    "tiny": Config(layers=2, d_model=64, heads=4, seq=128, vocab=256, batch=32),
    "gpt2-small": Config(layers=12, d_model=768, heads=12, seq=1024, vocab=50304,
                         batch=32, dtype="bfloat16"),
}


class Block(nn.Module):
  """One pre-LayerNorm transformer block."""

  heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, mask):
    d = x.shape[-1]
    h = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.heads, dtype=self.dtype, deterministic=True)(h, mask=mask)
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.Dense(4 * d, dtype=self.dtype)(h)
    return x + nn.Dense(d, dtype=self.dtype)(nn.gelu(h))


class GPT(nn.Module):
  """Token ids ``(batch, seq)`` to logits ``(batch, seq, vocab)``.

  Attributes:
    config: the sizes.
    remat: rematerialize each block in the backward pass (``nn.remat``).
  """

  config: Config
  remat: bool = False

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    embed = nn.Embed(c.vocab, c.d_model, dtype=dtype)
    pos = self.param("pos", nn.initializers.normal(0.02), (c.seq, c.d_model))
    x = embed(tokens) + pos[: tokens.shape[-1]].astype(dtype)
    mask = nn.make_causal_mask(jnp.ones((1, tokens.shape[-1]), jnp.int32))
    block = nn.remat(Block) if self.remat else Block
    for i in range(c.layers):
      # Named explicitly so that remat and plain models share parameters.
      x = block(c.heads, dtype, name=f"block_{i}")(x, mask)
    return embed.attend(nn.LayerNorm(dtype=dtype)(x))


def init_params(config: Config, seed: int = 0):
  """Float32 parameters of :class:`GPT` for ``config``."""
  tokens = jnp.zeros((1, config.seq), jnp.int32)
  return GPT(config).init(jax.random.key(seed), tokens)["params"]


def make_loss(config: Config, remat: bool = False):
  """``loss(params, batch)``: mean next-token cross-entropy over the batch."""
  model = GPT(config, remat=remat)

  def loss(params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"]).mean()

  return loss


def make_batch(config: Config, seed: int = 1):
  """A random batch ``{"inputs", "targets"}`` of ``config.batch`` rows."""
  tokens = jax.random.randint(jax.random.key(seed), (config.batch, config.seq + 1),
                              0, config.vocab, dtype=jnp.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def optimizer() -> optax.GradientTransformation:
  """The optimizer of every variant: AdamW, as in GPT-2 training."""
  return optax.adamw(3e-4, weight_decay=0.1)
