"""Multi-query associative recall (Zoology): can a causal model recall the value paired with each queried key?

    python -m experiments.train --config configs/mqar.py --workdir DIR            # gla, base
    python -m experiments.train --config configs/mqar.py:mamba2 --workdir DIR
    python -m experiments.train --config configs/mqar.py:attention,tiny --workdir DIR

ARG = `mixer[,size]`: any causal mixer (hybrids as `gla+attention`); size tiny | small | base sets
(d_model, num_layers) to (32, 2) | (64, 2) | (128, 2), the Zoology grid's 2 layers without channel mixer.
Default data: vocabulary 256, length 64, 4 key-value pairs, 20k training examples; accuracy counts the
query positions only. The paper's setting is `--config.data.vocab_size=8192`, longer sequences via
`--config.data.seq_len=256 --config.data.num_pairs=16`.
"""
import ml_collections

import configs
from experiments.data import data_config

SIZES = {"tiny": (32, 2), "small": (64, 2), "base": (128, 2)}

# Mixer settings that recall well on MQAR: a short convolution before the recurrence (Zoology, Based).
MIXER_KWARGS = {
    "gla": dict(num_heads=2, short_conv=True, expand_k=1.0),
    "linear_attention": dict(num_heads=2, short_conv=True, feature_map="taylor", feature_dim=16),
    "mamba2": dict(head_dim=16, state_dim=32),
    "attention": dict(num_heads=2),
    "retention": dict(num_heads=2),
    "lightnet": dict(num_heads=2),
}


def get_config(arg=""):
  mixer, size = configs.parse_arg(arg, mixer="gla", size="base", sizes=SIZES)
  configs.require_causal(mixer, "MQAR")
  d_model, num_layers = SIZES[size]
  data = data_config.defaults("mqar")
  data.vocab_size = 256
  data.seq_len = 64
  data.num_pairs = 4
  data.num_train = 20_000
  data.num_validation = 1_000
  config = configs.base_config(data, mixer=mixer, d_model=d_model, num_layers=num_layers, causal=True)
  config.model.channel_mixer = "none"
  config.model.per_mixer_kwargs = ml_collections.ConfigDict(
      {name: MIXER_KWARGS[name] for name in mixer.split(",") if name in MIXER_KWARGS})
  config.batch_size = 32
  config.num_steps = 1500
  config.optimizer.learning_rate = 1e-2
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.1
  config.log_every = 50
  config.eval_every = 250
  config.eval_steps = 0
  config.eval_batch_size = 256
  config.checkpoint_every = 250
  return config
