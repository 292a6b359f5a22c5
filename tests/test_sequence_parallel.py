"""Sequence-parallel ops on 8 simulated CPU devices against single-device results and the float64 matrix form."""
import os
import subprocess
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from mixers import ops  # noqa: E402
from mixers.sharding import make_mesh, sequence_parallel  # noqa: E402
from mixers.sharding.hlo import collectives  # noqa: E402

B, H, K, V = 2, 3, 5, 6
T = 37  # not a multiple of the 4 sequence shards, slices of 10 not a multiple of the chunk
CHUNK = 4


def _inputs(t=T, decay="key", seed=0):
  r = np.random.RandomState(seed)
  q, k = (jnp.asarray(r.randn(B, t, H, K), jnp.float32) for _ in range(2))
  v = jnp.asarray(r.randn(B, t, H, V), jnp.float32)
  shapes = {"none": None, "head": (H,), "token": (B, t, H), "key": (B, t, H, K)}
  g = None if shapes[decay] is None else jnp.asarray(-0.5 * r.rand(*shapes[decay]), jnp.float32)
  return q, k, v, g


@functools.lru_cache(maxsize=None)
def _mesh():
  return make_mesh({"data": 2, "sequence": 4})


@functools.lru_cache(maxsize=None)
def _sp_fn(causal, normalize, with_state):
  la = sequence_parallel(ops.linear_attention, _mesh())

  def f(q, k, v, g, s0):
    return la(q, k, v, causal=causal, log_decay=g, normalize=normalize, initial_state=s0,
              return_state=with_state, chunk_size=CHUNK, impl="chunked")
  return jax.jit(f)


def _mixing_matrix(q, k, g, causal):
  """numpy M `[B,H,T,S]`: scale q_t . (w_ts k_s), w_ts = exp(G_t - G_s) for s <= t and 0 after t (non-causal:
  exp(-|G_t - G_s|) everywhere), G the cumulative log-decay `[B,T,H,K]`."""
  t = q.shape[1]
  cum = np.zeros(q.shape) if g is None else np.cumsum(np.broadcast_to(g if g.ndim == 4 else g[..., None], q.shape),
                                                      axis=1)
  diff = cum[:, :, None] - cum[:, None, :]  # G_t - G_s, [B,T,S,H,K]
  if causal:
    keep = np.tril(np.ones((t, t), bool))[None, :, :, None, None]
    w = np.exp(np.where(keep, diff, -np.inf))
  else:
    w = np.exp(-np.abs(diff))
  return K ** -0.5 * np.einsum("bthk,bshk,btshk->bhts", q, k, w)


def _oracle(q, k, v, g, s0=None, *, causal=True, normalize=False, eps=1e-6):
  """float64 materialised matrix (numpy): o = M v (+ the initial state's share), normalised by M 1."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  g = None if g is None else np.asarray(g, np.float64)
  if g is not None and g.ndim == 1:
    g = np.broadcast_to(g, q.shape[:3])
  m = _mixing_matrix(q, k, g, causal)
  vv = np.concatenate([v, np.ones(v.shape[:-1] + (1,))], -1) if normalize else v
  o = np.einsum("bhts,bshv->bthv", m, vv)
  if s0 is not None:
    s = np.asarray(s0[0] if normalize else s0, np.float64)
    if normalize:
      s = np.concatenate([s, np.asarray(s0[1], np.float64)[..., None]], -1)
    cum = np.zeros(q.shape) if g is None else np.cumsum(g if g.ndim == 4 else g[..., None], axis=1)
    o = o + K ** -0.5 * np.einsum("bthk,bhkv->bthv", q * np.exp(cum), s)
  if normalize:
    o = o[..., :-1] / (o[..., -1:] + eps)
  return np.asarray(o)


@functools.lru_cache(maxsize=None)
def _single_fn(causal, normalize, with_state):
  """The one-device op (jitted: eager dispatch of the chunked form costs more than compiling it)."""
  def f(q, k, v, g, s0):
    return ops.linear_attention(q, k, v, causal=causal, log_decay=g, normalize=normalize, initial_state=s0,
                                return_state=with_state, impl="chunked")
  return jax.jit(f)


def _close(a, b, tol=2e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-12)
  assert err < tol, f"relative RMS error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("decay", ["none", "head", "token", "key"])
def test_causal_matches_matrix_form_and_final_state(decay):
  q, k, v, g = _inputs(decay=decay)
  o, state = _sp_fn(True, False, True)(q, k, v, g, None)
  assert o.shape == (B, T, H, V) and state.shape == (B, H, K, V)
  _close(o, _oracle(q, k, v, g))
  _, ref_state = _single_fn(True, False, True)(q, k, v, g, None)
  _close(state, ref_state)


def test_padding_a_whole_number_of_slices_leaves_the_final_state_undecayed():
  """T=9 over 4 shards: slices of 3 and 3 padding tokens, which a per-head decay must not reach."""
  q, k, v, g = _inputs(t=9, decay="head", seed=13)
  o, state = _sp_fn(True, False, True)(q, k, v, g, None)
  _close(o, _oracle(q, k, v, g))
  _close(state, _single_fn(True, False, True)(q, k, v, g, None)[1])


@pytest.mark.parametrize("decay", ["none", "key"])
def test_non_causal_matches_matrix_form(decay):
  q, k, v, g = _inputs(decay=decay, seed=1)
  o = _sp_fn(False, False, False)(q, k, v, g, None)
  _close(o, _oracle(q, k, v, g, causal=False))


def test_normalized_with_initial_state_splits_like_one_pass():
  q, k, v, g = _inputs(decay="token", seed=2)
  elu_plus_one = lambda a: jnp.asarray(np.where(a > 0, a + 1.0, np.exp(np.minimum(a, 0.0))), jnp.float32)  # numpy
  k = elu_plus_one(np.asarray(k))
  q = elu_plus_one(np.asarray(q))
  r = np.random.RandomState(3)
  s0 = (jnp.asarray(r.rand(B, H, K, V), jnp.float32), jnp.asarray(r.rand(B, H, K) + 1, jnp.float32))
  o, (s, z) = _sp_fn(True, True, True)(q, k, v, g, s0)
  _close(o, _oracle(q, k, v, g, s0, normalize=True))
  _, (s_ref, z_ref) = _single_fn(True, True, True)(q, k, v, g, s0)
  _close(s, s_ref)
  _close(z, z_ref)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_equal_single_device(causal):
  q, k, v, g = _inputs(decay="key", seed=4)
  cot = jnp.asarray(np.random.RandomState(5).randn(B, T, H, V), jnp.float32)
  sp = _sp_fn(causal, False, False)
  single = lambda q, k, v, g: ops.linear_attention(q, k, v, causal=causal, log_decay=g, impl="chunked")
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(sp(*a, None) * cot), argnums=(0, 1, 2, 3)))(q, k, v, g)
  want = jax.jit(jax.grad(lambda *a: jnp.sum(single(*a) * cot), argnums=(0, 1, 2, 3)))(q, k, v, g)
  for name, a, b in zip("qkvg", grads, want):
    assert a.shape == b.shape, name
    _close(a, b, tol=5e-5)


def test_sharded_inputs_stay_sharded_along_time():
  q, k, v, g = _inputs(t=40, decay="token")
  seq = NamedSharding(_mesh(), P("data", "sequence"))
  q, k, v, g = (jax.device_put(a, seq) for a in (q, k, v, g))
  o = _sp_fn(True, False, False)(q, k, v, g, None)
  assert o.sharding.spec[:2] == ("data", "sequence")
  assert {s.data.shape for s in o.addressable_shards} == {(1, 10, H, V)}


def _step_hlo(t):
  """Compiled HLO of forward + backward of a sequence-parallel linear attention with per-key decay."""
  sp = _sp_fn(True, False, False)
  seq = NamedSharding(_mesh(), P("data", "sequence"))
  loss = lambda q, k, v, g: jnp.sum(sp(q, k, v, g, None) ** 2)
  args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=seq)
          for s in ((B, t, H, K), (B, t, H, K), (B, t, H, V), (B, t, H, K))]
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile().as_text()


def test_collectives_carry_states_only_and_do_not_grow_with_length():
  short, long = collectives(_step_hlo(64)), collectives(_step_hlo(1024))
  assert short, "a sequence-parallel step must communicate its states"
  assert sorted(c[1] for c in short) == sorted(c[1] for c in long)
  state_bytes = 4 * (B // 2) * H * K * V  # one device's [B,H,K,V] float32 state
  for kind, nbytes, shapes in long:
    assert nbytes <= 4 * state_bytes, f"{kind} of {shapes} moves more than the four gathered states"
    assert all(1024 // 4 not in s and 1024 not in s for _, s in shapes), f"{kind} of {shapes} carries activations"
  assert any(kind == "all-gather" and (4, 1, H, K, V) in [s for _, s in shapes] for kind, _, shapes in long)


def _ssd_inputs(seed=6, g=2, n=5, p=3):
  r = np.random.RandomState(seed)
  f = lambda *shape: jnp.asarray(r.randn(*shape), jnp.float32)
  pair = lambda make: (make(), make())
  softplus = lambda *shape: jnp.asarray(np.logaddexp(0.0, r.randn(*shape)), jnp.float32)  # numpy: no eager compile
  return dict(x=f(B, T, 4, p), dt=pair(lambda: softplus(B, T, 4)), A=jnp.asarray(-np.exp(r.randn(4)), jnp.float32),
              B=pair(lambda: f(B, T, g, n)), C=pair(lambda: f(B, T, g, n)), D=f(B, T, 4), s0=f(B, 4, p, n))


@pytest.mark.parametrize("causal", [True, False])
def test_ssd_equals_single_device(causal):
  from mixers.ops.ssd import ssd  # pylint: disable=import-outside-toplevel
  a = _ssd_inputs()
  kw = dict(D=a["D"], causal=causal, chunk_size=CHUNK, impl="chunked")
  if causal:
    kw.update(initial_state=a["s0"], return_state=True)
  sp = sequence_parallel(ssd, _mesh())
  args = (a["x"], a["dt"][0], a["A"], a["B"][0], a["C"][0])
  got, want = jax.jit(lambda *z: sp(*z, **kw))(*args), jax.jit(lambda *z: ssd(*z, **kw))(*args)
  for u, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _close(u, w)


def test_quasiseparable_equals_matrix_form_with_gradients():
  from mixers.ops.quasiseparable import quasiseparable  # pylint: disable=import-outside-toplevel
  a = _ssd_inputs(seed=7)
  sp = sequence_parallel(quasiseparable, _mesh())
  cot = jnp.asarray(np.random.RandomState(8).randn(*a["x"].shape), jnp.float32)
  run = lambda f, impl: (lambda x, dt, bc: jnp.sum(cot * f(x, dt, a["A"], bc[0], bc[1], D=a["D"], chunk_size=CHUNK,
                                                              impl=impl)))
  args = (a["x"], a["dt"], (a["B"], a["C"]))
  loss, grads = jax.jit(jax.value_and_grad(run(sp, "chunked"), argnums=(0, 1, 2)))(*args)
  loss_ref, grads_ref = jax.jit(jax.value_and_grad(run(quasiseparable, "reference"), argnums=(0, 1, 2)))(*args)
  _close(loss, loss_ref)
  for u, w in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    _close(u, w, tol=5e-5)


def test_quasiseparable_lengths_count_global_positions():
  """`lengths` marks real tokens by their position in the whole sequence, not in a device's slice."""
  from mixers.ops.quasiseparable import quasiseparable  # pylint: disable=import-outside-toplevel
  a = _ssd_inputs(seed=12)
  lengths = jnp.asarray([T, 23])
  kw = dict(D=a["D"], lengths=lengths, chunk_size=CHUNK, impl="chunked")
  args = (a["x"], a["dt"], a["A"], a["B"], a["C"])
  got = jax.jit(lambda *z: sequence_parallel(quasiseparable, _mesh())(*z, **kw))(*args)
  _close(got, jax.jit(lambda *z: quasiseparable(*z, **kw))(*args))
  assert float(np.abs(np.asarray(got)[1, 23:]).max()) == 0.0


def test_bad_arguments_raise_value_errors():
  with pytest.raises(ValueError, match="no form for op"):
    sequence_parallel(ops.attention, _mesh())
  with pytest.raises(ValueError, match="not a mesh axis"):
    sequence_parallel(ops.linear_attention, _mesh(), axis="context")
  q, k, v, _ = _inputs(t=8)
  la = sequence_parallel(ops.linear_attention, _mesh())
  with pytest.raises(ValueError, match="log_decay"):
    la(q, k, v, log_decay=jnp.zeros((B, 8)))
  with pytest.raises(ValueError, match="return_state"):
    la(q, k, v, causal=False, return_state=True)



@pytest.mark.parametrize("causal", [True, False])
def test_lightnet_equals_single_device_with_state_and_gradients(causal):
  """Masked keys, MD-LRPE phases and an initial state; loss on the outputs and the returned state."""
  from mixers.ops.lightnet import lightnet  # pylint: disable=import-outside-toplevel
  r = np.random.RandomState(9)
  f = lambda *shape: jnp.asarray(r.randn(*shape), jnp.float32)
  q, k, v = f(B, T, H, K), 3 * f(B, T, H, K), f(B, T, H, V)
  mask, phases = jnp.asarray(r.rand(B, T) > 0.3), f(1, T, 1, K)
  s0 = (f(B, H, 2 * K, V), f(B, H, K))
  cot = (f(B, T, H, V), f(B, H, 2 * K, V), f(B, H, K))
  kw = dict(causal=causal, mask=mask, phases=phases, return_state=True, chunk_size=CHUNK, impl="chunked")

  def loss(op):
    def run(q, k, v, s0):
      o, (s, z) = op(q, k, v, initial_state=s0, **kw)
      return jnp.sum(o * cot[0]) + jnp.sum(s * cot[1]) + jnp.sum(z * cot[2]), (o, s, z)
    return jax.value_and_grad(run, argnums=(0, 1, 2, 3), has_aux=True)

  (_, got), grads = jax.jit(loss(sequence_parallel(lightnet, _mesh())))(q, k, v, s0)
  (_, want), grads_ref = jax.jit(loss(lightnet))(q, k, v, s0)
  assert got[0].shape == (B, T, H, V)
  for u, w in zip(jax.tree.leaves((got, grads)), jax.tree.leaves((want, grads_ref))):
    assert u.shape == w.shape
    _close(u, w, tol=5e-5)


def test_delta_rule_equals_single_device_with_state_and_gradients():
  """Gated delta rule with an initial state: outputs, final state and gradients (q, k, v, beta, log_decay, S_0);
  DeltaNet from zero."""
  from mixers.ops.delta_rule import delta_rule  # pylint: disable=import-outside-toplevel
  r = np.random.RandomState(14)
  f = lambda *shape: jnp.asarray(r.randn(*shape), jnp.float32)
  q, k, v = f(B, T, H, K), r.randn(B, T, H, K), f(B, T, H, V)
  k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), jnp.float32)  # numpy: no eager compiles
  beta = jnp.asarray(1 / (1 + np.exp(-r.randn(B, T, H))), jnp.float32)
  g, s0 = jnp.asarray(-0.3 * np.abs(r.randn(B, T, H)), jnp.float32), f(B, H, K, V)
  cot = (f(B, T, H, V), f(B, H, K, V))

  def loss(op):
    def run(*a):
      o, s = op(*a[:4], log_decay=a[4], initial_state=a[5], return_state=True, chunk_size=CHUNK)
      return jnp.sum(o * cot[0]) + jnp.sum(s * cot[1]), (o, s)
    return jax.jit(jax.value_and_grad(run, argnums=tuple(range(6)), has_aux=True))

  (_, got), grads = loss(sequence_parallel(delta_rule, _mesh()))(q, k, v, beta, g, s0)
  (_, want), grads_ref = loss(delta_rule)(q, k, v, beta, g, s0)
  assert got[0].shape == (B, T, H, V)
  for u, w in zip(jax.tree.leaves((got, grads)), jax.tree.leaves((want, grads_ref))):
    assert u.shape == w.shape
    _close(u, w, tol=5e-5)
  plain = jax.jit(lambda *a: sequence_parallel(delta_rule, _mesh())(*a, chunk_size=CHUNK))(q, k, v, beta)
  _close(plain, jax.jit(lambda *a: delta_rule(*a, chunk_size=CHUNK))(q, k, v, beta))  # no gate, no initial state


def test_layers_run_sequence_parallel_under_a_sequence_mesh():
  """A GLA / Mamba2 / LightNet LM applied under a (data=2, sequence=4) mesh equals one device, and its
  compiled program all-gathers per-slice states `[P,B,H,K,V]` (the layers went sequence-parallel)."""
  from mixers import sharding  # pylint: disable=import-outside-toplevel
  from mixers.models import build_model, default_config  # pylint: disable=import-outside-toplevel
  config = default_config()
  config.update(mixer="gla,mamba2,lightnet", num_layers=3, d_model=32, vocab_size=64)
  model = build_model(config)
  tokens = jnp.asarray(np.random.RandomState(10).randint(0, 64, (4, 32)), jnp.int32)
  mesh = _mesh()
  variables, _ = sharding.init_sharded(model.init, jax.random.key(0), tokens, mesh=mesh)
  want = jax.jit(model.apply)(jax.device_get(variables), tokens)
  with sharding.use_mesh(mesh):
    sharded_tokens = jax.device_put(tokens, NamedSharding(mesh, P("data", "sequence")))
    apply = jax.jit(model.apply).lower(variables, sharded_tokens).compile()
    got, hlo = apply(variables, sharded_tokens), apply.as_text()
  _close(got, want, tol=1e-4)
  gathered = [shape for kind, _, shapes in collectives(hlo) if kind == "all-gather" for _, shape in shapes]
  states = {shape for shape in gathered if len(shape) == 5 and shape[0] == 4}
  assert len(states) == 3, f"expected one gathered state shape per mixer, got {sorted(set(gathered))}"


def test_layer_decoding_under_a_sequence_mesh_matches_the_forward():
  """A prompt of 8 tokens (split over the 4 sequence shards, from the zero cache) then one token (too short
  to split: the plain op) continue the LightNet layer's full forward."""
  from mixers import sharding  # pylint: disable=import-outside-toplevel
  from mixers.registry import build_mixer  # pylint: disable=import-outside-toplevel
  layer = build_mixer("lightnet")
  x = jnp.asarray(np.random.RandomState(11).randn(4, 9, 16), jnp.float32)
  variables = jax.jit(layer.init)(jax.random.key(0), x)
  want = jax.jit(layer.apply)(variables, x)
  cache = jax.jit(functools.partial(layer.init, decode=True))(jax.random.key(0), x[:, :8])["cache"]
  step = jax.jit(lambda cache, x: layer.apply(dict(variables, cache=cache), x, decode=True, mutable=["cache"]))
  with sharding.use_mesh(_mesh()):
    prompt, cache = step(cache, x[:, :8])
    last, _ = step(cache["cache"], x[:, 8:])
  _close(jnp.concatenate([prompt, last], axis=1), want)

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
