"""Name -> module registry for sequence mixers and channel mixers.

    @register("gla")
    class GLA(nn.Module): ...

    layer = build_mixer("gla", num_heads=4)   # a flax.linen Module

A registered class may declare `aliases = {"other_name": "field"}` (names other libraries use for the same
argument, e.g. mamba_ssm's `d_state` for `state_dim`); its constructor then accepts them, and an unknown keyword is
a TypeError that lists the valid ones.
"""
import difflib
import functools
import importlib

_REGISTRY = {"sequence": {}, "channel": {}}


def fields(cls):
  """The constructor arguments of a module class (its dataclass fields, less flax's parent and name)."""
  return [f for f in getattr(cls, "__dataclass_fields__", {}) if f not in ("parent", "name")]


def argument_error(cls, unknown):
  """TypeError for unknown keyword(s) of `cls`, listing the valid arguments, accepted aliases and close matches."""
  valid = fields(cls)
  aliases = getattr(cls, "aliases", {})
  close = sorted({m for k in unknown for m in difflib.get_close_matches(k, valid + list(aliases), n=2)})
  hint = f" (did you mean {', '.join(close)}?)" if close else ""
  alias_text = f"; aliases: {', '.join(f'{a}={f}' for a, f in sorted(aliases.items()))}" if aliases else ""
  return TypeError(f"{cls.__name__} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}{hint}; "
                   f"valid arguments: {', '.join(valid)}{alias_text}")


def resolve_aliases(cls, kwargs):
  """kwargs with `cls.aliases` renamed to their fields; TypeError for unknown keywords or an alias given twice."""
  aliases = getattr(cls, "aliases", {})
  out, given_as = {}, {}
  for key, value in kwargs.items():
    field = aliases.get(key, key)
    if field in out:
      first, second = sorted([given_as[field], key], key=lambda k: k == field)
      raise TypeError(f"{cls.__name__}: {first!r} and {second!r} name the same argument; give one")
    out[field], given_as[field] = value, key
  valid = set(fields(cls)) | {"parent", "name"}
  unknown = [k for k in kwargs if aliases.get(k, k) not in valid]
  if unknown:
    raise argument_error(cls, unknown)
  return out


def _checked_init(cls):
  init = cls.__init__

  @functools.wraps(init)
  def __init__(self, *args, **kwargs):
    init(self, *args, **resolve_aliases(cls, kwargs))

  cls.__init__ = __init__
  return cls


def register(name, kind="sequence"):
  """Class decorator adding a module to the registry under `name` (its constructor then accepts `aliases` and
  names the valid arguments on a wrong keyword)."""
  if kind not in _REGISTRY:
    raise ValueError(f"kind must be one of {sorted(_REGISTRY)}, got {kind!r}")

  def wrap(cls):
    if name in _REGISTRY["sequence"] or name in _REGISTRY["channel"]:
      raise ValueError(f"mixer name {name!r} is already registered")
    _REGISTRY[kind][name] = _checked_init(cls)
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


def build_mixer(name, /, **kwargs):
  """Instantiates the registered mixer `name` with `kwargs` (its module attributes, or their `aliases`; `name=`
  among them names the submodule, as for any flax module).

  A wrong keyword is a ValueError listing the valid arguments.
  """
  cls = get(name)
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments for mixer {name!r}: {e}") from None


def is_causal_capable(name):
  """Whether the mixer `name` supports causal=True (decoding)."""
  cls = get(name)
  return getattr(cls, "supports_causal", True)
