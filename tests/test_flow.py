"""Rectified flow: convention, samplers, schedules, the training draw, guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax import config, flow
from mirage_jax.model import tokens
from test_model import make_batch


def _streams(shape, x0=None):
    b, n, d = shape
    x = jnp.zeros(shape) if x0 is None else x0
    s = tokens.Stream(
        x=x, t=jnp.zeros((b, n)), pos=jnp.zeros((b, n, 3)), mask=jnp.ones((b, n), bool)
    )
    return {"video": s}


@pytest.mark.parametrize(
    "schedule",
    [
        flow.linear_quadratic_schedule(64),
        flow.shifted_schedule(7, 3.0),
        flow.linear_quadratic_schedule(3),
    ],
)
def test_euler_integrates_straight_field_exactly(schedule):
    """v(x, t) = (x - x0) / t is the flow of the straight path; Euler is exact on it."""
    x0 = jax.random.normal(jax.random.key(1), (2, 5, 4))
    velocity = lambda s, t: {"video": (s["video"].x - x0) / s["video"].t[..., None]}
    streams = _streams(x0.shape)
    gen = {"video": jnp.ones((2, 5), bool)}
    out = flow.sample(velocity, streams, gen, jax.random.key(0), schedule, "euler")
    np.testing.assert_allclose(out["video"].x, x0, atol=2e-5)
    assert float(out["video"].t.max()) == 0.0


def test_heun_is_second_order():
    """dx/dt = a x from t=1 to 0: x(0) = x(1) exp(-a). Halving the step quarters Heun's error."""
    a = 1.5
    velocity = lambda s, t: {"video": a * s["video"].x}
    gen = {"video": jnp.ones((1, 3), bool)}
    errors = {}
    for method in ("euler", "heun"):
        for n in (8, 16):
            out = flow.sample(
                velocity,
                _streams((1, 3, 2)),
                gen,
                jax.random.key(0),
                np.linspace(1, 0, n + 1).astype(np.float32),
                method,
            )
            x1 = jax.random.normal(jax.random.split(jax.random.key(0), 1)[0], (1, 3, 2))
            errors[method, n] = float(jnp.abs(out["video"].x - x1 * np.exp(-a)).max())
    assert 3.3 < errors["heun", 8] / errors["heun", 16] < 4.7
    assert 1.6 < errors["euler", 8] / errors["euler", 16] < 2.4
    assert errors["heun", 16] < errors["euler", 16] / 10


def test_sampler_keeps_clean_tokens():
    x0 = jax.random.normal(jax.random.key(1), (1, 6, 2))
    gen = {"video": jnp.array([[False, False, True, True, True, True]])}

    def velocity(s, t):  # NaN if a generated token were shown t = 0 or a clean one t > 0
        tt = s["video"].t[..., None]
        ok = jnp.where(gen["video"][..., None], tt > 0, tt == 0)
        return {"video": jnp.where(ok, 1.0, jnp.nan) * jnp.ones_like(s["video"].x)}

    out = flow.sample(
        velocity, _streams(x0.shape, x0), gen, jax.random.key(0), flow.linear_quadratic_schedule(4)
    )
    np.testing.assert_array_equal(out["video"].x[:, :2], x0[:, :2])
    assert not np.allclose(out["video"].x[:, 2:], x0[:, 2:])
    assert np.isfinite(np.asarray(out["video"].x)).all()


def test_schedules():
    lq = flow.linear_quadratic_schedule(64, threshold=0.025)
    assert lq[0] == 1.0 and lq[-1] == 0.0 and np.all(np.diff(lq) < 0)
    np.testing.assert_allclose(lq[32], 1 - 0.025, atol=1e-6)  # end of the linear half
    np.testing.assert_allclose(np.diff(lq[:33]), -0.025 / 32, rtol=1e-4)
    steps = -np.diff(lq)
    assert abs(steps[32] - steps[31]) < 1e-3  # slope continuous
    sh = flow.shifted_schedule(10, 3.0)
    assert sh[0] == 1.0 and sh[-1] == 0.0 and np.all(sh[1:-1] > np.linspace(1, 0, 11)[1:-1])


def test_training_draw(tiny_cfg):
    cfg = config.apply_overrides(tiny_cfg, ["config.data.global_batch=64"])
    batch = make_batch(cfg, b=2)
    batch = jax.tree.map(lambda x: jnp.concatenate([x] * 32), batch)
    clean = tokens.batch_to_streams(batch, cfg)
    noised, targets, weights = flow.training_inputs(jax.random.key(3), clean, cfg)
    for g in ("video", "audio"):
        t, w = np.asarray(noised[g].t), np.asarray(weights[g])
        assert np.all((t > 0) == (w > 0))  # loss exactly on generated tokens
        same = np.all(np.asarray(noised[g].x) == np.asarray(clean[g].x), -1)
        assert np.all(same[t == 0])  # clean tokens untouched
        # x_t = (1 - t) x0 + t eps with target eps - x0
        eps = targets[g] + clean[g].x
        np.testing.assert_allclose(noised[g].x, flow.noise(clean[g].x, eps, noised[g].t), atol=1e-5)
    gen_v = np.asarray(weights["video"]).any(1)
    gen_a = np.asarray(weights["audio"]).any(1)
    assert gen_v.mean() > 0.7 and 0.05 < gen_a.mean() < 0.45 and (gen_v | gen_a).all()
    dropped_text = ~np.asarray(noised["text"].mask).any(1)
    assert 0 < dropped_text.mean() < 0.3
    # audio is dropped only where it is a condition
    dropped_audio = ~np.asarray(noised["audio"].mask).any(1)
    assert not (dropped_audio & gen_a).any()


def test_loss_only_counts_generated_tokens():
    v = {"video": jnp.ones((1, 4, 2)), "audio": jnp.zeros((1, 2, 2))}
    targets = {
        "video": jnp.array([[[1.0, 1], [1, 1], [9, 9], [9, 9]]]),
        "audio": jnp.ones((1, 2, 2)),
    }
    weights = {"video": jnp.array([[1.0, 1, 0, 0]]), "audio": jnp.zeros((1, 2))}
    loss, parts = flow.loss_fn(v, targets, weights)
    assert float(loss) == 0.0 and float(parts["loss_audio"]) == 0.0


def test_guidance_combines_conditions():
    """v = v0 + s_t (v_t - v0) + s_a (v_ta - v_t) with a model whose output shows what it saw."""

    def model_fn(streams):
        seen = 1.0 * streams["text"].mask.any(1) + 10.0 * streams["audio"].mask.any(1)
        return {"video": jnp.broadcast_to(seen[:, None, None], streams["video"].x.shape)}

    s = {
        g: tokens.Stream(
            x=jnp.zeros((2, 3, 1)),
            t=jnp.zeros((2, 3)),
            pos=jnp.zeros((2, 3, 3)),
            mask=jnp.ones((2, 3), bool),
        )
        for g in ("video", "text", "audio")
    }
    v = flow.guided(model_fn, (("text", 2.0), ("audio", 3.0)))(s, 1.0)["video"]
    np.testing.assert_allclose(v, 0.0 + 2.0 * 1.0 + 3.0 * 10.0)
    v = flow.guided(model_fn, (("text", 1.0), ("audio", 1.0)))(s, 1.0)["video"]
    np.testing.assert_allclose(v, 11.0)  # scale 1: conditional
    vc = flow.guided(model_fn, (("text", 2.0), ("audio", 3.0)), cosine=True)
    np.testing.assert_allclose(vc(s, 1.0)["video"], 32.0)  # full scale at t = 1
    np.testing.assert_allclose(vc(s, 0.0)["video"], 11.0, atol=1e-5)  # annealed to 1 at t = 0


def test_token_motion_marks_the_tokens_that_move():
    """The motion weight's input: zero on the first frame and on still patches, largest on
    the one patch whose pixels change (a mouth opening), relative to the batch mean."""
    video = np.zeros((1, 3, 8, 8, 3), np.float32)
    video[0, 1:, 4:, 4:] = 1.0  # patch (1, 1) of 2x2 changes at frame 1
    video[0, 2, 4:, 4:] = -1.0  # and again at frame 2
    m = np.asarray(tokens.token_motion(jnp.asarray(video), 4)).reshape(3, 2, 2)
    assert np.all(m[0] == 0) and np.all(m[:, :1] == 0) and np.all(m[:, :, :1] == 0)
    assert m[2, 1, 1] == pytest.approx(2 * m[1, 1, 1]) and m.mean() == pytest.approx(1.0)
