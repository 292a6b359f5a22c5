r"""Zoology's Hyena on this library's MQAR data and budget, in PyTorch: the reference point for M2 at equal budget.

    python -m experiments.zoology_hyena --export results/mqar_v256_t64_p4.npz           # this environment; noise
    python -m experiments.zoology_hyena --export results/mqar_zeros.npz --filler zeros   # the config's default data
    pip install torch                                                                  # any environment with torch
    python experiments/zoology_hyena.py --data results/mqar_v256_t64_p4.npz --out results/hyena.jsonl
    python experiments/zoology_hyena.py --data ... --trainer mixers --lrs 1e-2 --out ...

Zoology's Figure 2 (arXiv 2312.04927) reports Hyena after 64 epochs of 100,000 examples at batch 512; the M2 runs
of docs/RESULTS.md section 2 see 1,500 steps of 32. This script trains Zoology's own model, rebuilt from its code
(`zoology/model.py`, `zoology/mixers/hyena.py`, `zoology/train.py`), on the exact examples of `configs/mqar.py`
(written out by `--export`: `--filler noise`, the default here, gives the uniform-noise filler the CPU grids and the
config's earlier runs used; `--filler zeros` the config's default now) for the same steps and batch, so that the two
are compared at equal budget.

Model (Zoology's LanguageModel, TransformerBlock, n_layers 2, identity state mixer): token embeddings N(0, 0.02)
tied to the output head; embedding dropout 0.1; per block `residual += h; residual += hyena(LN1(residual));
h = LN2(residual)`, then `ln_f(residual + h)`.
Hyena (order 2): `x1, x2, v = shortconv3(in_proj(u)); y = out_proj(x2 * (k * (x1 v) + D x1 v))`, `*` a causal
convolution over time; `k[l] = MLP(z_l) exp(-t_l |delta|)` with `t = linspace(0, 1, T)`,
`z_l = [t_l, cos(2 pi f l / T), -sin(2 pi f l / T)]` (f = 1e-4, trained), MLP `Linear(3, 64) sin (Linear(64, 64)
sin) x 2 Linear(64, d)`, one trained sine frequency vector (initialised to 1); decay rates fixed.
Initialisation (Zoology's `_init_weights`): every Linear and the embedding N(0, 0.02) with zero biases (the
filter's MLP included), out_proj N(0, 0.02 / sqrt(2 n_layers)), D ~ N(0, 1), the depthwise conv PyTorch's default.
Trainer `zoology`: AdamW(lr, betas (0.9, 0.999), weight decay 0.1 on every parameter), cosine from lr to 0 (per
step here, per epoch in Zoology), no warm-up, no clipping; `mixers`: configs/mqar.py's optimiser (betas (0.9,
0.98), warm-up 100, cosine to 0.1 lr, clipping at norm 1, weight decay 0.1 on matrices except the filter's).
Each run appends `{seed, lr, accuracy, curve: [(step, train loss, validation accuracy)], ...}` to `--out`; the
accuracy is over the queried positions of the validation split, as `experiments.train` reports it.
"""
import argparse
import json
import math
import time

import numpy as np


def export(path, random_non_queries=True):
  """Writes configs/mqar.py's train and validation splits (inputs, targets `[N, T]` int64) to `path`.

  random_non_queries: the config's filler tokens are uniform noise (True) or 0 (False, Zoology's Figure 2 data)."""
  from configs import mqar  # pylint: disable=import-outside-toplevel
  from experiments import data  # pylint: disable=import-outside-toplevel

  config = mqar.get_config("m2,small")
  config.data.random_non_queries = random_non_queries
  arrays = {}
  for split in ("train", "validation"):
    batch = next(data.get_dataset(config.data, split, seed=0, batch_size=data.num_examples(config.data, split),
                                  shuffle=False, num_epochs=1))
    arrays[f"{split}_inputs"] = np.asarray(batch["inputs"], np.int64)
    arrays[f"{split}_targets"] = np.asarray(batch["targets"], np.int64)
  np.savez(path, **arrays)
  print({k: v.shape for k, v in arrays.items()})


def build(vocab_size, d_model, seq_len, n_layers=2):
  """Zoology's Hyena language model (module docstring) as a torch.nn.Module: ids `[B, T]` -> logits `[B, T, V]`."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  class Sin(nn.Module):
    def __init__(self, dim):
      super().__init__()
      self.freq = nn.Parameter(torch.ones(1, dim))

    def forward(self, x):
      return torch.sin(self.freq * x)

  class Filter(nn.Module):
    def __init__(self, d, order=64, inner_layers=2):
      super().__init__()
      t = torch.linspace(0, 1, seq_len)[:, None]
      w = 2 * math.pi * torch.arange(seq_len, dtype=torch.float32)[:, None] / seq_len
      self.z = nn.Parameter(torch.cat([t, torch.cos(1e-4 * w), -torch.sin(1e-4 * w)], -1))
      self.register_buffer("t", t)
      act = Sin(order)
      layers = [nn.Linear(3, order), act]
      for _ in range(inner_layers):
        layers += [nn.Linear(order, order), act]
      self.mlp = nn.Sequential(*layers, nn.Linear(order, d, bias=False))
      self.register_buffer("deltas", torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, d)[None])
      self.bias = nn.Parameter(torch.randn(d))

    def forward(self, length):
      return self.mlp(self.z[:length]) * torch.exp(-self.t[:length] * self.deltas.abs())

  class Hyena(nn.Module):
    def __init__(self, d):
      super().__init__()
      self.in_proj, self.out_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
      self.short_filter = nn.Conv1d(3 * d, 3 * d, 3, groups=3 * d, padding=2)
      self.filter = Filter(d)

    def forward(self, u):
      length = u.shape[1]
      x1, x2, v = self.short_filter(self.in_proj(u).transpose(1, 2))[..., :length].chunk(3, dim=1)
      v = v * x1
      v = causal_conv(v, self.filter(length).T) + v * self.filter.bias[:, None]
      return self.out_proj((v * x2).transpose(1, 2))

  class LanguageModel(nn.Module):
    def __init__(self):
      super().__init__()
      self.embedding = nn.Embedding(vocab_size, d_model)
      self.mixers = nn.ModuleList([Hyena(d_model) for _ in range(n_layers)])
      self.norm1 = nn.ModuleList([nn.LayerNorm(d_model) for _ in range(n_layers)])
      self.norm2 = nn.ModuleList([nn.LayerNorm(d_model) for _ in range(n_layers)])
      self.ln_f = nn.LayerNorm(d_model)
      self.dropout = nn.Dropout(0.1)
      for m in self.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
          nn.init.normal_(m.weight, std=0.02)
          if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
      for mixer in self.mixers:
        nn.init.normal_(mixer.out_proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, ids):
      h, residual = self.dropout(self.embedding(ids)), 0.0
      for mixer, norm1, norm2 in zip(self.mixers, self.norm1, self.norm2):
        residual = residual + h
        residual = residual + mixer(norm1(residual))
        h = norm2(residual)
      return self.ln_f(residual + h) @ self.embedding.weight.T

  return LanguageModel()


def causal_conv(u, k):
  """u `[B, d, T]`, k `[d, T]` -> `[B, d, T]`: `y[t] = sum_{s <= t} k[t - s] u[s]`, by FFTs of size 2T."""
  import torch  # pylint: disable=import-outside-toplevel
  n = 2 * u.shape[-1]
  return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]


def optimizer(model, trainer, lr, steps):
  """(optimizer, per-step lr scheduler, clip norm or 0) of `trainer` (module docstring)."""
  import torch  # pylint: disable=import-outside-toplevel
  if trainer == "zoology":
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))), 0.0
  decays = {n: p.ndim >= 2 and ".filter." not in n for n, p in model.named_parameters()}
  decayed = [p for n, p in model.named_parameters() if decays[n]]
  others = [p for n, p in model.named_parameters() if not decays[n]]
  opt = torch.optim.AdamW([dict(params=decayed, weight_decay=0.1), dict(params=others, weight_decay=0.0)],
                          lr=lr, betas=(0.9, 0.98))
  warmup = min(100, steps - 1)  # as experiments.trainer.optimizer
  schedule = lambda s: s / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) /
                                                                              (steps - warmup)))
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule), 1.0


def train(args):
  """Trains one model per (seed, learning rate) and appends its row to args.out."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit("training Zoology's Hyena needs PyTorch, which this library does not depend on: "
                     "pip install torch") from None
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(args.threads)
  arrays = np.load(args.data)
  train_x, train_y = (torch.from_numpy(arrays[f"train_{k}"]) for k in ("inputs", "targets"))
  val_x, val_y = (torch.from_numpy(arrays[f"validation_{k}"]) for k in ("inputs", "targets"))
  seq_len = train_x.shape[1]

  def accuracy(model):
    model.eval()
    with torch.no_grad():
      pred = torch.cat([model(val_x[i:i + 250]).argmax(-1) for i in range(0, len(val_x), 250)])
    model.train()
    scored = val_y >= 0
    return (pred[scored] == val_y[scored]).float().mean().item()

  for seed in args.seeds:
    for lr in args.lrs:
      torch.manual_seed(seed)
      model = build(args.vocab_size, args.d_model, seq_len)
      opt, schedule, clip = optimizer(model, args.trainer, lr, args.steps)
      order_rng = torch.Generator().manual_seed(seed)
      order, pos, curve, start = torch.randperm(len(train_x), generator=order_rng), 0, [], time.time()
      for step in range(1, args.steps + 1):
        if pos + args.batch_size > len(order):
          order, pos = torch.randperm(len(train_x), generator=order_rng), 0
        rows, pos = order[pos:pos + args.batch_size], pos + args.batch_size
        logits = model(train_x[rows])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), train_y[rows].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
          torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
          curve.append((step, round(loss.item(), 4), round(accuracy(model), 4)))
      row = dict(trainer=args.trainer, d_model=args.d_model, steps=args.steps, batch_size=args.batch_size,
                 seed=seed, lr=lr, accuracy=curve[-1][2], curve=curve, seconds=round(time.time() - start, 1))
      print(json.dumps(row), flush=True)
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def main():
  floats = lambda s: [float(x) for x in s.split(",")]
  ints = lambda s: [int(x) for x in s.split(",")]
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--export", help="write configs/mqar.py's splits to this .npz and stop")
  p.add_argument("--filler", default="noise", choices=("noise", "zeros"),
                 help="--export: the tokens between queries (noise: the CPU grids'; zeros: Zoology's Figure 2, "
                      "configs/mqar.py's default)")
  p.add_argument("--data", help="the .npz written by --export")
  p.add_argument("--out", help="JSON lines, one per run (appended)")
  p.add_argument("--trainer", default="zoology", choices=("zoology", "mixers"))
  p.add_argument("--lrs", type=floats, default=floats("1e-4,4.6416e-4,2.1544e-3,1e-2"),
                 help="Zoology's four: logspace(-4, -2, 4)")
  p.add_argument("--seeds", type=ints, default=ints("0,1,2"))
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument("--vocab_size", type=int, default=256)
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--eval_every", type=int, default=250)
  p.add_argument("--threads", type=int, default=1)
  args = p.parse_args()
  if args.export:
    export(args.export, random_non_queries=args.filler == "noise")
  elif args.data and args.out:
    train(args)
  else:
    p.error("give --export PATH, or --data PATH and --out PATH")


if __name__ == "__main__":
  main()
