"""Models from an `ml_collections.ConfigDict`; the mixer swaps by name, a list of names makes a hybrid.

    config = mixers.models.default_config()
    config.mixer = "gla,attention"          # layer i uses mixer i % 2 (on the command line:
    model = mixers.models.build_model(config)   # --config.model.mixer=gla,attention)
"""
import jax.numpy as jnp
import ml_collections

from mixers import registry
from mixers.models.backbone import SequenceModel, compute_dtype, mixer_kwargs, remat_policy
from mixers.models.classifier import Classifier
from mixers.models.language_model import LanguageModel, check_positional

KINDS = ("lm", "classifier")


def default_config():
  c = ml_collections.ConfigDict()
  c.kind = "lm"  # lm | classifier
  c.mixer = "gla"  # a registered sequence mixer, or comma-separated names (one per layer, cycled)
  c.mixer_kwargs = ml_collections.ConfigDict()  # passed to every layer's mixer
  c.per_mixer_kwargs = ml_collections.ConfigDict()  # {mixer name: kwargs}, overriding mixer_kwargs for hybrids
  c.channel_mixer = "glu"  # mlp | glu | monarch_mlp | none
  c.channel_kwargs = ml_collections.ConfigDict()
  c.d_model = 128
  c.num_layers = 2
  c.causal = True  # classifiers usually set False; language models require True
  c.vocab_size = 256
  c.tie_embeddings = True
  c.num_classes = 10
  c.patch_size = 0  # > 0: image classifier on patches of this size
  c.image_size = (32, 32)  # image height, width (sets grid_shape for n-D mixers)
  c.pool = "mean"  # mean | cls | last_token
  # Added to the token or patch embeddings: "" | learned (a [max_len, d_model] table; in an lm the position counts
  # from each packed segment's first token and continues while decoding) | md_tpe (mixers.layers.MdTpe; in an lm
  # causal, and positional_kwargs.causal=False is refused).
  c.positional = ""
  c.positional_kwargs = ml_collections.ConfigDict()  # MdTpe's fields: num_heads, decay_init, causal (classifier)
  c.max_len = 4096  # longest sequence (segment, in packed lm batches); sizes learned positions and the mixers that
  # have a max_len (m2's filter and decode cache)
  c.dtype = "float32"  # computation dtype: float32 | bfloat16 | float16
  c.param_dtype = "float32"  # parameters' dtype: float32 | bfloat16 | float16
  c.remat = False  # rematerialise each block (or scanned group) in the backward pass
  c.remat_policy = ""  # what remat saves: "" (nothing) | dots_saveable | ... (mixers.models.backbone.REMAT_POLICIES)
  c.scan_layers = False  # one nn.scan over the repeating group of layers (parameters stacked on a `layers` axis)
  return c


def lightnet_block_config(task="image"):
  """LightNet overrides of `default_config()` for `task` in {"image", "lm"}.

    config = mixers.models.default_config()
    config.update(lightnet_block_config("image"))
    model = mixers.models.build_model(config)

  image: classifier on 4x4 patches; non-causal LightNet reads the patch grid (grid_shape from the image size)
  with MD-LRPE over both grid axes; MD-TPE added once after the patch embedding; GLU channel mixer; mean pool.
  lm: causal LightNet with 1-D MD-LRPE (decodes through the cache), no positional layer, GLU channel mixer.
  """
  if task not in ("image", "lm"):
    raise ValueError(f"task must be one of ['image', 'lm'], got {task!r}")
  image = task == "image"
  c = ml_collections.ConfigDict()
  c.kind = "classifier" if image else "lm"
  c.causal = not image
  c.mixer = "lightnet"
  c.mixer_kwargs = ml_collections.ConfigDict(dict(num_heads=8, gate_rank=32, use_lrpe=True))
  c.channel_mixer = "glu"
  c.positional = "md_tpe" if image else ""
  c.positional_kwargs = ml_collections.ConfigDict(dict(num_heads=8, causal=False) if image else {})
  if image:
    c.patch_size = 4
    c.pool = "mean"  # a cls token would break the patch grid the mixer reads
  return c


def check_config(config):
  """ValueError for unknown keys (listing the valid ones), unknown mixers, causal/non-causal mismatches, or a
  language model's positions that are not causal (md_tpe with causal=False) or not sized (learned without max_len)."""
  valid = default_config()
  unknown = sorted(set(config.keys()) - set(valid.keys()))
  if unknown:
    raise ValueError(f"unknown model config keys {unknown}; valid keys: {', '.join(sorted(valid.keys()))}")
  if config.kind not in KINDS:
    raise ValueError(f"model.kind must be one of {KINDS}, got {config.kind!r}")
  compute_dtype(config.dtype), compute_dtype(config.get("param_dtype")), remat_policy(config.get("remat_policy"))
  names = mixer_names(config)
  seq = registry.names("sequence")
  for name in names:
    if name not in seq:
      raise ValueError(f"unknown mixer {name!r}; valid names: {', '.join(seq)}")
  channel = config.channel_mixer
  if channel not in (None, "", "none") and channel not in registry.names("channel"):
    raise ValueError(f"unknown channel_mixer {channel!r}; valid: none, {', '.join(registry.names('channel'))}")
  if config.kind == "lm":
    check_positional(config.positional or None, config.positional_kwargs, config.max_len)
  needs_causal = config.kind == "lm" or config.causal
  if needs_causal:
    bad = sorted({n for n in names if not registry.is_causal_capable(n)})
    if bad:
      causal_ok = [n for n in seq if registry.is_causal_capable(n)]
      raise ValueError(f"mixer(s) {bad} are non-causal but this model is causal "
                       f"({'a language model' if config.kind == 'lm' else 'causal=True'}); "
                       f"causal mixers: {', '.join(causal_ok)}")


def mixer_names(config):
  names = config.mixer
  names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
  return [names[i % len(names)] for i in range(config.num_layers)]


def build_model(config):
  """LanguageModel or Classifier for `config` (see `default_config` for the fields)."""
  check_config(config)
  causal = config.kind == "lm" or bool(config.causal)
  # Fields added after a run was saved (its config.json) take their defaults.
  dtype, param_dtype = compute_dtype(config.dtype), compute_dtype(config.get("param_dtype")) or jnp.float32
  grid = None
  if config.kind == "classifier" and config.patch_size:
    grid = tuple(s // config.patch_size for s in config.image_size)
  per_layer = []
  for name in mixer_names(config):
    kw = dict(config.mixer_kwargs.to_dict() if hasattr(config.mixer_kwargs, "to_dict") else config.mixer_kwargs)
    kw.update(dict(config.per_mixer_kwargs.get(name, {}) or {}))
    per_layer.append(mixer_kwargs(name, kw, causal=causal, dtype=dtype, param_dtype=param_dtype, grid_shape=grid,
                                  max_len=config.max_len))
  channel = None if config.channel_mixer in (None, "", "none") else config.channel_mixer
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  backbone = SequenceModel(mixers=tuple(mixer_names(config)), mixer_kwargs=tuple(per_layer), channel_mixer=channel,
                           channel_kwargs=dict(config.channel_kwargs), remat=config.remat,
                           remat_policy=config.get("remat_policy") or None,
                           scan_layers=bool(config.get("scan_layers", False)),
                           name="backbone", **kw)
  if config.kind == "lm":
    return LanguageModel(vocab_size=config.vocab_size, d_model=config.d_model, backbone=backbone,
                         tie_embeddings=config.tie_embeddings, positional=config.positional or None,
                         positional_kwargs=dict(config.positional_kwargs), max_len=config.max_len, **kw)
  return Classifier(num_classes=config.num_classes, d_model=config.d_model, backbone=backbone,
                    vocab_size=config.vocab_size, patch_size=config.patch_size or None, pool=config.pool,
                    positional=config.positional or None, positional_kwargs=dict(config.positional_kwargs),
                    max_len=config.max_len, **kw)
