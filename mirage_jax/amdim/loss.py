"""AMDIM's multi-scale InfoNCE (the reference's LossMultiNCE) and the task's batch loss.

Each source vector of one view must pick out, at every location of a local feature map of
the other view of the same image, that location among all locations of the other images
in the batch (the negatives). Predictions: global -> local (1 -> 5, 1 -> 7) and
local -> local (5 -> 5, from one random source location per image), each in both
directions (view 1 -> 2 and 2 -> 1). Scores: dot products / sqrt(dim), soft-clipped to
c * tanh(s / c); 5e-2 * mean(score^2), taken before the clip, keeps them small.
`moment_acc`, logged beside the loss, says whether the encoder tells a clip's moments
apart or only its speaker: most negatives of a frame are then the same face.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mirage_jax.amdim.augment import two_views


def tanh_clip(s, c: float):
    return c * jnp.tanh(s / c)


def nce(src, trg, clip: float, penalty: float):
    """src [N, D] (one vector per image), trg [N, L, D] (L locations per image).
    Returns (InfoNCE averaged over images and locations, penalty * mean(score^2))."""
    n, _, d = trg.shape
    scores = jnp.einsum("id,jld->ijl", src, trg) / jnp.sqrt(float(d))
    reg = penalty * jnp.mean(jnp.square(scores))
    scores = tanh_clip(scores, clip)
    same = jnp.eye(n, dtype=bool)[:, :, None]
    pos = jnp.sum(jnp.where(same, scores, 0.0), axis=1)  # [N, L]
    neg = jax.nn.logsumexp(jnp.where(same, -jnp.inf, scores).reshape(n, -1), axis=1)
    return jnp.mean(jnp.logaddexp(pos, neg[:, None]) - pos), reg


def moment_accuracy(src, trg, group):
    """src [N, D], trg [N, L, D], group [N] (the clip of each image): the fraction of images
    whose source scores its own image's target (mean over locations) above every other
    image of its clip. Chance is 1 / (images per clip): knowing the speaker does not help."""
    s = jnp.einsum("id,jld->ij", src, trg)
    rivals = (group[:, None] == group[None, :]) & ~jnp.eye(len(group), dtype=bool)
    return jnp.mean(jnp.diagonal(s) > jnp.max(jnp.where(rivals, s, -jnp.inf), axis=1))


def multi_nce(f1: dict, f2: dict, src5, clip: float, penalty: float, group=None):
    """f1, f2: head outputs of the two views (g [N, D], l5 [N, 5, 5, D], l7 [N, 7, 7, D]);
    src5 [2, N]: the 5x5 location (0..24) each image's 5 -> 5 source comes from, for the
    directions 1 -> 2 and 2 -> 1. With `group` [N] (each image's clip), parts hold the
    1 -> 5 `moment_acc` (both directions). Returns (loss, parts)."""
    parts, reg = {}, 0.0
    flat = lambda x: x.reshape(x.shape[0], -1, x.shape[-1])
    for name, src_of in (("1t5", lambda f, i: f["g"]), ("1t7", lambda f, i: f["g"]),
                         ("5t5", lambda f, i: flat(f["l5"])[jnp.arange(len(i)), i])):
        trg = "l7" if name == "1t7" else "l5"
        a = nce(src_of(f1, src5[0]), flat(f2[trg]), clip, penalty)
        b = nce(src_of(f2, src5[1]), flat(f1[trg]), clip, penalty)
        parts[f"nce_{name}"] = 0.5 * (a[0] + b[0])
        reg = reg + 0.5 * (a[1] + b[1])
    parts["nce"] = (parts["nce_1t5"] + parts["nce_1t7"] + parts["nce_5t5"]) / 3.0
    parts["score_penalty"] = reg
    if group is not None:
        parts["moment_acc"] = 0.5 * (moment_accuracy(f1["g"], flat(f2["l5"]), group)
                                     + moment_accuracy(f2["g"], flat(f1["l5"]), group))
    return parts["nce"] + reg, parts


def frames(batch: dict, use_ref: bool, stride: int = 1):
    """The images of a pipeline batch: every `stride`-th frame of `video` [B, T, H, W, 3],
    then (with `use_ref`) each clip's reference frame, another moment of the same speaker.
    Returns (images, the clip index of each)."""
    video = batch["video"][:, ::stride]
    b, n = video.shape[:2]
    images, group = video.reshape(-1, *video.shape[2:]), jnp.repeat(jnp.arange(b), n)
    if use_ref:
        images = jnp.concatenate([images, batch["ref"]], axis=0)
        group = jnp.concatenate([group, jnp.arange(b)])
    return images.astype(jnp.float32), group


def amdim_loss(model, batch: dict, key, cfg):
    """The `amdim` task's loss for the train step: two views of each frame, one encoder pass
    over both, multi-scale InfoNCE. Returns (loss, parts)."""
    a = cfg.amdim
    k_view, k_src = jax.random.split(key)
    images, group = frames(batch, a.use_ref, a.frame_stride)
    v1, v2 = two_views(k_view, images, a)
    n = v1.shape[0]
    f = model(jnp.concatenate([v1, v2], axis=0))
    f1, f2 = ({k: x[:n] for k, x in f.items()}, {k: x[n:] for k, x in f.items()})
    src5 = jax.random.randint(k_src, (2, n), 0, 25)
    return multi_nce(f1, f2, src5, a.tclip, a.score_penalty, group)
