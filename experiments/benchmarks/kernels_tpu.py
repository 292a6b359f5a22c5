r"""Pallas chunked-recurrence kernels on a TPU, beside the chunked XLA form and Pallas flash attention.

  python -m experiments.benchmark --suite kernels_tpu --max_len 32768 --repeats 10

The TPU twin of `kernels_gpu`: B=1, H=16, K=V=128, bf16, T = 2048..max_len (doubling), forward and
forward+backward, scalar and per-key-channel decays. The kernel runs in the chunk `impl="auto"` picks for the
local generation (`kernel_chunk_size`: 64 widened up to the MXU's 128 or 256 rows). Columns: milliseconds
per call, the kernel's speed-up over each other form, `rel_err` against the chunked XLA form, `grid_steps` of the
forward's kernel and `x_fewer_steps`: a kernel taking one 64-token chunk per grid step (B*H*T/64 steps) over
`grid_steps`. Without a TPU the suite returns one row saying so.
"""
import functools

from jax.experimental.pallas.ops.tpu import flash_attention

from experiments.benchmarks import kernels_gpu
from mixers.kernels.introspect import grid_steps
from mixers.ops.recurrence import kernel_chunk_size


def _flash(q, k, v):
  swap = lambda x: x.swapaxes(1, 2)  # [B,H,T,D]
  return swap(flash_attention.flash_attention(swap(q), swap(k), swap(v), causal=True,
                                              sm_scale=kernels_gpu.DK**-0.5))


def run(args):
  note = kernels_gpu.unavailable("kernels_tpu", backend="tpu")
  if note:
    return note
  repeats = max(args.repeats, 3)
  rows = []
  for decay in kernels_gpu.DECAYS:
    for t in [t for t in kernels_gpu.LENGTHS if t <= args.max_len]:
      inputs = kernels_gpu.make_inputs(t, decay)
      chunk = kernel_chunk_size("tpu", t, kernels_gpu.CHUNK)
      pallas = functools.partial(kernels_gpu.pallas, backend="tpu", chunk_size=chunk)
      steps = grid_steps(pallas, *inputs)
      for mode, wrap in kernels_gpu.modes():
        row = {"decay": decay, "T": t, "mode": mode, "chunk": chunk, "grid_steps": steps,
               "x_fewer_steps": kernels_gpu.B * kernels_gpu.H * t / 64 / steps}
        others = {"pallas_flash": kernels_gpu.timer(wrap(_flash), *inputs[:3], repeats=repeats)}
        rows.append(kernels_gpu.measure(row, wrap(pallas), wrap(kernels_gpu.chunked), inputs, others,
                                        repeats))
  return rows
