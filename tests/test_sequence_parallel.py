"""Ulysses sequence parallelism: on 8 fake devices, the same outputs and gradients as one."""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_model import make_batch, randomize

from mirage_jax import config, flow, sharding
from mirage_jax.config import DEFAULT_RULES
from mirage_jax.model import attention as attn
from mirage_jax.model.dit import DiT
from mirage_jax.model.tokens import batch_to_streams

TOL = 1e-5


def mesh_of(text):
    """'fsdp=2,sequence=4' -> a mesh of all 8 devices (unnamed axes 1)."""
    sizes = dict.fromkeys(sharding.MESH_AXES, 1)
    sizes.update({k: int(v) for k, v in (item.split("=") for item in text.split(","))})
    return sharding.make_mesh(sizes)


def tiny(*overrides):
    """configs/tiny.py with 8 heads of 8 (any sequence axis up to 8 divides them); its joint
    sequence is 64 ref + 16 text + 4 audio + 256 video = 340 tokens (padded to 344 at S=8)."""
    return config.load(REPO / "configs/tiny.py",
                       ["model.num_heads=8", "model.head_dim=8", *overrides])


@functools.cache
def tiny_model():
    """The model of `tiny()` with random weights, built once, in one jit (eager: 2x slower)."""
    return nnx.jit(lambda: randomize(DiT(tiny(), nnx.Rngs(0))))()


def loss_and_grads(mesh=None):
    """(loss, velocities), parameter gradients of one fixed batch, noise and time draw;
    under `mesh`, with parameters and batch sharded by the rules."""
    model = tiny_model()
    cfg, (graphdef, params) = model.cfg, nnx.split(model, nnx.Param)
    params, batch = nnx.to_pure_dict(params), make_batch(cfg)

    def loss(params, batch):
        noised, targets, weights = flow.training_inputs(
            jax.random.key(3), batch_to_streams(batch, cfg), cfg)
        velocity = nnx.merge(graphdef, params)(noised)
        return flow.loss_fn(velocity, targets, weights)[0], velocity

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if mesh is None:
        return fn(params, batch)
    rules = cfg.sharding_rules
    with jax.set_mesh(mesh):
        params = jax.device_put(params, sharding.param_shardings(model, params, mesh, rules))
        batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
        compiled = fn.lower(params, batch).compile()
        return compiled(params, batch), compiled.as_text()


@functools.cache
def unsharded():
    return loss_and_grads()


def max_diff(got, want):
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


@pytest.mark.parametrize("mesh", ["fsdp=2,sequence=4", "tensor=2,sequence=4", "sequence=8"])
def test_dit_sequence_parallel_equals_one_device(mesh):
    """Loss, velocities and every parameter gradient within 1e-5 (float32) of the unsharded
    model, with the all-to-alls in the compiled step."""
    ((loss, velocity), grads), hlo = loss_and_grads(mesh_of(mesh))
    (want_loss, want_velocity), want_grads = unsharded()
    np.testing.assert_allclose(loss, want_loss, rtol=TOL)
    assert max_diff(velocity, want_velocity) < TOL
    assert max_diff(grads, want_grads) < TOL
    assert "all-to-all" in hlo


def forward(cfg):
    """The DiT's forward as f(params, streams), parameters abstract, and a batch's streams."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: DiT(cfg, nnx.Rngs(0))))
    streams = batch_to_streams(make_batch(cfg), cfg)
    return lambda p, s: nnx.merge(graphdef, p)(s), params, streams


def test_attention_enters_sequence_sharded():
    """The shard_map of the attention takes q split over (data, fsdp) x sequence x tensor."""
    fn, params, streams = forward(tiny())
    with jax.set_mesh(mesh_of("fsdp=2,sequence=4")):
        jaxpr = jax.make_jaxpr(fn)(params, streams)
    specs = [e.params["in_specs"] for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "shard_map"]
    assert specs and all(s[0] == P(("data", "fsdp"), "sequence", "tensor", None) for s in specs)


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _eqns(sub)


@pytest.mark.parametrize("backend", ["xla", "blockwise", "flash_cpu"])
def test_ulysses_attention_with_key_bias_and_padding(backend):
    """37 tokens over sequence=4 (padded to 40), a masked-out example and a stitch bias."""
    ks = jax.random.split(jax.random.key(0), 6)
    q, k, v, w = (jax.random.normal(x, (2, 37, 8, 16)) for x in ks[:4])
    bias = jax.random.normal(ks[4], (2, 37, 8))
    mask = jax.random.bernoulli(ks[5], 0.6, (2, 37)).at[-1].set(False)
    cfg = SimpleNamespace(attention=backend, attention_block=16)
    loss = lambda *a: jnp.sum(attn.attend(*a[:3], mask, cfg, DEFAULT_RULES, a[3]) * w)
    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))
    want = fn(q, k, v, bias)
    mesh = mesh_of("data=2,sequence=4")
    with jax.set_mesh(mesh):
        spec = sharding.logical_to_mesh(("batch", None, "heads", None), DEFAULT_RULES)
        q, k, v = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))
        got = fn(q, k, v, bias)
    np.testing.assert_allclose(got[0], want[0], rtol=TOL)
    assert max_diff(got[1], want[1]) < TOL


def test_indivisible_heads_raise():
    fn, params, streams = forward(tiny("model.num_heads=4"))
    with jax.set_mesh(mesh_of("sequence=8")), pytest.raises(
            ValueError, match=r"model.num_heads=4 .* not divisible by 8; .*mesh.sequence"):
        jax.eval_shape(fn, params, streams)


def test_ulysses_runs_the_splash_kernel_per_device():
    """The TPU kernel (Pallas interpreter on CPU) as Ulysses' local backend."""
    ks = jax.random.split(jax.random.key(1), 5)
    q, k, v, w = (jax.random.normal(x, (2, 150, 4, 128)) for x in ks[:4])
    mask = jax.random.bernoulli(ks[4], 0.6, (2, 150)).at[:, 0].set(True)
    local = lambda q, k, v, m: attn._splash_local(q, k, v, m, 128, interpret=True)
    loss = lambda *a: jnp.sum(attn.ulysses(local, *a, mask, None, DEFAULT_RULES) * w)
    with jax.set_mesh(mesh_of("data=2,sequence=4")):
        got = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(lambda *a: jnp.sum(attn.reference(*a, mask) * w), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=TOL)
    assert max_diff(got[1], want[1]) < TOL
