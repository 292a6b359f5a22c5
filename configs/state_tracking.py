"""State tracking: the running product of a group word (parity, S3, S5) at every position.

    python -m experiments.train --config configs/state_tracking.py --workdir DIR           # delta_net, parity
    python -m experiments.train --config configs/state_tracking.py:gla --workdir DIR --config.data.group=s3
    python -m experiments.train --config configs/state_tracking.py:delta_net --workdir DIR \
        --config.model.per_mixer_kwargs.delta_net.allow_neg_eigval=False

ARG = `mixer[,size]`: any causal mixer; size tiny | small | base sets (d_model, num_layers) to (32, 2) |
(64, 2) | (128, 3). The delta-rule layers default to beta in (0, 2) (`allow_neg_eigval`: eigenvalues of
I - beta k k^T in (-1, 1), what parity needs); set it False for the usual (0, 1). Words of 64 elements drawn
uniformly, 10k training examples, accuracy over every position (chance 1/|G|).
"""
import configs

SIZES = {"tiny": (32, 2), "small": (64, 2), "base": (128, 3)}

MIXER_KWARGS = {
    "delta_net": dict(num_heads=2, allow_neg_eigval=True),
    "gated_delta_net": dict(num_heads=2, allow_neg_eigval=True),
    "gla": dict(num_heads=2),
    "mamba2": dict(head_dim=16, state_dim=16),
    "attention": dict(num_heads=2),
}


def get_config(arg=""):
  mixer, size = configs.parse_arg(arg, mixer="delta_net", size="small", sizes=SIZES)
  d_model, num_layers = SIZES[size]
  return configs.training_config(
      data=dict(name="state_tracking", group="parity", seq_len=64, num_train=10_000, num_validation=500),
      model=dict(mixer=mixer, d_model=d_model, num_layers=num_layers, channel_mixer="mlp",
                 per_mixer_kwargs={name: MIXER_KWARGS[name] for name in mixer.split(",") if name in MIXER_KWARGS}),
      optimizer=dict(learning_rate=3e-3, warmup_steps=100, weight_decay=0.01),
      batch_size=32, num_steps=2000, log_every=100, eval_every=500, eval_steps=0, eval_batch_size=250,
      checkpoint_every=500)
