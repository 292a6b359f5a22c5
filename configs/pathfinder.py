"""Pathfinder (Long Range Arena): do the dashed contours join the two dots? Pixels read as a sequence.

    python -m experiments.train --config configs/pathfinder.py --workdir DIR          # hydra, small, 32x32
    python -m experiments.train --config configs/pathfinder.py:vssd --workdir DIR --config.data.resolution=64

ARG = `mixer[,size]`: any sequence mixer (bidirectional where it can be); size tiny | small | base sets
(d_model, num_layers) to (64, 2) | (128, 4) | (256, 6). As in LRA the image is a sequence of grey-level
tokens (1024 for 32x32); `--config.data.as_tokens=False --config.model.patch_size=4` reads patches instead.
"""
import configs

SIZES = {"tiny": (64, 2), "small": (128, 4), "base": (256, 6)}


def get_config(arg=""):
  mixer, size = configs.parse_arg(arg, mixer="hydra", size="small", sizes=SIZES)
  d_model, num_layers = SIZES[size]
  return configs.training_config(
      data=dict(name="pathfinder", resolution=32, as_tokens=True),
      model=dict(mixer=mixer, d_model=d_model, num_layers=num_layers, pool="mean"),
      optimizer=dict(learning_rate=1e-3, warmup_steps=500, weight_decay=0.05),
      batch_size=32, num_steps=10000, eval_every=1000, eval_batch_size=64, checkpoint_every=1000)
