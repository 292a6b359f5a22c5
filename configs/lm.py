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
from experiments.data import data_config

SIZES = {"tiny": (64, 2), "small": (128, 4), "base": (256, 6)}


def get_config(arg=""):
  mixer, size = configs.parse_arg(arg, mixer="gla", size="small", sizes=SIZES)
  configs.require_causal(mixer, "language modelling")
  d_model, num_layers = SIZES[size]
  data = data_config.defaults("bytes")
  data.seq_len = 256
  config = configs.base_config(data, mixer=mixer, d_model=d_model, num_layers=num_layers, causal=True)
  config.model.channel_mixer = "glu"
  config.batch_size = 32
  config.num_steps = 5000
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 200
  config.log_every = 50
  config.eval_every = 1000
  config.eval_steps = 20
  config.eval_batch_size = 32
  config.checkpoint_every = 500
  return config
