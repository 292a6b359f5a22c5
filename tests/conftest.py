"""Shared fixtures: float64 mode and error metrics. Tests see 8 simulated CPU devices (meshes need them)."""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

# The tests check numerics, not speed, and most of their time is XLA compiling tiny programs: skip the
# backend's optimisation passes (set MIXERS_TEST_XLA_OPTIMIZE=1 to keep them). Subprocesses inherit it.
if not os.environ.get("MIXERS_TEST_XLA_OPTIMIZE"):
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if not os.environ.get("MIXERS_TEST_XLA_OPTIMIZE"):
  jax.config.update("jax_disable_most_optimizations", True)  # also when jax was imported before this file


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Tests of a module with module-scoped fixtures run on one xdist worker, one after another (`--dist loadgroup`
  in pytest.ini), so each such fixture (a trained run, a multi-process job) is set up once, not once per worker or
  again after another module's tests came in between."""
  del config
  for item in items:
    defs = getattr(item, "_fixtureinfo", None)
    if defs and any(d.scope == "module" for ds in defs.name2fixturedefs.values() for d in ds):
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def rel_rms(a, b):
  """||a - b|| / ||b|| (the metric fla uses to compare kernels)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.sum((a - b) ** 2)) / max(np.sqrt(np.sum(b ** 2)), 1e-30))


def assert_close(a, b, tol, what=""):
  err = rel_rms(a, b)
  assert err <= tol, f"{what} relative RMS error {err:.3e} > {tol:.1e}"


def random_like(key, tree):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, jnp.result_type(x)) for k, x in zip(keys, leaves)])


def random_variables(module, *args, **kwargs):
  """Random values (normal, std 0.3) in the variables `module.init(key, *args, **kwargs)` would make, without
  compiling the init (XLA keeps its forward pass): drawn by numpy, so nothing is compiled."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(1)
  return treedef.unflatten([jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype) for a in leaves])
