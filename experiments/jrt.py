r"""Just Read Twice (Arora et al., 2024, arXiv 2407.05483) at toy scale: selective recall when the question comes last.

  python -m experiments.jrt --quick          # linear_attention, 2 seeds (+ attention as the reference): ~11 CPU min
  python -m experiments.jrt --quick --mixer linear_attention --mixer gla
  python -m experiments.jrt --steps 1500 --pairs 24 --seeds 0,1,2

The task is MQAR where only some of the stored pairs are asked for, and the question is part of the context:

  data_first      k1 v1 k2 v2 ... kP vP  SEP  q1 ... qQ  SEP  |  q'1 ... q'Q
  question_first  SEP  q1 ... qQ  SEP  k1 v1 ... kP vP        |  q'1 ... q'Q

Keys are distinct in [1, V/2), values in [V/2, V), SEP = 0; the Q queried keys q are distinct keys of the context,
and after the context (the bar) they are asked again in another order q'; the target at q'_j is its value (the only
positions scored). A causal recurrent mixer reading `data_first` must keep all P pairs in its fixed-size state,
because it learns which Q matter only after the pairs have gone by; reading `question_first` it can keep only those.
The conditions, all with the same model and budget:

  causal          data_first, causal
  question_first  question_first, causal (the order a causal model prefers)
  prefix          data_first, Prefix-LM: prefix_len = context length, so within the context every token sees every
                  other (JRT-RNN's prefix linear attention); the answers stay causal
  jrt_prompt      data_first with the context written twice (JRT-Prompt), causal

The model is `experiments.patterns.PatternNet` (two layers: causal short convolution, mixer, GLU MLP) trained with
AdamW; accuracy over the answer positions of fresh examples, mean and spread over seeds.
"""
import argparse
import dataclasses
import statistics
import sys

import jax
import numpy as np

from experiments import patterns
from mixers import registry

SEP = 0
CONDITIONS = ("causal", "question_first", "prefix", "jrt_prompt")


@dataclasses.dataclass(frozen=True)
class Layout:
  """The selective-MQAR sizes: pairs P, queried keys Q, vocabulary V."""
  pairs: int = 16
  queries: int = 4
  vocab: int = 64

  def context_len(self):
    return 2 * self.pairs + self.queries + 2

  def seq_len(self, condition):
    reads = 2 if condition == "jrt_prompt" else 1
    return reads * self.context_len() + self.queries


def selective_mqar(rng, batch, layout, condition):
  """Batch for `condition` (see the module docstring); targets only at the answer positions."""
  p, q, v = layout.pairs, layout.queries, layout.vocab
  if condition not in CONDITIONS:
    raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
  if not 1 <= q <= p or p > v // 2 - 1:
    raise ValueError(f"pairs={p}, queries={q} do not fit vocab={v}: need 1 <= queries <= pairs <= vocab/2 - 1")
  n_ctx, t = layout.context_len(), layout.seq_len(condition)
  tokens = np.zeros((batch, t), np.int64)
  targets = np.full((batch, t), patterns.IGNORE)
  for b in range(batch):
    keys = rng.choice(np.arange(1, v // 2), p, replace=False)
    values = rng.choice(np.arange(v // 2, v), p, replace=False)
    asked = rng.choice(p, q, replace=False)
    pairs = np.stack([keys, values], 1).reshape(-1)
    question = np.concatenate([[SEP], keys[asked], [SEP]])
    context = np.concatenate([question, pairs] if condition == "question_first" else [pairs, question])
    again = rng.permutation(asked)
    reads = 2 if condition == "jrt_prompt" else 1
    tokens[b] = np.concatenate([np.tile(context, reads), keys[again]])
    targets[b, reads * n_ctx:] = values[again]
  return patterns.Batch(tokens.astype(np.int32), targets.astype(np.int32))


def run_one(mixer, condition, layout, *, seed, steps, d_model, batch_size, lr):
  """Answer accuracy of `mixer` under `condition` after `steps` steps, and the wall seconds."""
  model = patterns.PatternNet(mixer=mixer, vocab=layout.vocab, causal=True, cross=False, d_model=d_model, layers=2)
  prefix = None
  if condition == "prefix":
    prefix = lambda b: np.full((b.tokens.shape[0],), layout.context_len(), np.int32)
  make = lambda rng, n: selective_mqar(rng, n, layout, condition)
  return patterns.train(model, make, steps=steps, batch_size=batch_size, lr=lr, seed=seed, prefix_len=prefix)


def summarize(rows, mixers_, conditions):
  """Text table: per mixer, per condition, mean accuracy over seeds (min..max)."""
  width = 20
  lines = [" | ".join(["mixer".rjust(16)] + [c.rjust(width) for c in conditions])]
  lines.append("-+-".join(["-" * 16] + ["-" * width] * len(conditions)))
  for m in mixers_:
    cells = []
    for c in conditions:
      accs = [r["accuracy"] for r in rows if r["mixer"] == m and r["condition"] == c]
      if not accs:
        cells.append("-".rjust(width))
        continue
      text = f"{statistics.mean(accs):.3f}" + (f" ({min(accs):.2f}..{max(accs):.2f})" if len(accs) > 1 else "")
      cells.append(text.rjust(width))
    lines.append(" | ".join([m.rjust(16)] + cells))
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mixer", action="append", help="recurrent mixers (default: linear_attention, gla)")
  parser.add_argument("--reference", default="attention", help="mixer run once per condition as the reference "
                      "('' for none)")
  parser.add_argument("--condition", action="append", choices=CONDITIONS, help="(repeatable; default: all)")
  parser.add_argument("--pairs", type=int, default=16)
  parser.add_argument("--queries", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=64)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--quick", action="store_true", help="400 steps, linear_attention, the conditions causal, prefix "
                      "and jrt_prompt (unless given), XLA optimisations off (faster compiles)")
  args = parser.parse_args(argv)
  given = set(a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv))
  if args.quick and "--steps" not in given:
    args.steps = 400
  args.mixer = args.mixer or (["linear_attention"] if args.quick else ["linear_attention", "gla"])
  args.condition = args.condition or (["causal", "prefix", "jrt_prompt"] if args.quick else list(CONDITIONS))
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  unknown = [m for m in args.mixer + ([args.reference] if args.reference else [])
             if m not in registry.names("sequence")]
  if unknown:
    parser.error(f"unknown mixer(s) {unknown}; registered: {registry.names('sequence')}")
  return args


def main(argv=None):
  """Runs every (mixer, condition, seed); prints the rows and the summary table; returns (rows, table)."""
  args = parse_args(argv)
  if args.quick:  # tiny programs: XLA's optimisation passes cost more compile time than they save
    jax.config.update("jax_disable_most_optimizations", True)
  layout = Layout(args.pairs, args.queries, args.vocab)
  runs = [(m, s) for m in args.mixer for s in args.seeds]
  if args.reference:
    runs += [(args.reference, args.seeds[0])]
  rows = []
  for mixer, seed in runs:
    for condition in args.condition:
      acc, secs = run_one(mixer, condition, layout, seed=seed, steps=args.steps, d_model=args.d_model,
                          batch_size=args.batch_size, lr=args.lr)
      rows.append({"mixer": mixer, "condition": condition, "seed": seed, "accuracy": acc, "seconds": secs})
      print(f"  {mixer:>16} {condition:<15} seed {seed}: accuracy {acc:.3f} ({secs:.1f} s)", flush=True)
  names = list(dict.fromkeys(m for m, _ in runs))
  table = summarize(rows, names, args.condition)
  print(f"\n## answer accuracy after {args.steps} steps: P={layout.pairs} pairs, Q={layout.queries} asked, "
        f"V={layout.vocab}, d_model={args.d_model}, batch {args.batch_size}, seeds {args.seeds} "
        f"(reference: seed {args.seeds[0]} only); chance {2 / layout.vocab:.3f}\n{table}")
  return rows, table


if __name__ == "__main__":
  main()
