"""ListOps (Long Range Arena): the value (0-9) of a nested MIN / MAX / MED / SM expression of up to 2K tokens.

    python -m experiments.train --config configs/listops.py --workdir DIR            # hydra, small
    python -m experiments.train --config configs/listops.py:gla,base --workdir DIR

ARG = `mixer[,size]`: any sequence mixer, run bidirectionally where it can be (causal ones run causally);
size tiny | small | base sets (d_model, num_layers) to (64, 2) | (128, 4) | (256, 6). Mean pooling over real
tokens, 10 classes; LRA's lengths 500..2000, padded to 2048.
"""
import configs

SIZES = {"tiny": (64, 2), "small": (128, 4), "base": (256, 6)}


def get_config(arg=""):
  mixer, size = configs.parse_arg(arg, mixer="hydra", size="small", sizes=SIZES)
  d_model, num_layers = SIZES[size]
  return configs.training_config(
      data=dict(name="listops"),
      model=dict(mixer=mixer, d_model=d_model, num_layers=num_layers, pool="mean"),
      optimizer=dict(learning_rate=1e-3, warmup_steps=500, weight_decay=0.05),
      batch_size=32, num_steps=5000, eval_every=1000, eval_batch_size=64, checkpoint_every=1000)
