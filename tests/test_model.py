"""The multi-stream DiT: size, adaLN-Zero identity, rotary relativity, scan == loop."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mirage_jax import config
from mirage_jax.model import dit, tokens
from mirage_jax.train import state as state_lib


forward = nnx.jit(lambda model, streams: model(streams))


def make_batch(cfg, b=2, seed=0):
    d = cfg.data
    rng = np.random.default_rng(seed)
    return {
        "video": jnp.asarray(
            rng.uniform(-1, 1, (b, d.frames, d.height, d.width, d.channels)), jnp.float32
        ),
        "audio": jnp.asarray(rng.normal(size=(b, d.frames, d.audio_features)), jnp.float32),
        "ref": jnp.asarray(rng.uniform(-1, 1, (b, d.height, d.width, d.channels)), jnp.float32),
        "text": jnp.asarray(tokens.encode_text(["a red face", "hello there"][:b], d.text_len)),
    }


def randomize(model, seed=1, scale=0.1):
    """Replaces every parameter (zero-initialised gates included) with noise."""
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model


def expected_params(cfg) -> int:
    """Counted by hand from the architecture description, independently of the code."""
    m, d = cfg.model, cfg.data
    inner, td = m.num_heads * m.head_dim, m.time_dim
    lin = lambda i, o: i * o + o

    def stream_layer(w):
        h = int(w * m.mlp_ratio)
        return (
            lin(td, 6 * w)
            + 3 * lin(w, inner)
            + 2 * m.head_dim
            + lin(inner, w)
            + lin(w, h)
            + lin(h, w)
        )

    block = sum(stream_layer(w) for w in (m.video_width, m.audio_width, m.text_width))
    block += m.num_heads * (m.head_dim // 2) * 3  # learned rotary frequencies
    patch = m.patch * m.patch * d.channels
    total = m.depth * block
    total += lin(patch, m.video_width) + lin(d.audio_features, m.audio_width)
    total += m.text_vocab * m.text_width + d.text_len * m.text_width
    total += 2 * lin(td, td)
    total += lin(td, 2 * m.video_width) + lin(m.video_width, patch)
    total += lin(td, 2 * m.audio_width) + lin(m.audio_width, d.audio_features)
    return total


def test_parameter_count_of_known_configs(tiny_cfg):
    assert state_lib.count_params(tiny_cfg) == expected_params(tiny_cfg) == 299_068
    from conftest import REPO

    demo = config.load(REPO / "configs" / "demo.py")
    assert state_lib.count_params(demo) == expected_params(demo)


def test_output_shapes_and_ref_shares_video_weights(tiny_cfg):
    model = dit.DiT(tiny_cfg, nnx.Rngs(0))
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not any("ref" in n for n in names)  # the reference image has no own weights
    assert {"blocks/video/q/kernel", "blocks/audio/q/kernel", "blocks/text/q/kernel"} <= names
    out = forward(model, tokens.batch_to_streams(make_batch(tiny_cfg), tiny_cfg))
    d, p = tiny_cfg.data, tiny_cfg.model.patch
    assert out["video"].shape == (
        2,
        d.frames * (d.height // p) * (d.width // p),
        p * p * d.channels,
    )
    assert out["audio"].shape == (2, d.frames, d.audio_features)


def test_adaln_zero_blocks_are_identity_at_init(tiny_cfg):
    model = dit.DiT(tiny_cfg, nnx.Rngs(0))
    streams = tokens.batch_to_streams(make_batch(tiny_cfg), tiny_cfg)
    streams["video"] = streams["video"].replace(t=jnp.full(streams["video"].t.shape, 0.7))
    xs = model.embed(streams)
    ctx = {
        "cond": {g: model.time(s.t) for g, s in streams.items()},
        "pos": {g: s.pos for g, s in streams.items()},
        "key_mask": jnp.concatenate([streams[g].mask for g in tokens.GROUPS], 1),
    }
    run = nnx.jit(lambda m, xs, ctx: m.run_blocks(xs, ctx))
    out = run(model, xs, ctx)
    for g in tokens.GROUPS:
        assert jnp.abs(xs[g]).max() > 0.1
        np.testing.assert_array_equal(np.asarray(out[g]), np.asarray(xs[g]))
    # ... and not the identity once the gates are non-zero.
    out = run(randomize(model), xs, ctx)
    assert float(jnp.abs(out["video"] - xs["video"]).max()) > 1e-3


def test_rotary_scores_depend_only_on_relative_offset():
    key = jax.random.key(0)
    kq, kk, kf, kp = jax.random.split(key, 4)
    heads, dim = 4, 16
    q = jax.random.normal(kq, (1, 1, heads, dim))
    k = jax.random.normal(kk, (1, 1, heads, dim))
    freqs = dit.init_rope_freqs(kf, heads, dim, 100.0) * 3.0  # any learned values

    def score(pq, pk):
        rq = dit.rope(q, jnp.asarray(pq, jnp.float32)[None, None], freqs)
        rk = dit.rope(k, jnp.asarray(pk, jnp.float32)[None, None], freqs)
        return jnp.einsum("bnhd,bnhd->h", rq, rk)

    base = score([2.0, 1.0, 3.0], [0.0, 4.0, 1.0])
    for shift in ([5.0, 0.0, 0.0], [-1.0, 7.0, 2.0], [0.5, -3.0, 10.0]):
        moved = score(np.add([2.0, 1.0, 3.0], shift), np.add([0.0, 4.0, 1.0], shift))
        np.testing.assert_allclose(moved, base, rtol=1e-4, atol=1e-4)
    other = score([2.0, 1.0, 3.0], [1.0, 4.0, 1.0])  # a different offset
    assert float(jnp.abs(other - base).max()) > 1e-2
    # Norm preserved: a rotation.
    rq = dit.rope(q, jnp.ones((1, 1, 3)), freqs)
    np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)


def test_audio_tokens_sit_on_video_time_axis(tiny_cfg):
    streams = tokens.batch_to_streams(make_batch(tiny_cfg), tiny_cfg)
    video_times = np.unique(np.asarray(streams["video"].pos[0, :, 0]))
    np.testing.assert_array_equal(np.asarray(streams["audio"].pos[0, :, 0]), video_times)
    assert float(streams["ref"].pos[0, 0, 0]) == tiny_cfg.model.ref_time
    np.testing.assert_array_equal(
        np.asarray(streams["text"].mask[0]), np.asarray(streams["text"].x[0]) != tokens.PAD
    )


def test_patchify_roundtrip(tiny_cfg):
    v = make_batch(tiny_cfg)["video"]
    d = tiny_cfg.data
    x = tokens.patchify(v, 4)
    np.testing.assert_array_equal(tokens.unpatchify(x, d.frames, d.height, d.width, 4), v)


def test_scan_loop_and_remat_agree(tiny_cfg):
    """Scanned layers, a Python loop over the same weights, and each remat policy."""
    results = []
    for scan, remat in ((True, "none"), (False, "none"), (True, "full"), (True, "save_dots")):
        cfg = config.apply_overrides(
            tiny_cfg, [f"config.model.scan_layers={scan}", f"config.model.remat={remat}"]
        )
        model = randomize(dit.DiT(cfg, nnx.Rngs(0)))
        streams = tokens.batch_to_streams(make_batch(cfg), cfg)
        loss = lambda m: jnp.mean(m(streams)["video"] ** 2)
        out, grad = nnx.jit(lambda m: (m(streams)["video"], nnx.grad(loss)(m)))(model)
        results.append((out, grad["blocks"]["video"]["q"]["kernel"][...]))
    for out, grad in results[1:]:
        np.testing.assert_allclose(out, results[0][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, results[0][1], rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(results[0][1]).max()) > 0


def test_flat_projections_change_no_number_or_parameter(tiny_cfg):
    """`model.flat_projections` (tokens flattened to rows in every projection): the same
    parameter tree (checkpoints interchange), outputs and every gradient."""
    results = []
    for flat in (False, True):
        cfg = config.apply_overrides(tiny_cfg, [f"config.model.flat_projections={flat}"])
        model = randomize(dit.DiT(cfg, nnx.Rngs(0)))
        streams = tokens.batch_to_streams(make_batch(cfg), cfg)
        loss = lambda m: jnp.mean(m(streams)["video"] ** 2) + jnp.mean(m(streams)["audio"] ** 2)
        results.append(nnx.jit(lambda m: (m(streams), nnx.grad(loss)(m)))(model))
    (out0, grad0), (out1, grad1) = results
    assert jax.tree.structure(grad0) == jax.tree.structure(grad1)
    for a, b in zip(jax.tree.leaves(out0), jax.tree.leaves(out1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grad0), jax.tree.leaves(grad1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(grad0["blocks"]["video"]["fc1"]["kernel"][...]).max()) > 0


def test_padding_keys_do_not_change_outputs(tiny_cfg):
    model = randomize(dit.DiT(tiny_cfg, nnx.Rngs(0)))
    batch = make_batch(tiny_cfg)
    base = forward(model, tokens.batch_to_streams(batch, tiny_cfg))
    # Change the values behind padded text positions: masked keys must not matter.
    streams = tokens.batch_to_streams(batch, tiny_cfg)
    text = streams["text"]
    streams["text"] = text.replace(x=jnp.where(text.mask, text.x, 77))
    out = forward(model, streams)
    np.testing.assert_allclose(out["video"], base["video"], rtol=1e-5, atol=1e-6)


def test_bf16_compute_with_f32_params(tiny_cfg):
    cfg = config.apply_overrides(tiny_cfg, ["config.model.dtype=bfloat16"])
    model = randomize(dit.DiT(cfg, nnx.Rngs(0)))
    ref = randomize(dit.DiT(tiny_cfg, nnx.Rngs(0)))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    streams = tokens.batch_to_streams(make_batch(cfg), cfg)
    out, want = forward(model, streams)["video"], forward(ref, streams)["video"]
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))
    assert 0 < rel < 0.05
