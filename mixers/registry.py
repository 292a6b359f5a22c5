"""Name -> module registry for sequence mixers and channel mixers.

    @register("gla")
    class GLA(nn.Module): ...

    layer = build_mixer("gla", num_heads=4)   # a flax.linen Module
"""
import importlib

_REGISTRY = {"sequence": {}, "channel": {}}


def register(name, kind="sequence"):
  """Class decorator adding a module to the registry under `name`."""
  if kind not in _REGISTRY:
    raise ValueError(f"kind must be one of {sorted(_REGISTRY)}, got {kind!r}")

  def wrap(cls):
    if name in _REGISTRY["sequence"] or name in _REGISTRY["channel"]:
      raise ValueError(f"mixer name {name!r} is already registered")
    _REGISTRY[kind][name] = cls
    return cls

  return wrap


def _load_layers():
  importlib.import_module("mixers.layers")


def names(kind=None):
  """Sorted registered names; kind is None (all), 'sequence' or 'channel'."""
  _load_layers()
  if kind is None:
    return sorted({**_REGISTRY["sequence"], **_REGISTRY["channel"]})
  if kind not in _REGISTRY:
    raise ValueError(f"kind must be one of {sorted(_REGISTRY)}, got {kind!r}")
  return sorted(_REGISTRY[kind])


def get(name, kind=None):
  """The registered module class for `name`; ValueError lists the valid names."""
  _load_layers()
  kinds = [kind] if kind else list(_REGISTRY)
  for k in kinds:
    if name in _REGISTRY.get(k, {}):
      return _REGISTRY[k][name]
  valid = names(kind)
  raise ValueError(f"unknown {kind + ' ' if kind else ''}mixer {name!r}; valid names: {', '.join(valid)}")


def build_mixer(name, **kwargs):
  """Instantiates the registered mixer `name` with `kwargs` (its module attributes)."""
  cls = get(name)
  try:
    return cls(**kwargs)
  except TypeError as e:
    fields = [f for f in getattr(cls, "__dataclass_fields__", {}) if f not in ("parent", "name")]
    raise ValueError(f"bad arguments for mixer {name!r}: {e}; valid arguments: {', '.join(fields)}") from None


def is_causal_capable(name):
  """Whether the mixer `name` supports causal=True (decoding)."""
  cls = get(name)
  return getattr(cls, "supports_causal", True)
