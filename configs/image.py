"""Image classification on patches (LRA image and beyond): cifar10 by default, prepared in data_dir with TFDS.

    python -m experiments.train --config configs/image.py --workdir DIR             # vssd, small, CIFAR-10
    python -m experiments.train --config configs/image.py:hydra,base --workdir DIR --config.data.name=mnist \
        --config.model.patch_size=4
    python -m experiments.train --config configs/image.py:gla,tiny,pool=last_token,data=pathfinder --workdir DIR

ARG = `mixer[,size][,pool=POOL][,data=NAME]`: any sequence mixer; n-D mixers (vssd, lightnet) see the patch grid
(with mean pooling only: a class token is one token more than the grid). Size tiny | small | base sets
(d_model, num_layers) to (64, 2) | (128, 6) | (256, 8). pool: mean (default) | cls (a class token before the
patches) | last_token (a class token after them; `configs/image_causal.py` runs causal mixers so). data: cifar10
(default) or another image dataset (`IMAGE_DATASETS`; pathfinder is generated locally, 32x32). 4x4 patches, MD-TPE
positions. Prepare CIFAR-10 once with `tfds build cifar10 --data_dir DIR` (or any prepared copy) and point
`--config.data.data_dir` at it.
"""
import configs
from experiments.data import catalog
from mixers.models import classifier

SIZES = {"tiny": (64, 2), "small": (128, 6), "base": (256, 8)}
IMAGE_DATASETS = ("pathfinder",) + tuple(n for n, (kind, _) in catalog.KNOWN.items() if kind == "image_classification")


def parse_arg(arg, *, mixer="vssd", size="small", pool="mean", data="cifar10"):
  """(mixer, size, pool, data) from ARG (module docstring): the `pool=` and `data=` items are read here, the rest
  by `configs.parse_arg`; ValueError names an unknown pool or dataset and the valid ones."""
  extra = {"pool": pool, "data": data}
  rest = []
  for part in (p.strip() for p in (arg or "").split(",") if p.strip()):
    key, eq, value = (s.strip() for s in part.partition("="))
    if eq and key not in ("mixer", "size", *extra):
      raise ValueError(f"config argument {arg!r}: unknown key {key!r}; valid keys: mixer, size, pool, data")
    if eq and key in extra:
      extra[key] = value
    else:
      rest.append(part)
  mixer, size = configs.parse_arg(",".join(rest), mixer=mixer, size=size, sizes=SIZES)
  if extra["pool"] not in classifier.POOLS:
    raise ValueError(f"config argument {arg!r}: unknown pool {extra['pool']!r}; valid pools: "
                     f"{', '.join(classifier.POOLS)}")
  if extra["data"] not in IMAGE_DATASETS:
    raise ValueError(f"config argument {arg!r}: unknown image dataset {extra['data']!r}; valid datasets: "
                     f"{', '.join(IMAGE_DATASETS)}")
  return mixer, size, extra["pool"], extra["data"]


def get_config(arg=""):
  return make_config(*parse_arg(arg))


def make_config(mixer, size, pool, data):
  """The config of `mixer` (a name, or names joined by commas) at `size` with `pool` on dataset `data`."""
  d_model, num_layers = SIZES[size]
  return configs.training_config(
      data=dict(name=data),
      model=dict(mixer=mixer, d_model=d_model, num_layers=num_layers, patch_size=4, positional="md_tpe",
                 pool=pool),
      optimizer=dict(learning_rate=1e-3, warmup_steps=1000, weight_decay=0.05),
      batch_size=64, num_steps=20000, eval_every=2000, eval_batch_size=128, checkpoint_every=2000)
