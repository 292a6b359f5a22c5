r"""Heat maps of the T x T mixing matrices a state space mixer applies, one panel per head.

  python -m experiments.plot_matrices --mixer mamba2 --length 64 --out results/mamba2_matrix.png
  python -m experiments.plot_matrices --mixer hydra --length 64 --log --out results/hydra_matrix.png

The layer is built with random weights (or a checkpoint's, through `plot_mixing_matrices`) and applied to a
random input; M[h, t, s] is the weight of token s in output t for head h (Mamba2: semiseparable, lower
triangular; Hydra: quasiseparable; VSSD: dense, rank N per head).
"""
import argparse
import math
import os

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from mixers.layers import hydra, mamba2, vssd  # pylint: disable=wrong-import-position,unused-import
from mixers.registry import build_mixer  # pylint: disable=wrong-import-position


def plot_mixing_matrices(m, path, *, title="", log=False, max_heads=16):
  """Writes heat maps of m `[H,T,T]` (one batch element) to the PNG `path`; returns the path.

  Signed values use a diverging map centred at 0 (each head scaled to its own largest |M|); `log` shows
  log10 |M| instead, which makes the exponential decay of the off-diagonal blocks readable.
  """
  m = np.asarray(m, np.float64)[:max_heads]
  h = m.shape[0]
  cols = min(h, 4)
  rows = math.ceil(h / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows + 0.4), squeeze=False)
  for i, ax in enumerate(axes.flat):
    if i >= h:
      ax.axis("off")
      continue
    if log:
      mag = np.log10(np.abs(m[i]) + 1e-12)
      top = mag.max()
      img = ax.imshow(mag, cmap="magma", vmin=top - 6, vmax=top, interpolation="nearest")
    else:
      lim = np.abs(m[i]).max() or 1.0
      img = ax.imshow(m[i], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_title(f"head {i}", fontsize=9)
    ax.set_xlabel("input position s", fontsize=8)
    ax.set_ylabel("output position t", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
  fig.suptitle(title + ("  (log10 |M|)" if log else "  (M, per-head colour scale)"), fontsize=11)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def layer_matrix(name, length, *, d_model=64, seed=0, **kwargs):
  """(M `[H,T,T]`, layer) for the registered mixer `name` with random weights on a random input."""
  layer = build_mixer(name, **kwargs)
  x = jax.random.normal(jax.random.key(seed), (1, length, d_model))
  variables = layer.init(jax.random.key(seed + 1), x)
  return np.asarray(layer.apply(variables, x, method="mixing_matrix")[0]), layer


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mixer", default="mamba2", choices=["mamba2", "hydra", "vssd"])
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--head_dim", type=int, default=16)
  parser.add_argument("--state_dim", type=int, default=16)
  parser.add_argument("--heads", type=int, default=8, help="panels drawn (at most)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--log", action="store_true", help="draw log10 |M|")
  parser.add_argument("--out", default=None, help="PNG path (default results/<mixer>_matrix.png)")
  args = parser.parse_args(argv)
  m, _ = layer_matrix(args.mixer, args.length, d_model=args.d_model, seed=args.seed, head_dim=args.head_dim,
                      state_dim=args.state_dim)
  out = args.out or os.path.join("results", f"{args.mixer}_matrix.png")
  plot_mixing_matrices(m, out, title=f"{args.mixer}: mixing matrix, T={args.length}", log=args.log,
                       max_heads=args.heads)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
