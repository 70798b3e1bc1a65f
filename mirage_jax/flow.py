"""Rectified flow: the training objective and the samplers.

Convention: t = 0 is data, t = 1 is Gaussian noise, along the straight path
    x_t = (1 - t) * x_0 + t * eps,
so the velocity the model predicts is v = dx_t/dt = eps - x_0, and sampling integrates
dx/dt = v from t = 1 down to t = 0.

Every token carries its own t. A stream with t = 0 is clean conditioning, so one model and
one loss cover audio->video, joint audio+video, video->audio, and video continuation (the
first frames clean). The loss is taken only over the tokens being generated.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax.model.tokens import GENERATED, Stream

VelocityFn = Callable[[dict[str, Stream]], dict[str, jax.Array]]


# ----------------------------------------------------------------------------- training


def logit_normal(key, shape, loc: float, scale: float) -> jax.Array:
    """t = sigmoid(loc + scale * n): concentrates training on the middle of the path."""
    return jax.nn.sigmoid(loc + scale * jax.random.normal(key, shape))


def noise(x0, eps, t):
    """The point at time t on the straight path from x0 (t=0) to eps (t=1)."""
    return (1.0 - t[..., None]) * x0 + t[..., None] * eps


def training_inputs(key, streams: dict[str, Stream], cfg):
    """Draws the task, times, noise and condition dropout for one batch.

    Returns (noised streams, velocity targets, loss weights [B, N] per generated group).
    """
    f = cfg.flow
    b = streams["video"].x.shape[0]
    ks = jax.random.split(key, 8)
    u = jax.random.uniform(ks[0], (b,))
    gen_audio = u < f.p_joint + f.p_video_to_audio  # joint or video->audio
    gen_video = (u < f.p_joint) | (u >= f.p_joint + f.p_video_to_audio)  # joint or audio->video
    if not cfg.model.audio:  # a silent model: text/ref -> video only
        gen_audio, gen_video = jnp.zeros((b,), bool), jnp.ones((b,), bool)

    video_t = streams["video"].pos[..., 0]  # frame index of every video token
    frames = streams["video"].pos[:, -1, 0] + 1
    prefix = jax.random.uniform(ks[1], (b,)) < f.p_video_prefix
    n_clean = jnp.floor(jax.random.uniform(ks[2], (b,)) * (frames - 1)) + 1
    clean_video = prefix[:, None] & (video_t < n_clean[:, None])
    generate = {
        "video": gen_video[:, None] & ~clean_video & streams["video"].mask,
        "audio": gen_audio[:, None] & streams["audio"].mask,
    }
    times = {
        "video": logit_normal(ks[3], (b,), f.time_loc, f.time_scale),
        "audio": logit_normal(ks[4], (b,), f.time_loc, f.time_scale),
    }

    out, targets, weights = dict(streams), {}, {}
    for i, g in enumerate(GENERATED):
        s = streams[g]
        eps = jax.random.normal(ks[5 + i], s.x.shape, s.x.dtype)
        t = jnp.where(generate[g], times[g][:, None], 0.0)
        out[g] = s.replace(x=noise(s.x, eps, t), t=t)
        targets[g] = eps - s.x
        weights[g] = generate[g].astype(jnp.float32)

    # Classifier-free guidance: each condition dropped independently (its keys masked out).
    kd = jax.random.split(ks[7], 3)
    keep = {
        "text": jax.random.uniform(kd[0], (b,)) >= f.drop_text,
        "ref": jax.random.uniform(kd[1], (b,)) >= f.drop_ref,
        "audio": gen_audio | (jax.random.uniform(kd[2], (b,)) >= f.drop_audio),
    }
    for g, k in keep.items():
        out[g] = out[g].replace(mask=out[g].mask & k[:, None])
    return out, targets, weights


def loss_fn(velocity: dict, targets: dict, weights: dict):
    """Mean squared velocity error over generated tokens, per stream, summed over streams."""
    total, parts = 0.0, {}
    for g in (g for g in GENERATED if g in velocity):  # a silent model has no audio
        err = jnp.mean(jnp.square(velocity[g].astype(jnp.float32) - targets[g]), axis=-1)
        parts[f"loss_{g}"] = jnp.sum(err * weights[g]) / jnp.maximum(jnp.sum(weights[g]), 1.0)
        total = total + parts[f"loss_{g}"]
    return total, parts


# ----------------------------------------------------------------------------- schedules


def linear_quadratic_schedule(steps: int, threshold: float = 0.025) -> np.ndarray:
    """Times from 1 to 0 (steps + 1 values), Mochi's shape.

    The first half of the steps moves t linearly from 1 to 1 - threshold (fine steps where
    the coarse layout forms); the second half follows a quadratic in the step index that
    reaches 0 at the end with the slope continuous at the junction.
    """
    s = np.arange(steps + 1) / steps
    u = np.where(
        s <= 0.5,
        2 * threshold * s,
        4 * (1 - 2 * threshold) * (s - 0.5) ** 2 + 2 * threshold * (s - 0.5) + threshold,
    )
    return (1.0 - u).astype(np.float32)


def shifted_schedule(steps: int, shift: float = 3.0) -> np.ndarray:
    """Uniform times warped towards noise by `shift` (t' = s t / (1 + (s - 1) t))."""
    t = np.linspace(1.0, 0.0, steps + 1)
    return (shift * t / (1 + (shift - 1) * t)).astype(np.float32)


def annealed_scale(scale: float, t, cosine: bool):
    """Guidance scale at time t; cosine annealing goes from `scale` at t=1 to 1 at t=0."""
    if not cosine:
        return scale
    return 1.0 + (scale - 1.0) * 0.5 * (1.0 - jnp.cos(jnp.pi * t))


# ----------------------------------------------------------------------------- sampling


def guided(model_fn: VelocityFn, conditions: Sequence[tuple[str, float]], cosine: bool = False):
    """Classifier-free guidance over an ordered list of (condition group, scale).

    v = v(none) + sum_i s_i * (v(c_1..c_i) - v(c_1..c_{i-1})); with conditions
    (("text", s_t), ("audio", s_a)) that is the usual separate text and audio scales.
    All n + 1 passes run as one batch. A dropped condition has its keys masked out,
    exactly as in training.
    """
    names = [c for c, _ in conditions]

    def velocity(streams, t):
        variants = []
        for k in range(len(names) + 1):
            on = set(names[:k])
            variants.append(
                {
                    g: (s.replace(mask=s.mask & False) if g in names and g not in on else s)
                    for g, s in streams.items()
                }
            )
        batched = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *variants)
        out = model_fn(batched)
        b = streams["video"].x.shape[0]
        result = {}
        for g, v in out.items():
            vs = jnp.split(v, len(names) + 1, axis=0)
            acc = vs[0]
            for i, (_, scale) in enumerate(conditions):
                acc = acc + annealed_scale(scale, t, cosine) * (vs[i + 1] - vs[i])
            result[g] = acc[:b]
        return result

    return velocity


def initial_noise(key, group: int, groups: int, shape) -> jax.Array:
    """N(0, 1) noise of `shape` for generated group `group` of `groups`, from one key or from
    one key per row ([B] keys: row b's noise from key b alone)."""
    if jnp.ndim(key) == 0:
        return jax.random.normal(jax.random.split(key, groups)[group], shape)
    return jax.vmap(lambda k: jax.random.normal(jax.random.split(k, groups)[group],
                                                shape[1:]))(key)


def sample(
    velocity_fn,
    streams: dict[str, Stream],
    generate: dict[str, jax.Array],
    key,
    schedule: np.ndarray,
    method: str = "euler",
    progress: Callable[[], None] | None = None,
) -> dict[str, Stream]:
    """Integrates the flow from noise (t=1) to data (t=0) for the tokens in `generate`.

    `velocity_fn(streams, t)` returns velocities per generated group; `generate[g]` [B, N]
    marks tokens to generate (others keep their clean values at t = 0, e.g. a previous
    window's last frames). Euler or Heun (2nd order; one more evaluation per step).
    `progress()` is called on the host after every step (a progress bar). `key`: one key,
    or one per row ([B] keys), so that a row's noise depends on its own key and not on its
    place in the batch (a sharded evaluation then matches an unsharded one example by example).
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown sampler '{method}' (euler | heun)")
    clean = {g: streams[g].x for g in generate}
    eps = {g: initial_noise(key, i, len(generate), clean[g].shape) for i, g in enumerate(generate)}
    x = {g: jnp.where(generate[g][..., None], eps[g], clean[g]) for g in generate}

    def with_time(x, t):
        s = dict(streams)
        for g in generate:
            s[g] = streams[g].replace(x=x[g], t=jnp.where(generate[g], t, 0.0))
        return s

    def step(x, times):
        t, t_next = times[0], times[1]
        v = velocity_fn(with_time(x, t), t)
        dt = t_next - t
        x_pred = {g: x[g] + dt * v[g] for g in generate}
        if method == "heun":
            v2 = velocity_fn(with_time(x_pred, t_next), t_next)
            x_pred = {g: x[g] + dt * 0.5 * (v[g] + v2[g]) for g in generate}
        if progress is not None:
            jax.debug.callback(lambda _: progress(), t)
        return {g: jnp.where(generate[g][..., None], x_pred[g], clean[g]) for g in generate}, None

    sched = jnp.asarray(schedule, jnp.float32)
    x, _ = jax.lax.scan(step, x, jnp.stack([sched[:-1], sched[1:]], axis=1))
    return with_time(x, 0.0)
