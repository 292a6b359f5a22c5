"""Image classification on patches (LRA image and beyond): cifar10 by default, prepared in data_dir with TFDS.

    python -m experiments.train --config configs/image.py --workdir DIR             # vssd, small, CIFAR-10
    python -m experiments.train --config configs/image.py:hydra,base --workdir DIR --config.data.name=mnist \
        --config.model.patch_size=4

ARG = `mixer[,size]`: any sequence mixer; n-D mixers (vssd, lightnet) see the patch grid. Size tiny | small |
base sets (d_model, num_layers) to (64, 2) | (128, 6) | (256, 8). 4x4 patches, MD-TPE positions, mean pooling.
Prepare CIFAR-10 once with `tfds build cifar10 --data_dir DIR` (or any prepared copy) and point
`--config.data.data_dir` at it.
"""
import configs

SIZES = {"tiny": (64, 2), "small": (128, 6), "base": (256, 8)}


def get_config(arg=""):
  mixer, size = configs.parse_arg(arg, mixer="vssd", size="small", sizes=SIZES)
  d_model, num_layers = SIZES[size]
  return configs.training_config(
      data=dict(name="cifar10"),
      model=dict(mixer=mixer, d_model=d_model, num_layers=num_layers, patch_size=4, positional="md_tpe",
                 pool="mean"),
      optimizer=dict(learning_rate=1e-3, warmup_steps=1000, weight_decay=0.05),
      batch_size=64, num_steps=20000, eval_every=2000, eval_batch_size=128, checkpoint_every=2000)
