"""Documents packed into LM rows with segment ids: every token predicted once, nothing across documents, the packed
loss equal to the documents' own losses, and the byte corpus packed through the data pipeline."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import data
from experiments.data import packing
from experiments.data.targets import IGNORE_INDEX
from experiments.trainer import step as step_lib
from mixers import models
from tests.conftest import random_variables

T = 32


def documents(seed=0, lengths=(1, 2, 5, 30, 33, 12, 70, 64, 9, 100)):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, 50, n).astype(np.int32) for n in lengths]


def test_every_next_token_is_scored_once_and_never_across_documents():
  docs = documents()
  packed = packing.pack(docs, T)
  assert packed.tokens.shape[1] == T + 1
  pairs = []  # (input token, target) pairs that are scored
  for i in range(len(packed)):
    ex = packed[i]
    seg = ex["segment_ids"]
    assert ex["inputs"].shape == ex["targets"].shape == ex["mask"].shape == seg.shape == (T,)
    assert np.array_equal(ex["mask"], seg > 0)
    scored = ex["targets"] != IGNORE_INDEX
    assert not np.any(scored & ~ex["mask"])
    pairs += list(zip(ex["inputs"][scored], ex["targets"][scored]))
  want = [(a, b) for d in docs for a, b in zip(d[:-1], d[1:])]
  assert sorted(pairs) == sorted(want)
  assert len(pairs) == sum(max(len(d) - 1, 0) for d in docs)


def test_packing_fills_rows():
  rng = np.random.default_rng(1)
  docs = [np.ones(n, np.int32) for n in rng.integers(2, 400, 300)]
  packed = packing.pack(docs, 64)
  print(f"efficiency {packed.efficiency:.3f} over {len(packed)} rows")
  assert packed.efficiency >= 0.95
  with pytest.raises(ValueError, match="seq_len"):
    packing.pack(docs, 0)


def test_packed_loss_equals_each_window_alone():
  """The loss summed over a packed batch equals the sum over each window run alone through the same model (a GLA
  layer with short convolutions and an attention layer with rotary positions)."""
  c = models.default_config()
  c.update(dict(kind="lm", mixer="gla,attention", d_model=16, num_layers=2, vocab_size=50))
  c.mixer_kwargs.update(dict(num_heads=2))
  c.per_mixer_kwargs = {"gla": dict(short_conv=True)}
  model = models.build_model(c)
  docs = documents(2, (5, 30, 12, 40, 3))
  packed = packing.pack(docs, T)
  batch = {k: np.stack([packed[i][k] for i in range(len(packed))]) for k in packed[0]}
  batch["valid"] = np.ones(len(packed), bool)
  params = random_variables(model, jnp.asarray(batch["inputs"]))["params"]
  # Each window alone, right-padded into one batch: a causal model's outputs on a row's real tokens do not read
  # the padding after them, and padded targets are not scored.
  windows = [w for d in docs for w in packing.windows(d, T)]
  inputs = np.stack([np.pad(w[:-1], (0, T + 1 - len(w))) for w in windows])
  targets = np.stack([np.pad(w[1:], (0, T + 1 - len(w)), constant_values=IGNORE_INDEX) for w in windows])

  @jax.jit
  def both(p):
    packed = step_lib.batch_metrics(model, p, batch, "lm")
    return packed, step_lib.lm_metrics(model.apply({"params": p}, inputs), targets)

  got, alone = both(params)
  assert int(got["count"]) == int(alone["count"]) == sum(len(w) - 1 for w in windows)
  np.testing.assert_allclose(float(got["loss_sum"]), float(alone["loss_sum"]), rtol=1e-5)


def test_byte_corpus_packs_through_the_pipeline(tmp_path, capsys):
  for i, n in enumerate((300, 40, 1000, 7, 90, 500)):
    (tmp_path / f"f{i}.txt").write_bytes(bytes(range(97, 97 + 20)) * (n // 20) + b"x" * (n % 20))
  config = ml_collections.ConfigDict(dict(name="bytes", corpus=str(tmp_path), corpus_glob="*.txt", seq_len=T,
                                          validation_fraction=0.2, packing=True))
  batch = next(iter(data.get_dataset(config, "train", batch_size=4, seed=0)))
  assert set(batch) >= {"inputs", "targets", "mask", "segment_ids"} and batch["segment_ids"].shape == (4, T)
  assert "real tokens" in capsys.readouterr().out
  x, kwargs = step_lib.model_inputs(batch)
  assert x is batch["inputs"] and kwargs["segment_ids"] is batch["segment_ids"]


def test_packing_benchmark_suite_at_tiny_sizes(monkeypatch):
  from experiments import benchmark  # pylint: disable=import-outside-toplevel
  from experiments.benchmarks import common, packing as suite  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(suite, "LENGTHS", (64,))
  monkeypatch.setattr(suite, "MEAN_DOCUMENT", 8)
  every = suite.ops_under_test
  monkeypatch.setattr(suite, "ops_under_test", lambda n: {k: f for k, f in every(n).items()
                                                          if k in ("ssd (mamba2)", "long_conv")})
  monkeypatch.setattr(common, "matmul_tflops", lambda: 0.125)
  rows, _ = benchmark.main(["--suite", "packing", "--max_len", "64", "--repeats", "1"])
  assert [r["op"] for r in rows] == ["ssd (mamba2)", "long_conv"]
  assert all(r["segments"] > 1 and r["packed/unpacked"] > 0 for r in rows)


def test_ragged_prompts_decode_as_if_alone():
  """Prompts of 3 and 7 tokens in one batch (read as packed rows: padding in front is its own segment), then 6
  greedy tokens each: the short prompt's row continues it exactly as when generated alone."""
  from experiments import generate  # pylint: disable=import-outside-toplevel
  c = models.default_config()
  c.update(dict(kind="lm", mixer="gla,attention", d_model=16, num_layers=2, vocab_size=50))
  c.mixer_kwargs.update(dict(num_heads=2))
  c.per_mixer_kwargs = {"gla": dict(short_conv=True)}
  model = models.build_model(c)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), params)
  lengths = np.array([3, 7])
  prompt = np.random.default_rng(0).integers(1, 50, (2, 7)).astype(np.int32)
  batched, _ = generate.generate(model, params, prompt, 6, rng=jax.random.key(2), temperature=0, lengths=lengths)
  alone, _ = generate.generate(model, params, prompt[:1, :3], 6, rng=jax.random.key(2), temperature=0)
  np.testing.assert_array_equal(batched[0], alone[0])  # the short prompt, read behind padding in the batch
  with pytest.raises(ValueError, match="lengths must be"):
    generate.generate(model, params, prompt, 2, rng=jax.random.key(2), lengths=[3, 8])
