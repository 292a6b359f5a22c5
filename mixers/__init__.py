"""mixers: sub-quadratic sequence mixers in JAX/Flax (linear attention, SSD, Hydra, Monarch, LightNet)."""
from mixers import ops
from mixers.registry import build_mixer

__version__ = "0.1.0"
