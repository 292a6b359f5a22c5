"""Samples from a language-model checkpoint through the decode cache (O(1) state per token for recurrent mixers).

    python -m experiments.generate --workdir workdirs/lm --prompt "def " --num_tokens 200
    python -m experiments.generate --workdir workdirs/mqar --prompt_tokens 3,130,7,200 --temperature 0

The prompt is read in one decode call (prefill), then each new token is one jitted decode step; the
throughput printed counts generated tokens after compilation.
"""
import functools
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments.trainer import restore
from mixers.layers.decode_cache import decode_capacity


def sample_token(logits, rng, temperature):
  """logits [B,V] -> tokens [B] int32 (argmax when temperature is 0)."""
  if temperature <= 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


def left_aligned(prompt, lengths):
  """Right-padded prompts [B,P] with `lengths` [B] -> (prompts moved to end at P, segment ids [B,P]: 0 on the
  padding in front, 1 on the prompt)."""
  b, p = prompt.shape
  lengths = np.asarray(lengths)
  if lengths.shape != (b,) or np.any(lengths < 1) or np.any(lengths > p):
    raise ValueError(f"lengths must be [B] = ({b},) ints in [1, P={p}], got {lengths.tolist()}")
  source = np.arange(p)[None, :] - (p - lengths)[:, None]  # position in the original row, negative in front
  moved = np.take_along_axis(np.asarray(prompt), np.clip(source, 0, p - 1), axis=1)
  ids = (source >= 0).astype(np.int32)
  return jnp.asarray(np.where(ids, moved, 0), jnp.int32), jnp.asarray(ids)


def generate(model, params, prompt, num_tokens, *, rng, temperature=0.8, lengths=None):
  """(tokens [B, num_tokens] int32, seconds per generated token after compilation) continuing prompt [B,P].

  The cache is sized for P + num_tokens (attention's KV cache); layers whose cache the model's settings bound
  (m2's history holds the model's max_len positions) must hold P + num_tokens too, else a ValueError says so
  before decoding. Decoding token by token equals the full forward pass. Ragged prompts: `lengths` [B] (row b's
  prompt is prompt[b, :lengths[b]]); the prompts are moved to end together and read as packed rows (padding in
  front is a segment of its own), so every row continues its own prompt as if decoded alone; the model's mixers
  must take segment_ids.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  b, p = prompt.shape
  if p < 1 or num_tokens < 1:
    raise ValueError(f"prompt has shape {tuple(prompt.shape)} and num_tokens={num_tokens}: expected both >= 1")
  prefill = {}
  if lengths is not None:
    prompt, prefill["segment_ids"] = left_aligned(prompt, lengths)
  full = jnp.zeros((b, p + num_tokens), jnp.int32)
  cache = jax.jit(functools.partial(model.init, decode=True))(jax.random.key(0), full)["cache"]
  capacity = decode_capacity(cache)
  if capacity is not None and p + num_tokens > capacity:
    raise ValueError(f"a prompt of {p} tokens and num_tokens={num_tokens} need {p + num_tokens} positions, but the "
                     f"model's decode caches hold {capacity} (a layer's max_len, from the model config's max_len)")

  @jax.jit
  def step(cache, tokens, rng, **kw):
    logits, updated = model.apply({"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"], **kw)
    return updated["cache"], sample_token(logits[:, -1], rng, temperature)

  rngs = jax.random.split(rng, num_tokens)
  cache, token = step(cache, prompt, rngs[0], **prefill)
  out = [token]
  cache, token = step(cache, token[:, None], rngs[1 % num_tokens])  # compiles the one-token step
  jax.block_until_ready(token)
  if num_tokens > 1:
    out.append(token)
  start = time.perf_counter()
  for i in range(2, num_tokens):
    cache, token = step(cache, token[:, None], rngs[i])
    out.append(token)
  jax.block_until_ready(out[-1])
  per_token = (time.perf_counter() - start) / max(num_tokens - 2, 1)
  return jnp.stack(out, axis=1), per_token


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  exp, state, step = restore.load_run(flags.FLAGS.workdir, step=flags.FLAGS.step)
  if exp.task != "lm":
    raise ValueError(f"workdir={flags.FLAGS.workdir!r} holds a {exp.task} model; generate needs a language model")
  byte_level = exp.spec.vocab_size == 256 and exp.spec.name != "mqar"
  if flags.FLAGS.prompt_tokens:
    ids = [int(t) for t in flags.FLAGS.prompt_tokens.split(",")]
  else:
    ids = list(flags.FLAGS.prompt.encode("utf-8"))
  bad = [i for i in ids if not 0 <= i < exp.spec.vocab_size]
  if bad:
    raise ValueError(f"prompt tokens {bad} are outside the vocabulary [0, {exp.spec.vocab_size})")
  prompt = np.tile(np.asarray(ids, np.int32), (flags.FLAGS.batch_size, 1))
  # Sampling runs without the training mesh's constraints, so any batch size works.
  tokens, per_token = generate(exp.model, state["params"], prompt, flags.FLAGS.num_tokens,
                               rng=jax.random.key(flags.FLAGS.seed), temperature=flags.FLAGS.temperature)
  tokens = np.asarray(tokens)
  for row in tokens:
    if byte_level:
      print(repr(bytes(ids).decode("utf-8", "replace") + bytes(row.astype(np.uint8)).decode("utf-8", "replace")))
    else:
      print(" ".join(map(str, ids)), "|", " ".join(map(str, row)))
  print(f"checkpoint step {step}: {tokens.size} tokens, {flags.FLAGS.batch_size / per_token:,.0f} tokens/s "
        f"({per_token * 1e3:.2f} ms per decode step, batch {flags.FLAGS.batch_size})", flush=True)


def define_flags():
  """The command-line flags (defined only when run as a program, so that the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "the training run's workdir (a language model)")
  flags.DEFINE_string("prompt", "def ", "text prompt (byte-level models)")
  flags.DEFINE_string("prompt_tokens", "", "comma-separated token ids (overrides --prompt)")
  flags.DEFINE_integer("num_tokens", 128, "tokens to generate")
  flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0 picks the most likely token")
  flags.DEFINE_integer("batch_size", 1, "samples drawn in parallel")
  flags.DEFINE_integer("seed", 0, "sampling seed")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the latest readable one)")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
