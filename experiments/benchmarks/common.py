"""Timing, memory and table helpers shared by the benchmark suites."""
import statistics
import time

import jax
import jax.numpy as jnp


def block(tree):
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


def time_fn(fn, *args, repeats=5, min_time=0.0):
  """Median wall seconds of `fn(*args)` after one warm-up (compile) call, blocking on the results."""
  block(fn(*args))
  times = []
  start_all = time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - start_all < min_time and len(times) < 100):
    t0 = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def peak_bytes(fn, *args):
  """Peak bytes XLA plans for one call of jit(fn): arguments + outputs + temporaries (None if unknown). A jitted fn
  is lowered as it is (wrapping it in another jit would compile a second program)."""
  try:
    stats = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args).compile().memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats is None:
    return None
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - getattr(stats, "alias_size_in_bytes", 0))


def matmul_tflops(n=2048, dtype=jnp.float32, repeats=5):
  """Measured matmul throughput of the default device in TFLOP/s (an n x n x n product)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(jnp.matmul)
  return 2 * n ** 3 / time_fn(f, a, b, repeats=repeats) / 1e12


def fwd_bwd(f):
  """A jitted function computing f's outputs and the gradients of sum(outputs * 1) w.r.t. all arguments."""
  def loss(*args):
    out = f(*args)
    leaves = jax.tree.leaves(out)
    return sum(jnp.sum(o.astype(jnp.float32)) for o in leaves)
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(_arity(f)))))


def _arity(f):
  import inspect
  return len([p for p in inspect.signature(f).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])


def fmt(v):
  if isinstance(v, float):
    if v == 0 or 1e-3 <= abs(v) < 1e5:
      return f"{v:.4g}"
    return f"{v:.3e}"
  return "-" if v is None else str(v)


def print_table(rows, title=None):
  """Prints a list of dicts as an aligned text table (columns in first-seen order)."""
  if title:
    print(f"\n## {title}")
  if not rows:
    print("(no rows)")
    return
  cols = []
  for r in rows:
    cols += [c for c in r if c not in cols]
  cells = [[fmt(r.get(c)) for c in cols] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
  print(" | ".join(c.rjust(w) for c, w in zip(cols, widths)))
  print("-+-".join("-" * w for w in widths))
  for row in cells:
    print(" | ".join(v.rjust(w) for v, w in zip(row, widths)))
