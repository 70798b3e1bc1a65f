"""Causal video VAE: shapes, causality, exact temporal tiling, it learns, loss and metrics."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import OPTIMIZED
from flax import nnx

from mirage_jax.model import vae as V


def make_cfg(**vae):
    d = V.vae_defaults()
    d.update(widths=(8, 16, 16))
    d.update(vae)
    return ml_collections.ConfigDict(
        {"vae": d, "model": {"dtype": "float32", "param_dtype": "float32"}})


def randomized(model, seed=0, scale=0.3):
    """Every parameter random (zero-initialised ones too), so no path is silently off."""
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = []
    for k, (path, x) in zip(keys, leaves):
        noise = scale * jax.random.normal(k, x.shape) / np.sqrt(max(np.prod(x.shape[:-1]), 1))
        new.append(noise + (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0))
    nnx.update(model, jax.tree.unflatten(tree, new))
    return model


def video(key, t, h=16, w=16):
    return jax.random.uniform(key, (2, t, h, w, 3), minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("r,s,widths,k", [(4, 8, (8, 16, 16), 0), (4, 8, (8, 16, 16), 1),
                                          (4, 8, (8, 16, 16), 2), (3, 4, (8, 16), 2),
                                          (2, 2, (8, 16), 1)])
def test_shapes(r, s, widths, k):
    cfg = make_cfg(temporal_factor=r, spatial_factor=s, widths=widths, latent_channels=5)
    model = V.VAE(cfg, nnx.Rngs(0))
    x = video(jax.random.key(0), 1 + k * r)
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (2, 1 + k, 16 // s, 16 // s, 5)
    assert mean.shape == model.latent_shape(x.shape)
    assert model.decode(mean).shape == x.shape
    with pytest.raises(ValueError, match="1 \\+ k"):
        model.encode(video(jax.random.key(0), 2 + k * r))


def test_causal():
    """Latent j sees frames up to j*r only; decoded frame t sees latents up to ceil(t/r)."""
    r = 4
    model = randomized(V.VAE(make_cfg(), nnx.Rngs(0)))
    encode = jax.jit(lambda x: model.encode(x)[0])
    decode = jax.jit(model.decode)
    x = video(jax.random.key(1), 1 + 3 * r)
    base = encode(x)
    for frame in (0, 1, 4, 5, 12):
        group = -(-frame // r)  # the latent frame that first sees `frame`
        y = encode(x.at[:, frame].add(0.5))
        assert np.array_equal(y[:, :group], base[:, :group]), frame
        assert np.all(np.abs(y[:, group:] - base[:, group:]).max(axis=(0, 2, 3, 4)) > 1e-4), frame
    base = decode(base)
    z = encode(x)
    for j in (0, 1, 2):
        first = 0 if j == 0 else (j - 1) * r + 1
        y = decode(z.at[:, j].add(0.5))
        assert np.array_equal(y[:, :first], base[:, :first]), j
        assert np.all(np.abs(y[:, first:] - base[:, first:]).max(axis=(0, 2, 3, 4)) > 1e-4), j


@pytest.mark.parametrize("tile", [1, 2, 3])
def test_tiled_equals_untiled(tile):
    """Jitted, as `mirage-jax encode` and the codec run them (eager, the tiles' hundreds of
    small ops compiled one by one took 33 s instead of 8.5 s for tile 1)."""
    model = randomized(V.VAE(make_cfg(), nnx.Rngs(0)), seed=1)
    x = video(jax.random.key(2), 1 + 6 * 4)
    mean, logvar = nnx.jit(lambda m, x: m.encode(x))(model, x)
    tmean, tlogvar = nnx.jit(lambda m, x: m.encode_tiled(x, tile_latents=tile))(model, x)
    assert tmean.shape == mean.shape
    np.testing.assert_allclose(tmean, mean, atol=1e-4)
    np.testing.assert_allclose(tlogvar, logvar, atol=1e-4)
    rec = nnx.jit(lambda m, z: m.decode(z))(model, mean)
    trec = nnx.jit(lambda m, z: m.decode_tiled(z, tile_latents=tile))(model, mean)
    assert trec.shape == rec.shape
    np.testing.assert_allclose(trec, rec, atol=1e-4)
    # Too little context is not exact: the automatic context is not larger than needed.
    if model.enc_context > 0:
        short = nnx.jit(lambda m, x: m.encode_tiled(
            x, tile_latents=tile, context=m.enc_context - 1)[0])(model, x)
        assert np.abs(short - mean).max() > 1e-4


def test_loss_parts_and_kl():
    cfg = make_cfg()
    model = V.VAE(cfg, nnx.Rngs(0))
    batch = {"video": (np.random.default_rng(0).integers(0, 256, (2, 5, 16, 16, 3))
                       .astype(np.uint8))}
    loss, parts = V.vae_loss(model, batch, jax.random.key(0), cfg)
    assert set(parts) >= {"l1", "l2", "kl", "psnr"}
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in parts.values())
    assert float(parts["kl"]) > 0.0
    # The KL formula against its closed form for one known posterior.
    kl = V.kl_divergence(jnp.full((4,), 1.0), jnp.full((4,), np.log(0.25)))
    np.testing.assert_allclose(kl, 0.5 * (1.0 + 0.25 - 1.0 - np.log(0.25)), rtol=1e-6)


def test_motion_weight_counts_moving_pixels_more():
    """A still clip loses nothing by the motion weight; an error on moving pixels costs more."""
    cfg0, cfg1 = make_cfg(), make_cfg(motion_weight=4.0)
    model = V.VAE(cfg0, nnx.Rngs(0))
    still = {"video": np.zeros((2, 5, 16, 16, 3), np.float32)}
    key = jax.random.key(0)
    np.testing.assert_allclose(V.vae_loss(model, still, key, cfg1)[1]["l1"],
                               V.vae_loss(model, still, key, cfg0)[1]["l1"], rtol=1e-6)
    moving = {"video": np.asarray(video(jax.random.key(1), 5))}
    assert V.vae_loss(model, moving, key, cfg1)[1]["l1"] > 1.5 * V.vae_loss(
        model, moving, key, cfg0)[1]["l1"]


def test_mouth_weight_counts_the_region_more():
    """Pixels inside `mouth_region` count 1 + mouth_weight times: over the whole frame that
    scales the reconstruction terms exactly; a bad region is refused by name."""
    key, clip = jax.random.key(0), {"video": np.asarray(video(jax.random.key(1), 5))}
    model = V.VAE(make_cfg(), nnx.Rngs(0))
    base = V.vae_loss(model, clip, key, make_cfg())[1]
    whole = V.vae_loss(model, clip, key, make_cfg(mouth_weight=3.0,
                                                  mouth_region=(0.0, 1.0, 0.0, 1.0)))[1]
    part = V.vae_loss(model, clip, key, make_cfg(mouth_weight=3.0))[1]
    for k in ("l1", "l2"):
        np.testing.assert_allclose(whole[k], 4.0 * base[k], rtol=1e-5)
        assert base[k] < part[k] < whole[k]
    mask = V.region_mask((0.5, 0.75, 0.25, 0.75), 16, 16)
    assert mask.shape == (16, 16, 1) and float(mask.sum()) == 4 * 8
    assert float(mask[8:12, 4:12].min()) == 1.0
    with pytest.raises(ValueError, match="mouth_region"):
        V.region_mask((0.8, 0.2, 0.0, 1.0), 16, 16)


def test_adversarial_terms_train_their_own_side():
    """One loss, one optimizer: the generator term moves only the VAE, the critic's hinge
    loss only the critic (each sees the other through stop_gradient)."""
    cfg = make_cfg(adversarial_weight=0.1)
    model = randomized(V.VAE(cfg, nnx.Rngs(0)))
    assert "critic" in nnx.state(model, nnx.Param)
    x = video(jax.random.key(1), 5)
    graphdef, params = nnx.split(model, nnx.Param)

    def term(p, which):
        m = nnx.merge(graphdef, p)
        return V.adversarial_terms(m, m.decode(m.encode(x)[0]), x)[which]

    def norms(grads, part):
        return max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[part]))

    grad = jax.jit(jax.grad(term), static_argnums=1)  # one compile, not one per operation
    gen, critic = grad(params, 0), grad(params, 1)
    assert norms(gen, "critic") == 0.0 and norms(gen, "decoder") > 0.0
    assert norms(critic, "decoder") == 0.0 and norms(critic, "encoder") == 0.0
    assert norms(critic, "critic") > 0.0
    loss, parts = V.vae_loss(model, {"video": x}, jax.random.key(2), cfg)
    assert np.isfinite(float(loss)) and {"adv_gen", "adv_critic"} <= set(parts)


def test_psnr():
    a = jnp.zeros((1, 2, 6, 4, 3))
    np.testing.assert_allclose(V.psnr(a + 0.2, a), 20.0, rtol=1e-5)  # 0.1 on [0,1]: 20 dB
    np.testing.assert_allclose(V.psnr(a + 5.0, a), 10 * np.log10(4.0), rtol=1e-5)  # clipped first


def shapes_clips(n, frames, size, seed=0):
    """Coloured disk faces on coloured walls whose elliptical mouth opens and closes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    clips = []
    for _ in range(n):
        face, wall = rng.uniform(0.1, 0.9, (2, 3))
        opening = np.clip(np.convolve(rng.uniform(0, 1, frames), [0.25, 0.5, 0.25], "same"), 0, 1)
        img = np.where((xx**2 + yy**2 < 0.7)[..., None], face, wall)
        mouth = (xx / 0.35) ** 2 + ((yy - 0.35) / (0.04 + 0.3 * opening[:, None, None])) ** 2 < 1
        clips.append(2.0 * np.where(mouth[..., None], 0.05, img[None]) - 1.0)
    return np.stack(clips).astype(np.float32)


def test_learns_to_reconstruct():
    """A few hundred Adam steps on small face clips: PSNR rises well above the untrained one."""
    cfg = make_cfg(widths=(8, 16, 32), latent_channels=8, spatial_factor=8)
    model = V.VAE(cfg, nnx.Rngs(0))
    data = jnp.asarray(shapes_clips(8, 9, 32))
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, 250, 3e-4))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = tx.init(params)
    before = float(V.psnr(model.decode(model.encode(data)[0]), data))

    @functools.partial(jax.jit, compiler_options=OPTIMIZED)
    def step(params, opt, key):
        idx = jax.random.choice(key, len(data), (4,), replace=False)
        loss_fn = lambda p: V.vae_loss(nnx.merge(graphdef, p, rest), {"video": data[idx]}, key,
                                       cfg)
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, parts

    for i in range(250):
        params, opt, parts = step(params, opt, jax.random.key(i))
    model = nnx.merge(graphdef, params, rest)
    value = float(V.psnr(model.decode(model.encode(data)[0]), data))
    print(f"reconstruction PSNR: {before:.1f} dB untrained, {value:.1f} dB after 250 steps")
    assert value > 13.0 and value > before + 5.0
