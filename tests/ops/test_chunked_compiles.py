"""Regression: the chunked recurrence is right in every fresh compile, not only in most.

One chunk, per-key-channel decay and no initial state used to put the intra-chunk score reduction and the
product of q with the (zero) state into one YNN fusion on XLA CPU (jaxlib 0.10.2), which gave outputs off by up
to 1e35 in about one compile in five, while each compiled function was self-consistent.
"""
import jax
import numpy as np

from mixers.ops.recurrence import gated_linear_recurrence

COMPILES = 16


def test_single_chunk_channel_decay_every_compile_matches_reference():
  b, t, h, k, v = 18, 6, 2, 12, 20
  ks = jax.random.split(jax.random.key(0), 4)
  q, kk = (jax.random.normal(x, (b, t, h, k)) for x in ks[:2])
  vv = jax.random.normal(ks[2], (b, t, h, v))
  g = -jax.random.uniform(ks[3], (b, t, h, k))
  o_ref = np.asarray(jax.jit(lambda *a: gated_linear_recurrence(*a, impl="reference")[0])(q, kk, vv, g))
  bad = []
  for i in range(COMPILES):
    # A fresh lambda per iteration: a fresh trace and compile, not a cache hit. Only o: the program that failed.
    f = jax.jit(lambda q, k, v, g, i=i: gated_linear_recurrence(q, k, v, g, chunk_size=t, impl="chunked")[0])
    err = float(np.max(np.abs(np.asarray(f(q, kk, vv, g)) - o_ref)))
    if not err < 1e-4:
      bad.append((i, err))
  assert not bad, f"{len(bad)} of {COMPILES} compiles wrong (compile, max abs error): {bad}"
