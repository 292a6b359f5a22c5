"""Multi-query associative recall (Zoology): can a causal model recall the value paired with each queried key?

    python -m experiments.train --config configs/mqar.py --workdir DIR            # gla, base
    python -m experiments.train --config configs/mqar.py:mamba2 --workdir DIR
    python -m experiments.train --config configs/mqar.py:attention,tiny --workdir DIR

ARG = `mixer[,size]`: any causal mixer (hybrids as `gla+attention`); size tiny | small | base sets
(d_model, num_layers) to (32, 2) | (64, 2) | (128, 2), no channel mixer. Every mixer has 2 layers (Zoology's Figure 2
config gave attention 2 and the others 4, and every mixer 2 since its last revision; M2 at 4 layers trains slower at
this budget, docs/RESULTS.md).
Default data: vocabulary 256, length 64, 4 key-value pairs, 20k training examples, token 0 between the queries
(Zoology's Figure 2 data: `random_non_queries=False` in its configs); accuracy counts the query positions only.
`--config.data.random_non_queries=True` fills the gaps with uniform noise instead (the default of Zoology's generator;
a harder task: M2 reaches 0.58 at 1,500 steps with zeros, 0.36 with noise, docs/RESULTS.md section 2). The paper's
setting is `--config.data.vocab_size=8192`, longer sequences via `--config.data.seq_len=256
--config.data.num_pairs=16`.
"""
import configs
from mixers import registry

SIZES = {"tiny": (32, 2), "small": (64, 2), "base": (128, 2)}

# Mixer settings that recall well on MQAR: every recurrent mixer gets a short convolution before its recurrence
# (Zoology, Based), so the recall table compares like with like. mamba2 has its own conv; delta_net and
# gated_delta_net have short_conv on by default.
MIXER_KWARGS = {
    "gla": dict(num_heads=2, short_conv=True, expand_k=1.0),
    "linear_attention": dict(num_heads=2, short_conv=True, feature_map="taylor", feature_dim=16),
    "mamba2": dict(head_dim=16, state_dim=32),
    "attention": dict(num_heads=2),
    "retention": dict(num_heads=2, short_conv=True),
    "lightnet": dict(num_heads=2, short_conv=True),
    "delta_net": dict(num_heads=2),
    "gated_delta_net": dict(num_heads=2),
    # m2: the layer's own defaults, listed so that the command line can change them
    # (--config.model.per_mixer_kwargs.m2.emb_dim=3)
    "m2": {name: getattr(registry.get("m2"), name)
           for name in ("emb_dim", "filter_order", "filter_inner_layers", "filter_learn_positions", "short_width")},
}


# M2's implicit filters train without weight decay, as Hyena's (Zoology's `Filter(wd=0)`): decay pulls the small
# filter MLP towards zero at every step. Measured at T=64, d_model 64, 1,500 steps, seeds 0/1/2: 0.444/0.180/0.414
# without decay on the filter, 0.248/0.253/0.375 with it (docs/RESULTS.md section 2).
OPTIMIZER_KWARGS = {"m2": dict(wd_mults=(("filter", 0.0),))}


def get_config(arg=""):
  mixer, size = configs.parse_arg(arg, mixer="gla", size="base", sizes=SIZES)
  d_model, num_layers = SIZES[size]
  optimizer = dict(learning_rate=1e-2, warmup_steps=100, weight_decay=0.1)
  for name in mixer.split(","):
    optimizer.update(OPTIMIZER_KWARGS.get(name, {}))
  return configs.training_config(
      data=dict(name="mqar", vocab_size=256, seq_len=64, num_pairs=4, num_train=20_000, num_validation=1_000,
                random_non_queries=False),
      model=dict(mixer=mixer, d_model=d_model, num_layers=num_layers, channel_mixer="none",
                 per_mixer_kwargs={name: MIXER_KWARGS[name] for name in mixer.split(",") if name in MIXER_KWARGS}),
      optimizer=optimizer,
      batch_size=32, num_steps=1500, log_every=50, eval_every=250, eval_steps=0, eval_batch_size=256,
      checkpoint_every=250)
