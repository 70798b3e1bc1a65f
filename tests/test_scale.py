"""Pod scale: the 1B/10B configs, attention backends, the planner and the launch scripts."""

import json
import subprocess
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import nnx
from jax.sharding import NamedSharding
from test_model import make_batch, randomize

from mirage_jax import cli, config, plan, sharding
from mirage_jax.config import DEFAULT_RULES
from mirage_jax.model import attention as attn
from mirage_jax.model.tokens import video_shape
from mirage_jax.model.vae import VAE
from mirage_jax.train import state as state_lib
from mirage_jax.train.loop import tokens_per_example
from mirage_jax.train.step import batch_loss


def load(name, *overrides):
    return config.load(REPO / "configs" / f"{name}.py", list(overrides))


@pytest.mark.parametrize("name,target", [("mirage_1b", 1e9), ("mirage_10b", 1e10)])
def test_mirage_sizes(name, target):
    """Parameter counts within 5 % of 1B and 10B, through eval_shape (nothing allocated);
    4 s of 720p is 26 latent frames of 45 x 80 patches, 97,560 tokens in all."""
    cfg = load(name)
    assert abs(state_lib.count_params(cfg) / target - 1) < 0.05
    assert video_shape(cfg) == (26, 90, 160, 12)
    assert tokens_per_example(cfg) == 26 * 3600 + 3600 + 26 * 4 + 256 == 97_560
    assert cfg.vae.to_dict() == load("vae_720p").vae.to_dict()


def test_vae_720p_codes_the_dit_latents():
    vae_cfg, dit_cfg = load("vae_720p"), load("mirage_10b")
    vae = nnx.eval_shape(lambda: VAE(vae_cfg, nnx.Rngs(0)))
    clip = jax.ShapeDtypeStruct((1, 101, 720, 1280, 3), jnp.float32)
    graphdef, weights = nnx.split(vae)
    mean, _ = jax.eval_shape(lambda w, x: nnx.merge(graphdef, w).encode(x), weights, clip)
    assert mean.shape == (1, *video_shape(dit_cfg))
    assert 0.1e9 < state_lib.count_params(vae_cfg) < 0.2e9


def _qkv(b=3, n=37, h=2, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q, k, v, w = (jax.random.normal(x, (b, n, h, d)) for x in ks[:4])
    mask = jax.random.bernoulli(ks[4], 0.6, (b, n)).at[0, 0].set(True)
    return q, k, v, w, mask.at[-1].set(False)  # the last example has no valid key at all


def _check_equal(fn, q, k, v, w, mask, tol=1e-5):
    np.testing.assert_allclose(fn(q, k, v, mask), attn.reference(q, k, v, mask), atol=tol)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, mask) * w)
    want = jax.grad(loss(attn.reference), (0, 1, 2))(q, k, v)
    got = jax.grad(loss(fn), (0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=tol)


@pytest.mark.parametrize("n,block", [(37, 16), (64, 16), (20, 512)])
def test_blockwise_equals_reference(n, block):
    """Outputs and gradients, with masked keys, a length no block divides, one block."""
    _check_equal(jax.jit(lambda *a: attn.blockwise(*a, block)), *_qkv(n=n))


@pytest.mark.parametrize("n,d", [(37, 16), (130, 32), (64, 64), (20, 128)])
def test_flash_cpu_equals_reference(n, d):
    """The fused C++ kernel: outputs and gradients, masked keys, a fully masked example,
    lengths off and on its 64-row blocks, every head_dim it is built for."""
    _check_equal(jax.jit(attn.flash_cpu), *_qkv(n=n, d=d))


def test_flash_cpu_key_bias_gradient_and_mesh():
    """A stitch's key bias and its gradient, on a 2x2 (batch, heads) mesh, where the custom
    call runs per shard; the FLOP counter counts the kernel's matmuls."""
    q, k, v, w, mask = _qkv(b=2, n=70, h=2, d=32)
    bias = jax.random.normal(jax.random.key(7), (2, 70, 2))
    cfg = SimpleNamespace(attention="flash_cpu", attention_block=512)
    loss = lambda f: lambda q, k, v, b: jnp.sum(f(q, k, v, b) * w)
    flash = loss(lambda *a: attn.attend(*a[:3], mask, cfg, DEFAULT_RULES, a[3]))
    want = jax.value_and_grad(loss(lambda *a: attn.reference(*a[:3], mask, a[3])),
                              (0, 1, 2, 3))(q, k, v, bias)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "sequence": 1},
                              jax.devices()[:4])
    spec = sharding.logical_to_mesh(("batch", None, "heads", None), DEFAULT_RULES)
    grad = jax.jit(jax.value_and_grad(flash, (0, 1, 2, 3)))
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
        got = grad(*args, bias)
        flops = plan.count_flops(jax.make_jaxpr(grad)(*args, bias))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, r in zip(got[1], want[1]):
        np.testing.assert_allclose(g, r, atol=1e-5)
    assert flops == 2 * 7 * 2 * 2 * 70 * 70 * 32  # forward 2 matmuls, backward 5


def test_flash_cpu_names_a_head_dim_it_lacks():
    with pytest.raises(ValueError, match="head_dim in .* got model.head_dim=8"):
        attn.flash_cpu(*_qkv(d=8)[:3], _qkv()[4])


def test_flash_cpu_without_a_compiler_says_so(tmp_path, monkeypatch):
    from mirage_jax.model import flash_cpu

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("MIRAGE_JAX_CACHE", str(tmp_path / "cache"))  # nothing built there
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler .* model.attention='xla'"):
        flash_cpu.library_path()


def test_splash_kernel_equals_reference_in_interpret_mode():
    """The TPU kernel's wrapper (scale, segment ids from the key mask, padding to blocks,
    shard_map over batch and heads) run by the Pallas interpreter on CPU, on a 2x2 mesh."""
    q, k, v, w, mask = _qkv(b=2, n=200, h=2, d=128)
    mask = mask.at[-1, :5].set(True)  # splash needs a valid key per row
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "sequence": 1},
                              jax.devices()[:4])
    spec = sharding.logical_to_mesh(("batch", None, "heads", None), DEFAULT_RULES)
    fn = jax.jit(lambda q, k, v, m: attn.splash(q, k, v, m, DEFAULT_RULES, 128, interpret=True))
    with jax.set_mesh(mesh):
        q, k, v = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))
        _check_equal(fn, q, k, v, w, mask)


@pytest.mark.parametrize("backend", ["cudnn", "splash"])
def test_accelerator_backends_refuse_cpu(backend):
    cfg = load("tiny", f"model.attention={backend}")
    graphdef, weights = nnx.split(state_lib.abstract_model(cfg))
    loss = lambda w: batch_loss(nnx.merge(graphdef, w), make_batch(cfg), jax.random.key(0), cfg)
    with pytest.raises(ValueError, match=f"model.attention='{backend}' runs on"):
        jax.eval_shape(loss, weights)


@pytest.mark.parametrize("backend", ["blockwise", "flash_cpu"])
def test_dit_with_attention_backend_equals_xla(backend):
    """The backend is wired into the model: same loss and gradients as the reference."""
    cfgs = [load("tiny", f"model.attention={a}", "model.attention_block=128")  # 340 tokens
            for a in ("xla", backend)]
    batch, key = make_batch(cfgs[0]), jax.random.key(3)
    results = []
    for cfg in cfgs:
        model = randomize(state_lib.MODELS["dit"](cfg, nnx.Rngs(0)))
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p, g=graphdef, c=cfg: batch_loss(nnx.merge(g, p), batch, key, c)[0]
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_count_flops_multiplies_loops():
    """XLA's cost_analysis counts a scan body once; the planner's jaxpr count does not."""

    def layers(x, w):
        return jax.lax.scan(lambda x, wi: (jnp.tanh(x @ wi), None), x, w)[0]

    x, w = jnp.ones((4, 6)), jnp.ones((5, 6, 6))
    assert plan.count_flops(jax.make_jaxpr(layers)(x, w)) == 5 * 2 * 4 * 6 * 6
    img, ker = jnp.ones((1, 3, 8, 8)), jnp.ones((5, 3, 3, 3))
    conv = jax.make_jaxpr(lambda a, b: jax.lax.conv(a, b, (1, 1), "SAME"))(img, ker)
    assert plan.count_flops(conv) == 2 * 5 * 8 * 8 * 3 * 3 * 3
    # A stride-2 conv's backward is two convs of the forward's cost (input and kernel
    # gradients); the input gradient's inserted zeros are not FLOPs.
    img = jnp.ones((2, 4, 16, 16))
    strided = lambda a, b: jax.lax.conv(a, b, (2, 2), "SAME").sum()  # noqa: E731
    fwd = plan.count_flops(jax.make_jaxpr(strided)(img, ker[:, :1].repeat(4, 1)))
    both = plan.count_flops(jax.make_jaxpr(jax.grad(strided, (0, 1)))(img, ker[:, :1].repeat(4, 1)))
    assert fwd == 2 * 2 * 5 * 8 * 8 * 4 * 3 * 3
    assert both == pytest.approx(3 * fwd, rel=1e-6)


def test_plan_cli_tiny(tmp_path, capsys):
    """`mirage-jax plan` on 8 simulated devices: per-device bytes follow the shardings."""
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--config", str(REPO / "configs/tiny.py"), "--mesh",
                     "data=2,fsdp=4", "--chips", "v5p,h100", "--step-time", "2",
                     "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "optimizer state" in text and "h100" in text and "v5e" not in text
    r = json.loads(out.read_text())
    cfg = load("tiny")
    param_bytes = 4 * state_lib.count_params(cfg)
    assert param_bytes / 4 <= r["params_bytes"] < param_bytes / 2  # fsdp=4 shards most
    assert r["ema_bytes"] == r["params_bytes"]
    assert abs(r["opt_state_bytes"] - 2 * r["params_bytes"]) < 64  # Adam's mu, nu (+ counts)
    batch = plan.abstract_batch(cfg)
    assert r["batch_bytes"] * 8 == sum(x.size * x.dtype.itemsize for x in batch.values())
    assert r["temp_bytes"] > 0 and r["total_bytes"] >= r["argument_bytes"]
    assert r["flops"] == r["flops_compiled"] > 0  # tiny: no remat, reference attention
    chip = r["chips"]["h100"]
    np.testing.assert_allclose(chip["step_s_at_40"], r["flops"] / 8 / (0.4 * 989e12))
    np.testing.assert_allclose(chip["mfu_needed"], r["flops"] / 8 / (2 * 989e12))
    assert chip["fits"]


def test_plan_flops_independent_of_scan_and_count_remat():
    cfg = load("tiny")
    flops = {}
    for scan, remat in [(True, "none"), (False, "none"), (True, "full")]:
        c = config.apply_overrides(cfg, [f"model.scan_layers={scan}", f"model.remat={remat}"])
        s = state_lib.setup(c, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1),
                                                 ("data", "fsdp", "tensor", "sequence")))
        flops[scan, remat] = plan.model_flops(c, s, plan.abstract_batch(c))
    # Within 3 % (scan's partial evaluation computes a few things twice); counting a loop
    # body once would halve the layers' share at depth 2.
    np.testing.assert_allclose(flops[True, "none"], flops[False, "none"], rtol=0.03)
    hw, model = flops[True, "full"]
    assert model == flops[True, "none"][0] and 1.2 * model < hw < 1.5 * model  # + a forward
    c = config.apply_overrides(cfg, ["model.attention=blockwise"])
    hw, model = plan.model_flops(c, s, plan.abstract_batch(c))
    assert model == flops[True, "none"][1] < hw  # the blockwise backward recomputes


def test_plan_mesh_errors():
    with pytest.raises(ValueError, match="axis=size"):
        plan.parse_mesh("data=2,pipeline=4")
    with pytest.raises(ValueError, match="needs 16 devices"):
        plan.simulate_devices(16)


def test_launch_scripts_parse():
    for script in ("tpu_pod.sh", "gpu_slurm.sbatch", "local.sh"):
        proc = subprocess.run(["bash", "-n", str(REPO / "launch" / script)],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr


def _rotary(b, n, h, d, seed=3):
    """Positions like the DiT's (frame, row, column) and learned-RoPE-sized frequencies."""
    kp, kf = jax.random.split(jax.random.key(seed))
    pos = jax.random.randint(kp, (b, n, 3), 0, 12).astype(jnp.float32)
    return pos, 0.3 * jax.random.normal(kf, (h, d // 2, 3))


def _assert_freq_grad_close(got, want):
    """The frequencies' gradient sums B x N float32 terms per entry: 2e-5 of its scale."""
    np.testing.assert_allclose(got, want, atol=2e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("n,d", [(37, 16), (130, 64), (20, 128)])
def test_flash_cpu_rotates_like_rope(n, d):
    """RoPE inside the kernel equals the reference on `rope`-rotated q and k: outputs and the
    gradients of q, k, v and the frequencies, masked keys, a fully masked example, lengths off
    and past its 64-row blocks (head_dim 32: the mesh test below)."""
    q, k, v, w, mask = _qkv(n=n, d=d)
    pos, freqs = _rotary(*q.shape)

    def ref(q, k, v, f):
        return attn.reference(attn.rope(q, pos, f), attn.rope(k, pos, f), v, mask)

    fused = jax.jit(lambda q, k, v, f: attn.flash_cpu(q, k, v, mask, rope=(pos, f)))
    np.testing.assert_allclose(fused(q, k, v, freqs), ref(q, k, v, freqs), atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
    want = jax.grad(loss(ref), (0, 1, 2, 3))(q, k, v, freqs)
    got = jax.jit(jax.grad(loss(fused), (0, 1, 2, 3)))(q, k, v, freqs)
    for g, r in zip(got[:-1], want[:-1]):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-5)
    _assert_freq_grad_close(got[-1], want[-1])


def test_flash_cpu_rope_on_a_mesh():
    """`attend` with RoPE and a key bias on a 2x2 (batch, heads) mesh: positions split with
    the batch, frequencies with the heads, inside the kernel's shard_map."""
    q, k, v, w, mask = _qkv(b=2, n=70, h=2, d=32)
    bias = jax.random.normal(jax.random.key(7), (2, 70, 2))
    pos, freqs = _rotary(2, 70, 2, 32)
    cfg = SimpleNamespace(attention="flash_cpu", attention_block=512)
    loss = lambda f: lambda q, k, v, b, fr: jnp.sum(f(q, k, v, b, fr) * w)
    flash = loss(lambda q, k, v, b, fr: attn.attend(q, k, v, mask, cfg, DEFAULT_RULES, b,
                                                    (pos, fr)))
    ref = loss(lambda q, k, v, b, fr: attn.reference(attn.rope(q, pos, fr),
                                                     attn.rope(k, pos, fr), v, mask, b))
    want = jax.value_and_grad(ref, (0, 1, 2, 3, 4))(q, k, v, bias, freqs)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "sequence": 1},
                              jax.devices()[:4])
    spec = sharding.logical_to_mesh(("batch", None, "heads", None), DEFAULT_RULES)
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
        got = jax.jit(jax.value_and_grad(flash, (0, 1, 2, 3, 4)))(*args, bias, freqs)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, r in zip(got[1][:-1], want[1][:-1]):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-5)
    _assert_freq_grad_close(got[1][-1], want[1][-1])
