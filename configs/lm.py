"""Byte-level language modelling on local text (default: the Python standard library's sources).

    python -m experiments.train --config configs/lm.py --workdir DIR                  # gla, small
    python -m experiments.train --config configs/lm.py:mamba2,base --workdir DIR
    python -m experiments.train --config configs/lm.py:gla+attention --workdir DIR \
        --config.data.corpus=/path/to/texts --config.data.corpus_glob='*.txt'
    python -m experiments.train --config configs/lm.py --workdir DIR --config.data.name=lm1b   # prepared lm1b

ARG = `mixer[,size]`: any causal mixer (hybrids as `gla+attention`); size tiny | small | base sets
(d_model, num_layers) to (64, 2) | (128, 4) | (256, 6). Sequences of 256 bytes, GLU channel mixer.
Sample from the result with `python -m experiments.generate --workdir DIR --prompt "def "`.
"""
import configs

SIZES = {"tiny": (64, 2), "small": (128, 4), "base": (256, 6)}

# The data packs documents into rows (data.packing). m2's packed long convolution needs, under jit, the most
# segments a row holds (runs of equal segment ids, the padding run included), at that many plain convolutions'
# cost; a row with more gives NaN. The byte corpus's rows of 256 bytes hold at most 14 (train) and 4 (validation),
# nearly all one; raise it for longer rows or another corpus (--config.model.per_mixer_kwargs.m2.max_segments=N).
MIXER_KWARGS = {"m2": dict(max_segments=16)}


def get_config(arg=""):
  mixer, size = configs.parse_arg(arg, mixer="gla", size="small", sizes=SIZES)
  d_model, num_layers = SIZES[size]
  return configs.training_config(
      data=dict(name="bytes", seq_len=256),
      model=dict(mixer=mixer, d_model=d_model, num_layers=num_layers, channel_mixer="glu",
                 per_mixer_kwargs=MIXER_KWARGS),
      optimizer=dict(learning_rate=2e-3, warmup_steps=200),
      batch_size=32, num_steps=5000, log_every=50, eval_every=1000, eval_steps=20, eval_batch_size=32,
      checkpoint_every=500)
