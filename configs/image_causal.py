"""Causal image classification: a causal mixer reads the patches in raster order, then a class token after them.

    python -m experiments.train --config configs/image_causal.py --workdir DIR      # gla, small, CIFAR-10
    python -m experiments.train --config configs/image_causal.py:mamba2,tiny,data=pathfinder --workdir DIR

The grid: every causal-capable sequence mixer (`mixers()`), one run each,

    for m in $(python -c "from configs import image_causal; print(*image_causal.mixers())"); do
      python -m experiments.train --config configs/image_causal.py:$m,tiny --workdir workdirs/image_causal/$m
    done

and on the locally generated Pathfinder-32 (nothing to prepare) with `:$m,tiny,data=pathfinder` instead.

ARG = `mixer[,size][,pool=POOL][,data=NAME]` as in `configs/image.py` (default mixer gla), with causal=True and
pool last_token: the class token comes after the last patch, so in a causal backbone it is the one position that
sees the whole image (`pool=cls` puts it first, where it sees only itself; `pool=mean` averages the patches, each
of which sees the patches before it). Positions are learned, added to the patches only: MD-TPE would mix the
patches bidirectionally before the causal backbone. LightNet reads the patches as a 1-D sequence (no grid).
"""
from configs import image
from mixers import registry


def mixers():
  """Every registered sequence mixer that supports causal=True, sorted."""
  return [name for name in registry.names("sequence") if registry.is_causal_capable(name)]


def get_config(arg=""):
  config = image.make_config(*image.parse_arg(arg, mixer="gla", pool="last_token"))
  config.model.causal = True
  config.model.positional = "learned"
  config.model.per_mixer_kwargs = {"lightnet": {"grid_shape": None}}
  return config
