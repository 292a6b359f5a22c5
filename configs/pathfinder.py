"""Pathfinder (Long Range Arena): do the dashed contours join the two dots? Pixels read as a sequence.

    python -m experiments.train --config configs/pathfinder.py --workdir DIR          # hydra, small, 32x32
    python -m experiments.train --config configs/pathfinder.py:vssd --workdir DIR --config.data.resolution=64

ARG = `mixer[,size]`: any sequence mixer (bidirectional where it can be); size tiny | small | base sets
(d_model, num_layers) to (64, 2) | (128, 4) | (256, 6). As in LRA the image is a sequence of grey-level
tokens (1024 for 32x32); `--config.data.as_tokens=False --config.model.patch_size=4` reads patches instead.
"""
import configs
from experiments.data import data_config

SIZES = {"tiny": (64, 2), "small": (128, 4), "base": (256, 6)}


def get_config(arg=""):
  mixer, size = configs.parse_arg(arg, mixer="hydra", size="small", sizes=SIZES)
  d_model, num_layers = SIZES[size]
  data = data_config.defaults("pathfinder")
  data.resolution = 32
  data.as_tokens = True
  config = configs.base_config(data, mixer=mixer, d_model=d_model, num_layers=num_layers, causal=False)
  config.model.pool = "mean"
  config.batch_size = 32
  config.num_steps = 10000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 500
  config.optimizer.weight_decay = 0.05
  config.eval_every = 1000
  config.eval_batch_size = 64
  config.checkpoint_every = 1000
  return config
