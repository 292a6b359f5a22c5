"""The attention-pattern tasks (experiments/patterns.py), the JRT experiment (experiments/jrt.py) and the
attention_patterns benchmark suite, at minimal sizes."""
import numpy as np
import pytest

from experiments import benchmark, jrt, patterns
from experiments.benchmarks import attention_patterns, common


def _answers(b):
  return b.targets != patterns.IGNORE


def test_tasks_mean_what_they_say():
  rng = np.random.default_rng(0)
  b = patterns.mqar(rng, 8, 24, 3, 16)
  for tok, tgt in zip(b.tokens, b.targets):
    pairs = dict(zip(tok[0:6:2], tok[1:6:2]))
    where = np.flatnonzero(tgt != patterns.IGNORE)
    assert len(where) == 3 and all(tgt[i] == pairs[tok[i]] for i in where)

  b = patterns.appears_elsewhere(rng, 8, 20, 29)
  for tok, tgt in zip(b.tokens, b.targets):
    assert all(tgt[t] == (list(tok).count(tok[t]) > 1) for t in range(20))

  b = patterns.causal_membership(rng, 16, 12, 24)
  src = b.source[..., 0]
  assert all(len(set(s)) == 12 for s in src)
  for s, tok, tgt in zip(src, b.tokens, b.targets):
    for t in range(12):
      assert tgt[t] == (tok[t] in s[:t + 1])
      if not tgt[t] and t < 11:
        assert tok[t] in s[t + 1:]  # the negatives come from the source's future
  assert 0.3 < b.targets.mean() < 0.7

  b = patterns.cross_lookup(rng, 8, 10, 20, 64)
  assert b.source.shape == (8, 20, 2)
  for s, tok, tgt in zip(b.source, b.tokens, b.targets):
    lookup = dict(map(tuple, s))
    assert len(lookup) == 20 and all(lookup[k] == v for k, v in zip(tok, tgt))


def test_selective_mqar_layouts():
  layout = jrt.Layout(pairs=5, queries=2, vocab=20)
  n = layout.context_len()
  batches = {c: jrt.selective_mqar(np.random.default_rng(3), 4, layout, c) for c in jrt.CONDITIONS}
  for c, b in batches.items():
    assert b.tokens.shape == (4, layout.seq_len(c)) and _answers(b).sum(1).tolist() == [2] * 4
    assert (b.targets[:, -2:] != patterns.IGNORE).all()
  base = batches["causal"]
  np.testing.assert_array_equal(batches["prefix"].tokens, base.tokens)
  np.testing.assert_array_equal(batches["jrt_prompt"].tokens, np.concatenate([base.tokens[:, :n], base.tokens], 1))
  for tok, tgt in zip(base.tokens, base.targets):
    pairs = dict(zip(tok[0:10:2], tok[1:10:2]))
    assert tok[10] == jrt.SEP and tok[13] == jrt.SEP and set(tok[11:13]) == set(tok[-2:])
    assert [pairs[k] for k in tok[-2:]] == list(tgt[-2:])
  qf = batches["question_first"].tokens
  np.testing.assert_array_equal(qf[:, 4:], base.tokens[:, list(range(10)) + [14, 15]])
  with pytest.raises(ValueError, match="queries"):
    jrt.selective_mqar(np.random.default_rng(0), 1, jrt.Layout(pairs=2, queries=3, vocab=20), "causal")


def test_patterns_quick_table_and_a_learnable_cell():
  rows, table = patterns.main(["--quick", "--steps", "80", "--mixer", "attention", "--pattern", "cross_noncausal",
                               "--pattern", "self_noncausal"])
  assert [(r["mixer"], r["pattern"]) for r in rows] == [("attention", "cross_noncausal"),
                                                        ("attention", "self_noncausal")]
  header, rule, line = table.splitlines()
  assert header.split() == ["mixer", "|", "cross_noncausal", "|", "self_noncausal"]
  assert line.split()[0] == "attention" and len(line.split("|")) == 3 and set(rule) == {"-", "+"}
  assert all(0.0 <= r["accuracy"] <= 1.0 and r["note"] == "" for r in rows)
  # Softmax cross attention finds a key among 16 pairs within 80 steps; chance is 1/32.
  assert rows[0]["accuracy"] > 0.3, rows[0]


def test_a_mixer_that_pairs_positions_refuses_a_longer_source():
  task = patterns.tasks(16)["cross_noncausal_long"]
  gla = patterns.PatternNet(mixer="gla", vocab=task.vocab, causal=False, cross=True, layers=1)
  assert "context" in patterns.unsupported(gla, task)
  la = patterns.PatternNet(mixer="linear_attention", vocab=task.vocab, causal=False, cross=True, layers=1)
  assert patterns.unsupported(la, task) is None


def test_jrt_runs_prefix_and_twice():
  rows, table = jrt.main(["--quick", "--steps", "3", "--pairs", "4", "--queries", "2", "--vocab", "16",
                          "--seeds", "0", "--d_model", "32", "--batch_size", "8", "--mixer", "linear_attention", "--reference", "",
                          "--condition", "prefix", "--condition", "jrt_prompt"])
  assert [(r["mixer"], r["condition"]) for r in rows] == [("linear_attention", "prefix"),
                                                          ("linear_attention", "jrt_prompt")]
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
  assert len(table.splitlines()) == 3


def test_benchmark_suite_rows(monkeypatch):
  monkeypatch.setattr(attention_patterns, "LENGTHS", (32,))
  monkeypatch.setattr(attention_patterns, "PATTERNS", {k: attention_patterns.PATTERNS[k]
                                                       for k in ("self_causal", "cross_noncausal_2x")})
  monkeypatch.setattr(common, "matmul_tflops", lambda: 0.125)
  rows, _ = benchmark.main(["--suite", "attention_patterns", "--quick", "--max_len", "32", "--d_model", "64",
                            "--repeats", "1", "--mixer", "linear_attention"])
  assert [(r["mixer"], r["pattern"], r["T"], r["Tk"]) for r in rows] == [
      ("linear_attention", "self_causal", 32, 32), ("linear_attention", "cross_noncausal_2x", 32, 64)]
  for r in rows:
    assert r["fwd_s"] > 0 and r["fwdbwd_s"] > 0 and r["fwdbwd_MiB"] > r["fwd_MiB"] > 0, r
  assert rows[0]["vs_self_causal"] == 1.0 and rows[1]["vs_self_causal"] > 0
  # gla's decays pair target t with source t: a longer source is refused before anything is compiled.
  opts = dict(dtype=np.float32, repeats=1, time_budget=5.0, max_bytes=2 ** 30)
  refused, = attention_patterns.sweep("gla", "cross_noncausal_2x", [32, 64], 64, opts)
  assert refused["note"].startswith("refused: ") and "context" in refused["note"] and "fwd_s" not in refused
