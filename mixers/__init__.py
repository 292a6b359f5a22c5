"""mixers: sub-quadratic sequence mixers in JAX/Flax (linear attention, SSD, Hydra, Monarch, LightNet)."""
from mixers import ops
from mixers.registry import build_mixer

__version__ = "0.1.0"


def __getattr__(name):
  # Flax-dependent subpackages load on first use, so `import mixers` stays light for ops-only users.
  if name in ("layers", "models", "sharding", "kernels", "registry", "nnx"):
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module(f"mixers.{name}")
  raise AttributeError(f"module 'mixers' has no attribute {name!r}")
