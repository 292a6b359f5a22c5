r"""A small task for each attention pattern (self / cross x causal / non-causal), learned by each mixer.

  python -m experiments.patterns --quick                       # seconds per run, CPU
  python -m experiments.patterns --steps 600 --mixer gla --mixer attention

Every task is synthetic, drawn on the fly with numpy (seeded), and small enough that a one- or two-layer model of
width 64 learns it in a few hundred Adam steps. Accuracy is measured on fresh examples at the positions that carry a
target; each row of the table is one mixer, each column one task:

  self_causal       MQAR (Zoology): context `k1 v1 ... kP vP`, then each key once more at a random later slot among
                    noise tokens; the target at a query is its value. Chance 2 / vocab.
  self_noncausal    does the token at t appear anywhere else in the sequence (before or after t)? Tokens uniform
                    over a vocabulary of ~1.44 T, so about half of the answers are yes. A causal model sees only
                    the left half of the evidence. Chance 0.5.
  cross_causal      source s `[T]` (distinct tokens), target x `[T]`: is x_t among s_0..s_t? Half of the targets are
                    drawn from s_0..s_t, the other half from the source's future s_{t+1}.. (absent from the whole
                    source at the last position), so a mixer that reads past t is misled. Chance 0.5.
  cross_noncausal   the source holds P key-value pairs (one position per pair: the sum of a key embedding and a value
                    embedding), the target T queries of those keys; the answer at a query is its key's value.
                    P = T. Chance 2 / vocab.
  cross_noncausal_long  the same with P = Tk = 2T pairs (a source twice the target's length).

Self patterns run the mixer on the target stream (`mixer(x)`, its `causal` attribute set by the pattern). Cross
patterns run `mixer(x, context=c)`: queries from the target stream, keys and values from the embedded source c
`[B,Tk,d_model]` (causal cross needs Tk == T: target t sees source positions s <= t).

The model: token embedding -> per layer [RMSNorm, short depthwise convolution (causal when the pattern is),
mixer, residual; RMSNorm, GLU MLP, residual] -> RMSNorm -> linear head; trained with AdamW and cross-entropy on the
target positions.
"""
import argparse
import dataclasses
import functools
import sys
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixers
from mixers import registry

IGNORE = -1
PATTERNS = ("self_causal", "self_noncausal", "cross_causal", "cross_noncausal", "cross_noncausal_long")
BASE_MIXERS = ("attention", "linear_attention", "gla", "retention")
OPTIONAL_MIXERS = ("hyper_attention",)


def default_mixers():
  """The attention-like mixers of the table: BASE_MIXERS, plus any of OPTIONAL_MIXERS that is registered."""
  registered = registry.names("sequence")
  return BASE_MIXERS + tuple(m for m in OPTIONAL_MIXERS if m in registered)


# ---------------------------------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class Batch:
  """tokens `[B,T]` int32, targets `[B,T]` int32 (IGNORE where no answer), source `[B,Tk,F]` int32 or None."""
  tokens: np.ndarray
  targets: np.ndarray
  source: Optional[np.ndarray] = None


def mqar(rng, batch, seq_len, num_pairs, vocab):
  """MQAR: keys from [1, vocab/2), values from [vocab/2, vocab), each key queried once after the context."""
  half = vocab // 2
  if num_pairs > half - 1 or 4 * num_pairs > seq_len:
    raise ValueError(f"num_pairs={num_pairs} does not fit vocab={vocab}, seq_len={seq_len}")
  tokens = rng.integers(0, vocab, (batch, seq_len))
  targets = np.full((batch, seq_len), IGNORE)
  slots = (seq_len - 2 * num_pairs) // 2
  for b in range(batch):
    keys = rng.choice(np.arange(1, half), num_pairs, replace=False)
    values = rng.choice(np.arange(half, vocab), num_pairs, replace=False)
    tokens[b, 0:2 * num_pairs:2], tokens[b, 1:2 * num_pairs:2] = keys, values
    where = 2 * num_pairs + 2 * rng.choice(slots, num_pairs, replace=False)
    tokens[b, where], targets[b, where] = keys, values
  return Batch(tokens.astype(np.int32), targets.astype(np.int32))


def appears_elsewhere(rng, batch, seq_len, vocab):
  """Uniform tokens; target 1 where the token occurs at another position of the sequence, else 0."""
  tokens = rng.integers(0, vocab, (batch, seq_len))
  counts = (tokens[:, :, None] == tokens[:, None, :]).sum(-1)
  return Batch(tokens.astype(np.int32), (counts > 1).astype(np.int32))


def causal_membership(rng, batch, seq_len, vocab):
  """Source s: distinct tokens; target x_t from s_0..s_t (answer 1) or from s_{t+1}.. / outside s (answer 0)."""
  if vocab <= seq_len:
    raise ValueError(f"vocab={vocab} must exceed seq_len={seq_len} (distinct source tokens plus an absent one)")
  source = np.stack([rng.permutation(vocab)[:seq_len] for _ in range(batch)])
  tokens = np.zeros((batch, seq_len), np.int64)
  targets = rng.integers(0, 2, (batch, seq_len))
  for b in range(batch):
    absent = np.setdiff1d(np.arange(vocab), source[b])
    for t in range(seq_len):
      if targets[b, t]:
        tokens[b, t] = source[b, rng.integers(0, t + 1)]
      elif t + 1 < seq_len:
        tokens[b, t] = source[b, rng.integers(t + 1, seq_len)]
      else:
        tokens[b, t] = rng.choice(absent)
  return Batch(tokens.astype(np.int32), targets.astype(np.int32), source[..., None].astype(np.int32))


def cross_lookup(rng, batch, seq_len, num_pairs, vocab):
  """Source: num_pairs (key, value) pairs, keys distinct in [0, vocab/2); target: seq_len queried keys -> values."""
  half = vocab // 2
  if num_pairs > half:
    raise ValueError(f"num_pairs={num_pairs} distinct keys do not fit vocab={vocab}")
  keys = np.stack([rng.permutation(half)[:num_pairs] for _ in range(batch)])
  values = rng.integers(half, vocab, (batch, num_pairs))
  pick = rng.integers(0, num_pairs, (batch, seq_len))
  tokens = np.take_along_axis(keys, pick, 1)
  targets = np.take_along_axis(values, pick, 1)
  source = np.stack([keys, values], -1)
  return Batch(tokens.astype(np.int32), targets.astype(np.int32), source.astype(np.int32))


@dataclasses.dataclass(frozen=True)
class Task:
  """A pattern's task: how the mixer is called (causal, cross) and how batches are drawn."""
  pattern: str
  causal: bool
  cross: bool
  vocab: int
  seq_len: int
  layers: int
  make: Any  # (rng, batch) -> Batch


def tasks(seq_len=32):
  """The tasks of PATTERNS at target length seq_len (even, >= 16)."""
  t = seq_len
  return {
      "self_causal": Task("self_causal", True, False, 32, t, 2,
                          functools.partial(mqar, seq_len=t, num_pairs=max(2, t // 8), vocab=32)),
      "self_noncausal": Task("self_noncausal", False, False, int(round(1.44 * t)), t, 1,
                             functools.partial(appears_elsewhere, seq_len=t, vocab=int(round(1.44 * t)))),
      "cross_causal": Task("cross_causal", True, True, 2 * t, t, 1,
                           functools.partial(causal_membership, seq_len=t, vocab=2 * t)),
      "cross_noncausal": Task("cross_noncausal", False, True, 4 * t, t, 1,
                              functools.partial(cross_lookup, seq_len=t, num_pairs=t, vocab=4 * t)),
      "cross_noncausal_long": Task("cross_noncausal_long", False, True, 4 * t, t, 1,
                                   functools.partial(cross_lookup, seq_len=t, num_pairs=2 * t, vocab=4 * t)),
  }


# ---------------------------------------------------------------------------------------------------- model


def mixer_kwargs(name, d_model):
  """Constructor arguments of mixer `name` at width d_model: heads of 32 (attention-like), else its defaults."""
  if name in ("attention", "linear_attention", "retention", "gla", "hyper_attention"):
    return dict(num_heads=max(1, d_model // 32))
  return {}


class PatternNet(nn.Module):
  """tokens `[B,T]` (and source `[B,Tk,F]` for cross patterns) -> logits `[B,T,vocab]`.

  Per layer: x += mixer(conv(norm(x))[, context=c]), x += GLU(norm(x)); c = norm(sum_f embed_f(source[..., f])).
  prefix_len (self patterns only) is passed to the mixer call: the first prefix_len tokens see each other.
  """
  mixer: str
  vocab: int
  causal: bool
  cross: bool
  d_model: int = 64
  layers: int = 2
  conv_width: int = 3
  mixer_kwargs: Optional[dict] = None

  @nn.compact
  def __call__(self, tokens, source=None, prefix_len=None):
    x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
    context = None
    if self.cross:
      if source is None:
        raise ValueError("a cross pattern needs source [B,Tk,F]")
      context = sum(nn.Embed(self.vocab, self.d_model, name=f"source_embed_{f}")(source[..., f])
                    for f in range(source.shape[-1]))
      context = nn.RMSNorm(name="source_norm")(context)
    kwargs = self.mixer_kwargs if self.mixer_kwargs is not None else mixer_kwargs(self.mixer, self.d_model)
    for i in range(self.layers):
      h = nn.RMSNorm(name=f"norm_{i}")(x)
      if self.conv_width > 1:
        pad = ((self.conv_width - 1, 0),) if self.causal else "SAME"
        h = h + nn.Conv(self.d_model, (self.conv_width,), padding=pad, feature_group_count=self.d_model,
                        name=f"conv_{i}")(h)
      layer = mixers.build_mixer(self.mixer, causal=self.causal, name=f"mixer_{i}", **kwargs)
      call = {}
      if context is not None:
        call["context"] = context
      if prefix_len is not None:
        call["prefix_len"] = prefix_len
      x = x + layer(h, **call)
      h = nn.RMSNorm(name=f"mlp_norm_{i}")(x)
      gate, up = jnp.split(nn.Dense(4 * self.d_model, name=f"mlp_in_{i}")(h), 2, axis=-1)
      x = x + nn.Dense(self.d_model, name=f"mlp_out_{i}")(jax.nn.silu(gate) * up)
    return nn.Dense(self.vocab, name="head")(nn.RMSNorm(name="final_norm")(x)).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------- training


def masked_loss(logits, targets):
  """Mean cross-entropy over positions with a target, and the number of correct argmaxes there."""
  valid = targets != IGNORE
  safe = jnp.where(valid, targets, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  n = jnp.maximum(valid.sum(), 1)
  correct = ((logits.argmax(-1) == safe) & valid).sum()
  return jnp.where(valid, ce, 0.0).sum() / n, (correct, valid.sum())


def train(model, make_batch, *, steps, batch_size=32, lr=3e-3, seed=0, eval_batches=4, prefix_len=None,
          log_every=0):
  """Trains `model` on batches from `make_batch(rng, batch_size)`; returns (accuracy on fresh batches, seconds).

  prefix_len: None, or a function of the batch giving the model's prefix_len argument.
  """
  rng = np.random.default_rng(seed)
  first = make_batch(rng, batch_size)
  extra = lambda b: dict(source=None if b.source is None else jnp.asarray(b.source),
                         prefix_len=None if prefix_len is None else prefix_len(b))
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (first.tokens, extra(first)))
  params = model.lazy_init(jax.random.key(seed), shapes[0], **shapes[1])
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 2), lr * 0.05)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, tokens, targets, source, prefix_len):
    def loss_fn(p):
      return masked_loss(model.apply(p, tokens, source, prefix_len), targets)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, tokens, targets, source, prefix_len):
    return masked_loss(model.apply(params, tokens, source, prefix_len), targets)[1]

  start = time.perf_counter()
  batch = first
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, jnp.asarray(batch.tokens), jnp.asarray(batch.targets),
                                   **extra(batch))
    if log_every and (i + 1) % log_every == 0:
      print(f"    step {i + 1}: loss {float(loss):.3f}", flush=True)
    batch = make_batch(rng, batch_size)
  eval_rng = np.random.default_rng(10_000 + seed)
  correct = total = 0
  for _ in range(eval_batches):
    b = make_batch(eval_rng, batch_size)
    c, n = evaluate(params, jnp.asarray(b.tokens), jnp.asarray(b.targets), **extra(b))
    correct, total = correct + int(c), total + int(n)
  return correct / max(total, 1), time.perf_counter() - start


def unsupported(model, task):
  """None when `model` accepts the task's inputs, else the mixer's refusal (a source length it cannot pair with the
  target, or a call argument it does not have). Only builds the abstract parameters: nothing is compiled."""
  b = task.make(np.random.default_rng(0), 1)
  source = None if b.source is None else jax.ShapeDtypeStruct(b.source.shape, jnp.int32)
  try:
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(b.tokens.shape, jnp.int32), source)
  except (ValueError, TypeError) as e:  # refused shapes, or no `context` / `prefix_len` argument at all
    return str(e).splitlines()[0]
  return None


def run_cell(mixer, task, *, steps, d_model, batch_size, lr, seed):
  """(accuracy or None, wall seconds with compilation, note) of `mixer` on `task` after `steps` steps; a task
  the mixer refuses (see `unsupported`) gives accuracy None and the refusal as the note."""
  model = PatternNet(mixer=mixer, vocab=task.vocab, causal=task.causal, cross=task.cross, d_model=d_model,
                     layers=task.layers)
  reason = unsupported(model, task)
  if reason:
    return None, 0.0, reason
  acc, secs = train(model, task.make, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
  return acc, secs, ""


def chance(task):
  """Accuracy of the best constant guess (0.5 for the yes/no tasks, one over the answers otherwise)."""
  if task.pattern in ("self_noncausal", "cross_causal"):
    return 0.5
  return 2.0 / task.vocab


def format_table(rows, patterns):
  """Text table: one line per mixer, one column per pattern (accuracy), and a chance line."""
  names = list(dict.fromkeys(r["mixer"] for r in rows))
  acc = {(r["mixer"], r["pattern"]): r["accuracy"] for r in rows}
  width = max(len(p) for p in patterns)
  lines = [" | ".join(["mixer".rjust(16)] + [p.rjust(width) for p in patterns])]
  lines.append("-+-".join(["-" * 16] + ["-" * width] * len(patterns)))
  for m in names:
    cells = [("-" if acc.get((m, p)) is None else f"{acc[(m, p)]:.3f}").rjust(width) for p in patterns]
    lines.append(" | ".join([m.rjust(16)] + cells))
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mixer", action="append", help=f"mixers (repeatable; default: {', '.join(default_mixers())})")
  parser.add_argument("--pattern", action="append", choices=PATTERNS, help="patterns (repeatable; default: all)")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--seq_len", type=int, default=32, help="target length T")
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true",
                      help="T=16, 150 steps, batch 16 (unless given), XLA optimisations off (faster compiles)")
  args = parser.parse_args(argv)
  if args.quick:
    given = set(a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv))
    if "--steps" not in given:
      args.steps = 150
    if "--seq_len" not in given:
      args.seq_len = 16
    if "--batch_size" not in given:
      args.batch_size = 16
  args.mixer = args.mixer or list(default_mixers())
  unknown = [m for m in args.mixer if m not in registry.names("sequence")]
  if unknown:
    parser.error(f"unknown mixer(s) {unknown}; registered: {registry.names('sequence')}")
  args.pattern = args.pattern or list(PATTERNS)
  return args


def main(argv=None):
  """Trains every (mixer, pattern) cell; prints and returns (rows, table text)."""
  args = parse_args(argv)
  if args.quick:  # tiny programs: XLA's optimisation passes cost more compile time than they save
    jax.config.update("jax_disable_most_optimizations", True)
  all_tasks = tasks(args.seq_len)
  rows = []
  for m in args.mixer:
    for p in args.pattern:
      acc, secs, note = run_cell(m, all_tasks[p], steps=args.steps, d_model=args.d_model,
                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed)
      rows.append({"mixer": m, "pattern": p, "accuracy": acc, "chance": chance(all_tasks[p]), "seconds": secs,
                   "note": note})
      text = (f"not run: {note}" if acc is None
              else f"accuracy {acc:.3f} (chance {chance(all_tasks[p]):.3f}) {secs:.1f} s")
      print(f"  {m:>16} {p:<22} {text}", flush=True)
  table = format_table(rows, args.pattern)
  print(f"\n## accuracy after {args.steps} steps (T={args.seq_len}, d_model={args.d_model}, batch {args.batch_size}, "
        f"seed {args.seed})\n{table}")
  print(" | ".join(["chance".rjust(16)] + [f"{chance(all_tasks[p]):.3f}".rjust(max(len(q) for q in args.pattern))
                                             for p in args.pattern]))
  for r in rows:
    if r["note"]:
      print(f"{r['mixer']} / {r['pattern']} not run: {r['note']}")
  return rows, table


if __name__ == "__main__":
  main()
