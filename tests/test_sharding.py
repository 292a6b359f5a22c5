"""Meshes, logical-axis rules and a sharded train step on 8 simulated CPU devices."""
import os
import subprocess
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import functools  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from mixers import ops  # noqa: E402
from mixers import sharding  # noqa: E402

MESHES = {
    "data8": {"data": 8},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    "data2_sequence4": {"data": 2, "sequence": 4},
}
VOCAB, D, HEADS, HEAD_DIM, MLP, T, BATCH = 32, 16, 4, 4, 32, 24, 8


class Projection(nn.Module):
  """x [..., *in] -> [..., *out] with a kernel carrying logical axes (in axes then out axes)."""
  shape: tuple
  axes: tuple
  n_in: int = 1

  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.normal(self.shape[0] ** -0.5), self.axes)
    kernel = self.param("kernel", init, self.shape)
    letters = "abcdefgh"[:len(self.shape)]
    spec = f"...{letters[:self.n_in]},{letters}->...{letters[self.n_in:]}"
    return jnp.einsum(spec, x, kernel)


def _dense(features, axes, name):
  features = (features,) if isinstance(features, int) else tuple(features)
  n_in = len(axes) - len(features)
  sizes = {"embed": D, "heads": HEADS, "kv": HEAD_DIM, "mlp": MLP}
  return Projection(tuple(sizes[a] for a in axes[:n_in]) + features, axes, n_in, name=name)


class TinyLM(nn.Module):
  """Embedding, one linear-attention block (sequence-parallel on a mesh with a `sequence` axis), an MLP, a head."""
  mesh: object = None

  @nn.compact
  def __call__(self, tokens):
    emb = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                     (VOCAB, D))
    x = nn.with_logical_constraint(emb[tokens], ("batch", "length", "embed"))
    q, k, v = (_dense((HEADS, HEAD_DIM), ("embed", "heads", "kv"), n)(x) for n in "qkv")
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    log_decay = -jax.nn.softplus(_dense((HEADS,), ("embed", "heads"), "gate")(x))
    la = ops.linear_attention
    if self.mesh is not None and self.mesh.shape["sequence"] > 1:
      la = sharding.sequence_parallel(la, self.mesh)
    o = la(q, k, v, log_decay=log_decay, normalize=True, chunk_size=8, impl="chunked")
    x = x + _dense(D, ("heads", "kv", "embed"), "out")(o)
    h = nn.with_logical_constraint(jax.nn.gelu(_dense(MLP, ("embed", "mlp"), "up")(x)), ("batch", "length", "mlp"))
    x = x + _dense(D, ("mlp", "embed"), "down")(h)
    return _dense(VOCAB, ("embed", "vocab"), "head")(x)


def _batch():
  r = np.random.RandomState(0)
  return jnp.asarray(r.randint(0, VOCAB, (BATCH, T + 1)), jnp.int32)


TX = optax.adam(1e-2)


def _train_step(model, params, opt_state, tokens):
  def loss_fn(p):
    logits = model.apply({"params": p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = TX.update(grads, opt_state, params)
  return loss, optax.apply_updates(params, updates), opt_state


@functools.lru_cache(maxsize=None)
def _single_device_result():
  model = TinyLM()
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), _batch()[:, :-1]))["params"]
  return params, jax.jit(functools.partial(_train_step, model))(params, TX.init(params), _batch())


@functools.lru_cache(maxsize=None)
def _sharded_result(mesh_name):
  mesh = sharding.make_mesh(MESHES[mesh_name])
  model = TinyLM(mesh=mesh)
  variables, var_shardings = sharding.init_sharded(model.init, jax.random.key(0), _batch()[:, :-1], mesh=mesh)
  params, param_sh = variables["params"], var_shardings["params"]
  opt_sh = sharding.opt_state_shardings(TX, params, param_sh, mesh)
  opt_state = jax.jit(TX.init, out_shardings=opt_sh)(params)
  batch_sh = sharding.batch_sharding(mesh)

  def step(params, opt_state, tokens):
    with sharding.with_rules():
      return _train_step(model, params, opt_state, tokens)

  with sharding.use_mesh(mesh):
    train = jax.jit(step, in_shardings=(param_sh, opt_sh, batch_sh),
                    out_shardings=(sharding.replicated(mesh), param_sh, opt_sh))
    out = train(params, opt_state, jax.device_put(_batch(), batch_sh))
  return mesh, params, opt_state, out


def test_mesh_shape_fills_the_free_axis_and_rejects_bad_configs():
  assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}
  assert sharding.mesh_shape(None, 8)["data"] == 8
  for bad in ({"data": 3}, {"data": -1, "fsdp": -1}, {"model": 2}, {"data": 3, "fsdp": -1}):
    with pytest.raises(ValueError, match="mesh config"):
      sharding.mesh_shape(bad, 8)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape)["tensor"] == 2


def test_rules_map_parameters_and_activations():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  spec = lambda *names: sharding.logical_to_sharding(P(*names), mesh).spec
  assert spec("embed", "mlp") == P("fsdp", "tensor")
  assert spec("embed", "heads", "kv") == P("fsdp", "tensor", None)
  assert spec("batch", "length", "embed") == P(("data", "fsdp"), "sequence", None)  # fsdp taken by batch
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_parameters_are_laid_out_by_the_rules(mesh_name):
  mesh, params, _, _ = _sharded_result(mesh_name)
  fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
  up, out = params["up"]["kernel"], params["out"]["kernel"]
  assert up.sharding.spec == P("fsdp", "tensor") and out.sharding.spec == P("tensor", None, "fsdp")
  assert params["embedding"].sharding.spec == P("tensor", "fsdp")
  per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  assert per_device * fsdp * tensor == total  # every parameter has an fsdp and a tensor dimension
  assert up.addressable_shards[0].data.shape == (D // fsdp, MLP // tensor)


def test_optimizer_state_follows_the_parameters():
  _, params, opt_state, _ = _sharded_result("data2_fsdp2_tensor2")
  mu = opt_state[0].mu
  assert jax.tree.map(lambda a, b: a.sharding == b.sharding, mu, params) == jax.tree.map(lambda _: True, params)
  assert opt_state[0].count.sharding.is_fully_replicated


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_train_step_equals_single_device(mesh_name):
  params0, (loss0, params1, _) = _single_device_result()
  _, params, _, (loss, new_params, _) = _sharded_result(mesh_name)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)  # same initialisation
  np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_distributed_start_up_only_on_multi_host_platforms():
  assert not sharding.is_multi_host_platform({})
  assert not sharding.is_multi_host_platform({"TPU_WORKER_HOSTNAMES": "localhost"})
  assert sharding.is_multi_host_platform({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
  assert sharding.is_multi_host_platform({"SLURM_NTASKS": "4"})
  assert not sharding.maybe_initialize_distributed({})
  assert sharding.host_batch_slice(16) == slice(0, 16)


if jax.device_count() < 8 and not os.environ.get("MIXERS_FRESH_PROCESS"):
  # jax started before this module set XLA_FLAGS: run the module again in a process of its own.
  for _name in [n for n in list(globals()) if n.startswith("test_")]:
    del globals()[_name]

  def test_module_on_eight_devices_in_fresh_process():
    env = dict(os.environ, MIXERS_FRESH_PROCESS="1",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          __file__], env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
