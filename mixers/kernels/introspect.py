"""What a function launches: the Pallas kernels in its jaxpr and their grids (for tests and benchmarks)."""
import jax
import numpy as np


def pallas_calls(fn, *args):
  """[(kernel name, pallas_call equation)] in fn's jaxpr, inside any nested jaxpr (jit, custom_vjp_call, ...)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append((str(eqn.params["name"]).split(" ")[0], eqn))
      for value in eqn.params.values():
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
          walk(inner)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def pallas_grids(fn, *args):
  """{kernel name: grid} of the pallas_calls in fn's jaxpr."""
  return {name: tuple(eqn.params["grid_mapping"].grid) for name, eqn in pallas_calls(fn, *args)}


def grid_steps(fn, *args):
  """Grid steps (programs) fn launches: the sum over its pallas_calls of the product of the grid."""
  return sum(int(np.prod(eqn.params["grid_mapping"].grid)) for _, eqn in pallas_calls(fn, *args))
