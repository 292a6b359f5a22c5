"""The public contract of DESIGN.md: op names, argument names and defaults, registry names."""
import inspect

import pytest

import mixers
from mixers import ops, registry

CONTRACT = {
    "attention": ("q", "k", "v", dict(causal=False, prefix_len=None, block_size=None, scale=None)),
    "linear_attention": ("q", "k", "v", dict(causal=True, prefix_len=None, block_size=None, log_decay=None,
                                             normalize=False, scale=None, eps=1e-6, initial_state=None,
                                             return_state=False, chunk_size=64, impl="auto")),
    "linear_attention_step": ("q", "k", "v", "state", dict(log_decay=None, normalize=False, scale=None, eps=1e-6)),
    "ssd": ("x", "dt", "A", "B", "C", dict(D=None, causal=True, chunk_size=64, initial_state=None,
                                           return_state=False, impl="auto")),
    "quasiseparable": ("x", "dt", "A", "B", "C", dict(D=None, chunk_size=64, impl="auto")),
    "delta_rule": ("q", "k", "v", "beta", dict(log_decay=None, scale=None, initial_state=None, return_state=False,
                                               chunk_size=64, impl="auto")),
    "delta_rule_step": ("q", "k", "v", "beta", "state", dict(log_decay=None, scale=None)),
    "lightnet": ("q", "k", "v", dict(causal=True, scale=None, initial_state=None, return_state=False, impl="auto")),
    "monarch": ("x", "L", "R", {}),
    "monarch_matrix": ("L", "R", {}),
    "long_conv": ("u", "k", dict(k_rev=None)),
}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_op_signature(name):
  *positional, keywords = CONTRACT[name]
  params = inspect.signature(getattr(ops, name)).parameters
  assert list(params)[:len(positional)] == positional
  for p in positional:
    assert params[p].default is inspect.Parameter.empty
  for key, default in keywords.items():
    assert key in params, f"{name} lacks keyword {key}"
    assert params[key].kind == inspect.Parameter.KEYWORD_ONLY, f"{name}: {key} must be keyword-only"
    assert params[key].default == default, f"{name}: {key} defaults to {params[key].default!r}, not {default!r}"


def test_registry_names():
  assert registry.names("sequence") == sorted(["attention", "linear_attention", "retention", "gla", "mamba2",
                                               "hydra", "vssd", "m2", "lightnet", "delta_net",
                                               "gated_delta_net", "hyper_attention"])
  assert registry.names("channel") == ["glu", "mlp", "monarch_mlp"]
  for name in registry.names("sequence"):
    assert "causal" in registry.get(name).__dataclass_fields__
  assert mixers.build_mixer("mlp").__class__.__name__ == "MLP"
