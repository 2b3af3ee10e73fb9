"""A character-level transformer LM in Flax NNX, trained with micro-batches.

Trains a small causal transformer on Python source: the standard library's
top-level modules (the ``*.py`` files next to ``os.py``, in sorted order; every
8th file is held out for validation), cut into paragraphs of at most
``--length`` characters, so the sequences have different lengths and are
padded. Each step accumulates ``--microbatches`` micro-batches with
``jaxaccum.nnx.value_and_grad``:

- ``weight_fn`` counts the non-padding target tokens of a micro-batch, so the
  loss and gradients are the token mean over the whole batch, exactly as if it
  were processed at once (an unweighted mean of micro-batch means would
  over-weight the micro-batches with short sequences);
- dropout draws its keys from the module's ``nnx.Rngs``, a different mask for
  every micro-batch;
- ``with_stats=True`` gives the gradient noise scale ``B_simple`` (McCandlish
  et al., 2018) for free from the micro-batch gradients: the batch size beyond
  which larger batches stop paying off. Its two estimates are noisy, so each
  is smoothed with an exponential moving average before dividing.

It prints the loss, tokens per second and ``B_simple``, writes the loss and
``B_simple`` curves to ``char_lm.png`` in ``--out``, and ends with a sample of
generated text. A few minutes on a 2-core CPU:

  python examples/char_lm.py
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from jax import lax
from tqdm import tqdm

import jaxaccum.nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VOCAB = 128  # ASCII; anything else becomes "?"
PAD, BOS = 0, 1  # control characters that never occur in the text


def load_sequences(length: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Training and validation paragraphs of the standard library, as byte arrays.

  A paragraph is the text between blank lines; a longer one is cut into
  pieces of ``length`` characters; pieces under 8 characters are dropped.
  """
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
  train, valid = [], []
  for index, path in enumerate(files):
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read().encode("ascii", errors="replace").replace(b"\0", b"?").replace(b"\1", b"?")
    pieces = [p[i:i + length] for p in text.split(b"\n\n") for i in range(0, len(p), length)]
    arrays = [np.frombuffer(p, np.uint8) for p in pieces if len(p.strip()) >= 8]
    (valid if index % 8 == 7 else train).extend(arrays)
  return train, valid


def make_batch(sequences: list[np.ndarray], rows: np.ndarray, length: int) -> dict:
  """``inputs`` (BOS, then the text) and ``targets`` (the text), padded with PAD."""
  tokens = np.full((len(rows), length + 1), PAD, np.int32)
  for r, i in enumerate(rows):
    tokens[r, 0] = BOS
    tokens[r, 1:len(sequences[i]) + 1] = sequences[i]
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


class Block(nnx.Module):
  """A pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, dim: int, heads: int, dropout: float, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False,
                                            rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.hidden = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.out = nnx.Linear(4 * dim, dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.dropout(self.attention(self.norm1(x), mask=mask))
    return x + self.dropout(self.out(nnx.gelu(self.hidden(self.norm2(x)))))


class CharLM(nnx.Module):
  """Token and position embeddings, ``layers`` blocks, a tied output layer."""

  def __init__(self, length: int, dim: int, heads: int, layers: int, dropout: float,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (length, dim)))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.blocks = nnx.List([Block(dim, heads, dropout, rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, tokens):
    x = self.dropout(self.embed(tokens) + self.position[:tokens.shape[-1]])
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.embed.attend(self.norm(x))


def num_tokens(batch) -> jax.Array:
  """``weight_fn``: the non-padding target tokens of a (micro-)batch."""
  return jnp.sum(batch["targets"] != PAD, dtype=jnp.float32)


def loss_fn(model: CharLM, batch) -> jax.Array:
  """Cross-entropy averaged over the non-padding target tokens."""
  logits = model(batch["inputs"])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return jnp.sum(jnp.where(batch["targets"] != PAD, nll, 0.0)) / num_tokens(batch)


@nnx.jit
def generate(model: CharLM, tokens: jax.Array, start: int, key: jax.Array,
             temperature: float) -> jax.Array:
  """Fills ``tokens[start:]`` by sampling one character at a time."""

  def step(t, tokens):
    logits = model(tokens[None])[0, t - 1] / temperature
    return tokens.at[t].set(jax.random.categorical(jax.random.fold_in(key, t), logits))

  return lax.fori_loop(start, tokens.shape[0], step, tokens)


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
  parser.add_argument("--batch", type=int, default=64, help="sequences per optimizer step")
  parser.add_argument("--microbatches", type=int, default=8,
                      help="micro-batches per optimizer step")
  parser.add_argument("--length", type=int, default=128, help="longest sequence")
  parser.add_argument("--dim", type=int, default=128, help="model width")
  parser.add_argument("--heads", type=int, default=4, help="attention heads")
  parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
  parser.add_argument("--dropout", type=float, default=0.1, help="dropout rate")
  parser.add_argument("--lr", type=float, default=3e-3, help="adamw learning rate")
  parser.add_argument("--eval-every", type=int, default=25,
                      help="steps between evaluations")
  parser.add_argument("--prompt", default="def ", help="start of the printed sample")
  parser.add_argument("--temperature", type=float, default=0.5,
                      help="sampling temperature")
  parser.add_argument("--out", default=".", help="folder for char_lm.png")
  args = parser.parse_args()

  train, valid = load_sequences(args.length)
  rng = np.random.default_rng(0)
  valid_batch = make_batch(valid, rng.choice(len(valid), 4 * args.batch, replace=False),
                           args.length)
  print(f"{len(train)} training and {len(valid)} validation sequences of at most "
        f"{args.length} characters; {args.steps} steps of {args.batch} sequences in "
        f"{args.microbatches} micro-batches")

  model = CharLM(args.length, args.dim, args.heads, args.layers, args.dropout,
                 rngs=nnx.Rngs(params=0, dropout=1))
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10),
                                                args.steps)
  optimizer = nnx.Optimizer(
      model, optax.chain(optax.clip_by_global_norm(1.0),
                         optax.adamw(schedule, weight_decay=0.01)), wrt=nnx.Param)
  grad_fn = jaxaccum.nnx.value_and_grad(
      loss_fn, num_microbatches=args.microbatches, weight_fn=num_tokens, with_stats=True)

  # Single-step noise-scale estimates are noisy: average their two parts.
  smoother = jaxaccum.noise_scale_ema(decay=0.95)

  @nnx.jit
  def train_step(model, optimizer, noise_state, batch):
    (loss, grads), stats = grad_fn(model, batch)
    optimizer.update(model, grads)
    b_simple, noise_state = smoother.update(noise_state, stats)
    return loss, b_simple, noise_state

  # Evaluation shares the parameters, with dropout off.
  eval_loss = nnx.jit(lambda model, batch: loss_fn(nnx.view(model, deterministic=True), batch))

  losses, valid_losses, noise_scales = [], [], []
  noise_state = smoother.init()
  tokens, seconds = 0, 0.0
  bar = tqdm(range(args.steps), desc="training")
  for step in bar:
    batch = make_batch(train, rng.integers(len(train), size=args.batch), args.length)
    start = time.perf_counter()
    loss, b_simple, noise_state = train_step(model, optimizer, noise_state, batch)
    loss = float(loss)
    if step:  # the first step includes the compilation
      seconds += time.perf_counter() - start
      tokens += int(num_tokens(batch))
    losses.append(loss)
    noise_scales.append(float(b_simple))
    if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
      valid_losses.append((step + 1, float(eval_loss(model, valid_batch))))
    bar.set_postfix(loss=f"{loss:.3f}", B_simple=f"{noise_scales[-1]:.0f}")
  bar.close()

  speed = tokens / seconds if seconds else float("nan")
  print(f"final training loss {np.mean(losses[-10:]):.4f} nats/char (mean of the last "
        f"10 steps), validation loss {valid_losses[-1][1]:.4f} nats/char")
  print(f"throughput {speed:,.0f} tokens/s (non-padding, after the first step)")
  print(f"gradient noise scale B_simple (EMA) {noise_scales[-1]:.1f} sequences "
        f"(the batch is {args.batch})")

  fig, (ax_loss, ax_noise) = plt.subplots(1, 2, figsize=(11, 4))
  ax_loss.plot(np.arange(1, args.steps + 1), losses, alpha=0.8, label="training batch")
  ax_loss.plot(*zip(*valid_losses), marker=".", label="validation")
  ax_loss.set(xlabel="optimizer step", ylabel="nats per character", title="loss")
  ax_noise.plot(np.arange(1, args.steps + 1), noise_scales)
  ax_noise.axhline(args.batch, color="gray", linestyle="--", label="batch size")
  ax_noise.set(xlabel="optimizer step", ylabel="sequences", yscale="log",
               title="gradient noise scale B_simple (EMA)")
  for ax in (ax_loss, ax_noise):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(f"character-level NNX transformer: batch {args.batch} sequences in "
               f"{args.microbatches} micro-batches")
  fig.tight_layout()
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "char_lm.png")
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")

  prompt = np.frombuffer(args.prompt.encode("ascii", errors="replace"), np.uint8)
  context = np.full(args.length, PAD, np.int32)
  context[0] = BOS
  context[1:len(prompt) + 1] = prompt
  sample = generate(nnx.view(model, deterministic=True), jnp.asarray(context),
                    len(prompt) + 1, jax.random.key(2), args.temperature)
  text = bytes(np.asarray(sample[1:], np.uint8)).decode("ascii").replace("\0", "")
  print(f"sample (temperature {args.temperature}):\n{text}")


if __name__ == "__main__":
  main()
