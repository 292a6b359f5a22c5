"""Pallas kernels (TPU: Mosaic; GPU: Triton) behind the ops' `impl="pallas"` switch.

`chunked_recurrence(q, k, v, log_decay, *, scale, initial_state, chunk_size, interpret=False,
backend=None, resets=None) -> (o, final_state)` (`resets` bool `[B,T]`: packed sequences) and `supports(q, k, v, log_decay, chunk_size, backend) -> bool`;
see `dispatch` for the math, `chunk_math` for the per-chunk kernel body.
"""
from mixers.kernels.dispatch import chunked_recurrence
from mixers.kernels.dispatch import supports
from mixers.kernels.reference import recurrence_reference
