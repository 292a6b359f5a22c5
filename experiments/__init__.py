"""Experiments: train, evaluate, generate, benchmark, studies, plots. Run from the repository root, e.g.
`python -m experiments.train --config configs/mqar.py --workdir workdirs/mqar`; they need the `experiments` extra."""
import importlib.util

# The import name of each package of the `experiments` extra (setup.py).
EXTRA = {"absl": "absl-py", "tensorflow_datasets": "tensorflow-datasets", "array_record": "array-record",
         "grain": "grain", "tqdm": "tqdm", "matplotlib": "matplotlib", "tensorboardX": "tensorboardX"}

_missing = [pip for module, pip in EXTRA.items() if importlib.util.find_spec(module) is None]
if _missing:
  raise ImportError(f"experiments need the packages {', '.join(_missing)} of the `experiments` extra: run "
                    f"pip install -e \".[experiments]\" from the repository root")
