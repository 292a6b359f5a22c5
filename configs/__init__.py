"""Experiment configs: each module's `get_config(arg)` returns the ConfigDict that `experiments.train` runs.

`arg` (the text after `:` in `--config configs/mqar.py:ARG`) is comma-separated: a bare word first is the
mixer (hybrids join names with `+`, e.g. `gla+attention`), a second bare word the size, and `key=value`
items set those two by name: `configs/mqar.py:hydra`, `configs/lm.py:mamba2,small`,
`configs/listops.py:mixer=gla+attention,size=base`. Any field also overrides on the command line,
e.g. `--config.optimizer.learning_rate=3e-3`.

Fields of a config (the trainer rejects others):
  data           the dataset (`experiments.data`): name, generation and reading fields
  model          `mixers.models.default_config()` fields; kind, vocab_size, num_classes and image_size
                 are taken from the dataset
  optimizer      `optimizer_config()` fields (AdamW, warmup + cosine, clipping, accumulation)
  seed           parameter initialisation and data order
  batch_size     global batch (all hosts together)
  num_steps      train steps (batches)
  log_every, eval_every, checkpoint_every, keep_checkpoints
  eval_steps     batches per periodic evaluation (0: the whole evaluation split)
  eval_batch_size
  mesh           device mesh axis sizes, e.g. {"data": -1} (every device on data)
  plot           write PNG curves into workdir/plots at the end
"""
import ml_collections

from mixers import models
from mixers import registry

TRAIN_FIELDS = ("data", "model", "optimizer", "seed", "batch_size", "num_steps", "log_every", "eval_every",
                "eval_steps", "eval_batch_size", "checkpoint_every", "keep_checkpoints", "mesh", "plot")


def optimizer_config():
  """AdamW with linear warmup then cosine decay to min_lr_ratio * learning_rate; weight decay on matrices only;
  clip_norm 0 disables clipping; accumulate_steps k > 1 updates the parameters every k batches."""
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=100, min_lr_ratio=0.1, b1=0.9, b2=0.98, eps=1e-8,
      weight_decay=0.1, clip_norm=1.0, accumulate_steps=1))


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


def causal_mixers():
  return [n for n in registry.names("sequence") if registry.is_causal_capable(n)]


def require_causal(mixer, task):
  """ValueError unless every mixer in `mixer` can run causally (for `task`, a causal task)."""
  bad = [n for n in mixer.split(",") if not registry.is_causal_capable(n)]
  if bad:
    raise ValueError(f"{task} is a causal task and mixer(s) {bad} are non-causal; "
                     f"causal mixers: {', '.join(causal_mixers())}")


def base_config(data_config, *, mixer, d_model, num_layers, causal):
  """A config with every trainer field at its default, for `data_config` and this backbone."""
  c = ml_collections.ConfigDict()
  c.data = data_config
  c.model = models.default_config()
  c.model.mixer = mixer
  c.model.d_model = d_model
  c.model.num_layers = num_layers
  c.model.causal = causal
  c.model.kind = "lm" if causal else "classifier"
  c.optimizer = optimizer_config()
  c.seed = 0
  c.batch_size = 64
  c.num_steps = 1000
  c.log_every = 50
  c.eval_every = 500
  c.eval_steps = 0
  c.eval_batch_size = 256
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.mesh = ml_collections.ConfigDict({"data": -1})
  c.plot = True
  return c


def check(config):
  """ValueError naming unknown top-level, model or optimizer fields together with the valid ones."""
  unknown = sorted(set(config.keys()) - set(TRAIN_FIELDS))
  if unknown:
    raise ValueError(f"config: unknown fields {unknown}; valid fields: {', '.join(TRAIN_FIELDS)}")
  models.check_config(config.model)
  valid = optimizer_config()
  unknown = sorted(set(config.optimizer.keys()) - set(valid.keys()))
  if unknown:
    raise ValueError(f"config.optimizer: unknown fields {unknown}; valid fields: {', '.join(sorted(valid.keys()))}")
