"""Experiment configs: each module's `get_config(arg)` returns the ConfigDict that `experiments.train` runs.

`arg` (the text after `:` in `--config configs/mqar.py:ARG`) is comma-separated: a bare word first is the
mixer (hybrids join names with `+`, e.g. `gla+attention`), a second bare word the size, and `key=value`
items set those two by name: `configs/mqar.py:hydra`, `configs/lm.py:mamba2,small`,
`configs/listops.py:mixer=gla+attention,size=base`. Any field also overrides on the command line,
e.g. `--config.optimizer.learning_rate=3e-3`.

A config file states its values plainly; `training_config` lays them over the trainer's defaults, so that every
field of the schema (`experiments.trainer.config`, which lists and checks them) is there to override. The
model's kind and causality follow from the dataset's task.
"""
from experiments.trainer import config as trainer_config
from mixers import registry


def training_config(*, data, model, optimizer, **fields):
  """The trainer's default config for dataset `data["name"]` with these values (dicts of fields) laid over it."""
  config = trainer_config.default_config(data["name"])
  config.update(dict(data=data, model=model, optimizer=optimizer, **fields))
  return config


def parse_arg(arg, *, mixer, size, sizes):
  """(mixer, size) from a config argument (see the module docstring); ValueError on unknown parts."""
  out = {"mixer": mixer, "size": size}
  positional = ["mixer", "size"]
  for part in (p.strip() for p in (arg or "").split(",") if p.strip()):
    if "=" in part:
      key, value = (s.strip() for s in part.split("=", 1))
      if key not in out:
        raise ValueError(f"config argument {arg!r}: unknown key {key!r}; valid keys: mixer, size")
    elif positional:
      key, value = positional[0], part
    else:
      raise ValueError(f"config argument {arg!r}: expected at most 'mixer,size' or key=value items")
    if key in positional:
      positional = positional[positional.index(key) + 1:]
    out[key] = value
  out["mixer"] = out["mixer"].replace("+", ",")
  if out["size"] not in sizes:
    raise ValueError(f"config argument {arg!r}: unknown size {out['size']!r}; valid sizes: {', '.join(sizes)}")
  names = [n.strip() for n in out["mixer"].split(",")]
  valid = registry.names("sequence")
  for name in names:
    if name not in valid:
      raise ValueError(f"config argument {arg!r}: unknown mixer {name!r}; valid mixers: {', '.join(valid)}")
  return out["mixer"], out["size"]
