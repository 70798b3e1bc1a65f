"""The audio-visual sync judge (issue 7, must 3): AMDIM across two views of one moment.

View 1 is a window of `sync.window` = 5 video frames (0.2 s at 25 fps) of the mouth box;
view 2 is the log-mel features of the same 0.2 s of audio (one feature frame per video
frame, data/pipeline.py). Each encoder maps its view to one global vector in a shared
space; InfoNCE in both directions, with AMDIM's scores (dot / sqrt(D), soft-clipped to
c * tanh(s / c), 5e-2 * mean(s^2) before the clip; loss.py), makes the two views of one
moment pick each other out among

  - every window of the other clips in the batch (other speakers, other sentences), and
  - the same clip's windows shifted by `sync.min_shift`..`sync.max_shift` frames either way.

Without the shifted negatives a judge that knows who is speaking, and nothing about when,
already wins against the other clips: identity, not lips. Same-clip windows nearer than
`min_shift` overlap the positive and are left out (neither positive nor negative).

Both encoders are per frame, then a temporal convolution of width `window`, so one pass
over a whole clip gives the embeddings of all its windows (every window start), which is
how the loss gets its shifted negatives and the metrics their offsets (metrics.py):

  video  frames [B, T, H, W, 3] -> mouth box resampled to crop_size^2 -> valid convs
         (AMDIM's no-padding ResNet style, model.Conv) -> per-frame vector [B, T, width]
  audio  log-mel [B, T, F] -> two per-frame dense layers -> [B, T, width]
  both   -> temporal conv (width `window`, valid) -> FeatureHead (model.py) -> [B, T-window+1, D]

Training can degrade the video view (`sync.degrade` > 0, degrade_video: per clip a random
Gaussian blur, down-up sampling, lower contrast, pixel noise; the audio view, the box and
the metrics untouched), so the judge also reads mouths washed out by a small VAE's decoder
(the demo DiT's clips, and the "reconstructed" group of evaluate.py) without being told
about the VAE.

Window w of the output covers frames w .. w + window - 1. The mouth box is fixed in
image fractions (the synthetic speakers' faces sit at a known place, face.py; their
largest sway stays inside it); footage with moving faces would need a face track first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mirage_jax.amdim.augment import resize
from mirage_jax.amdim.loss import tanh_clip
from mirage_jax.amdim.model import Conv, FeatureHead
from mirage_jax.model.dit import DTYPES


def sync_defaults() -> dict:
    """Every key of the `sync` config group with its default."""
    return {
        "window": 5,  # video frames per judged moment (0.2 s at 25 fps), audio frames the same
        "min_shift": 3,  # same-clip windows shifted by >= this many frames are negatives
        "max_shift": 15,  # ... and by <= this many (also the metrics' offset range, +-)
        # The mouth box (y0, y1, x0, x1) in fractions of the frame: on synthetic_aroll the
        # lips of every speaker at their largest opening and sway lie inside it.
        "crop": (0.42, 0.78, 0.31, 0.69),
        "crop_size": 24,  # the box is resampled to crop_size x crop_size pixels
        "crop_jitter": 0.02,  # training: the box moves by up to this (fraction), per clip
        "ndf": 16,  # channels of the first video conv
        "width": 128,  # per-frame feature width, video and audio
        "n_rkhs": 128,  # embedding width: the space where scores are dot products
        "tclip": 20.0,  # scores soft-clipped to c * tanh(s / c)
        "score_penalty": 5e-2,  # weight of mean(score^2), taken before the clip
        # Training only, video only: each clip, with probability `degrade`, is degraded the
        # way a decoder washes out mouths (degrade_video): the same draw for all its frames.
        "degrade": 0.0,  # fraction of the batch's clips degraded (0: off)
        "degrade_blur": 2.0,  # Gaussian blur of sigma ~ U(0, this) frame pixels
        "degrade_down": (1, 2),  # downsample by one of these (box) and back up (bilinear)
        "degrade_contrast": 0.2,  # contrast scaled by ~ U(1 - this, 1) about the clip's mean
        "degrade_noise": 0.08,  # Gaussian pixel noise of std ~ U(0, this) ([-1, 1] units)
    }


class TConv(nnx.Module):
    """A 'valid' convolution over time: [B, T, cin] -> [B, T - k + 1, cout]."""

    def __init__(self, cfg, cin, cout, k, *, rngs):
        m = cfg.model
        self.dtype = DTYPES[m.dtype]
        self.kernel = nnx.Param(nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                      (None, "embed", "mlp"))(
            rngs.params(), (k, cin, cout), DTYPES[m.param_dtype]))
        self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",))(
            rngs.params(), (cout,), DTYPES[m.param_dtype]))

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                         (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
        return y + self.bias[...].astype(self.dtype)


def _conv_out(size: int) -> int:
    """Side of the video trunk's last map for a crop of `size` pixels."""
    for k, s in ((3, 1), (4, 2), (3, 1), (4, 2)):
        size = (size - k) // s + 1
    return size


class SyncJudge(nnx.Module):
    """`video(frames)` [B, T, H, W, 3] in [-1, 1] -> [B, T - window + 1, D];
    `audio(feats)` [B, T, F] log-mel -> [B, T - window + 1, D]; `frame_features(frames)`
    -> the per-frame video vectors [B, T, width] (mouth shape, for probes)."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        s = cfg.sync
        w, self.crop, self.size, self.window = s.ndf, tuple(s.crop), s.crop_size, s.window
        side = _conv_out(s.crop_size)
        if side < 1:
            raise ValueError(f"sync.crop_size={s.crop_size} is too small for the video trunk")
        self.convs = nnx.List([
            Conv(cfg, 3, w, 3, names=("io", "embed"), rngs=rngs),
            Conv(cfg, w, 2 * w, 4, 2, rngs=rngs),
            Conv(cfg, 2 * w, 4 * w, 3, rngs=rngs),
            Conv(cfg, 4 * w, 4 * w, 4, 2, rngs=rngs)])
        self.v_frame = Conv(cfg, side * side * 4 * w, s.width, rngs=rngs)
        self.a_in = Conv(cfg, cfg.data.audio_features, s.width, names=("io", "mlp"), rngs=rngs)
        self.a_frame = Conv(cfg, s.width, s.width, rngs=rngs)
        self.v_time = TConv(cfg, s.width, 2 * s.width, s.window, rngs=rngs)
        self.a_time = TConv(cfg, s.width, 2 * s.width, s.window, rngs=rngs)
        self.v_head = FeatureHead(cfg, 2 * s.width, s.n_rkhs, rngs=rngs)
        self.a_head = FeatureHead(cfg, 2 * s.width, s.n_rkhs, rngs=rngs)

    def frame_features(self, frames, box=None):
        """[B, T, H, W, 3] in [-1, 1] -> [B, T, width]; `box`: the mouth box per clip [B, 4]
        (default: `sync.crop`)."""
        b, t = frames.shape[:2]
        box = jnp.asarray(self.crop if box is None else box, jnp.float32)
        box = jnp.repeat(jnp.broadcast_to(box, (b, 4)), t, axis=0)
        h = resize(frames.reshape(b * t, *frames.shape[2:]), self.size, box)
        for i, conv in enumerate(self.convs):
            h = conv(h if i == 0 else jax.nn.relu(h))
        h = self.v_frame(jax.nn.relu(h).reshape(b * t, -1))
        return h.reshape(b, t, -1).astype(jnp.float32)

    def video(self, frames, box=None):
        h = self.v_time(jax.nn.relu(self.frame_features(frames, box)))
        return self.v_head(jax.nn.relu(h))

    def audio(self, feats):
        h = self.a_frame(jax.nn.relu(self.a_in(feats.astype(jnp.float32))))
        return self.a_head(jax.nn.relu(self.a_time(jax.nn.relu(h))))

    def __call__(self, frames, feats):
        return self.video(frames), self.audio(feats)


def candidates(b: int, w: int, min_shift: int, max_shift: int):
    """[B*W, B*W] bool: which (video window, audio window) pairs enter one InfoNCE (rows and
    columns are clip-major: clip * W + window). The positive (same clip, same window), every
    window of every other clip, and the same clip's windows min_shift..max_shift away."""
    clip = jnp.repeat(jnp.arange(b), w)
    t = jnp.tile(jnp.arange(w), b)
    same = clip[:, None] == clip[None, :]
    dt = jnp.abs(t[:, None] - t[None, :])
    return ~same | (dt == 0) | ((dt >= min_shift) & (dt <= max_shift))


def sync_nce(v, a, min_shift: int, max_shift: int, clip: float, penalty: float):
    """v, a [B, W, D]: the video and audio embeddings of every window of B clips.
    InfoNCE video -> audio (each video window picks its audio window among the candidates)
    and audio -> video. Returns (loss, parts); parts also say how often the positive wins
    against the shifted same-clip candidates and against the other clips'."""
    b, w, d = v.shape
    n = b * w
    raw = jnp.einsum("id,jd->ij", v.reshape(n, d), a.reshape(n, d)) / jnp.sqrt(float(d))
    cand = candidates(b, w, min_shift, max_shift)
    eye = jnp.eye(n, dtype=bool)
    reg = penalty * jnp.sum(jnp.where(cand, jnp.square(raw), 0.0)) / jnp.sum(cand)
    s = jnp.where(cand, tanh_clip(raw, clip), -jnp.inf)
    pos = jnp.diagonal(s)
    v2a = jnp.mean(jax.nn.logsumexp(s, axis=1) - pos)
    a2v = jnp.mean(jax.nn.logsumexp(s, axis=0) - pos)
    same = jnp.repeat(jnp.arange(b), w)
    same = same[:, None] == same[None, :]
    beats = lambda mask: jnp.mean(jnp.all(jnp.where(mask & cand & ~eye, s < pos[:, None], True),
                                          axis=1).astype(jnp.float32))
    parts = {"nce_v2a": v2a, "nce_a2v": a2v, "nce": 0.5 * (v2a + a2v), "score_penalty": reg,
             "top1_vs_shifted": beats(same), "top1_vs_other_clips": beats(~same)}
    return parts["nce"] + reg, parts


def jittered_boxes(key, n: int, crop, jitter: float):
    """[n, 4] mouth boxes: `crop` moved by up to +-jitter (fractions), one draw per clip."""
    d = jax.random.uniform(key, (n, 2), minval=-jitter, maxval=jitter)
    return jnp.asarray(crop, jnp.float32)[None] + jnp.stack([d[:, 0], d[:, 0], d[:, 1], d[:, 1]],
                                                            -1)


def _blur_matrix(n: int, sigma):
    """[..., n, n] row-normalised Gaussian blur along one image axis (sigma in pixels)."""
    d = jnp.arange(n, dtype=jnp.float32)
    d = jnp.square(d[:, None] - d[None, :])
    s = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-3)[..., None, None]
    g = jnp.exp(-d / (2.0 * jnp.square(s)))
    return g / jnp.sum(g, axis=-1, keepdims=True)


def _down_up_matrix(n: int, f: int):
    """[n, n]: box-average downsampling by f, then bilinear upsampling back to n."""
    m = n // f
    if f <= 1 or m < 1:
        return jnp.eye(n, dtype=jnp.float32)
    down = (jnp.arange(n)[None, :] // f == jnp.arange(m)[:, None]).astype(jnp.float32) / f
    c = jnp.clip((jnp.arange(n, dtype=jnp.float32) + 0.5) / f - 0.5, 0.0, m - 1.0)
    up = jnp.maximum(0.0, 1.0 - jnp.abs(c[:, None] - jnp.arange(m)[None, :]))
    return up @ down


def degrade_video(key, video, s):
    """video [B, T, H, W, C] in [-1, 1] -> the same with each clip, with probability
    `s.degrade`, blurred (Gaussian, sigma ~ U(0, degrade_blur)), downsampled by a factor
    drawn from `degrade_down` and upsampled back, its contrast reduced (~ U(1 - degrade_contrast,
    1)) and Gaussian noise added (std ~ U(0, degrade_noise)); one draw per clip, every frame
    alike. What a small VAE's decoder does to mouths, without the VAE (training only)."""
    b, _, h, w, _ = video.shape
    kp, ks, kf, kc, kn, ke = jax.random.split(key, 6)
    on = jax.random.bernoulli(kp, s.degrade, (b,))
    sigma = jnp.where(on, jax.random.uniform(ks, (b,), maxval=s.degrade_blur), 0.0)
    factors = tuple(int(f) for f in s.degrade_down) or (1,)
    fi = jax.random.randint(kf, (b,), 0, len(factors))
    keep = lambda m, n: jnp.where(on[:, None, None], m, jnp.eye(n, dtype=jnp.float32))
    mh = keep(jnp.stack([_down_up_matrix(h, f) for f in factors])[fi] @ _blur_matrix(h, sigma), h)
    mw = keep(jnp.stack([_down_up_matrix(w, f) for f in factors])[fi] @ _blur_matrix(w, sigma), w)
    x = jnp.einsum("bih,bthwc,bjw->btijc", mh, video, mw)
    c = jnp.where(on, 1.0 - jax.random.uniform(kc, (b,), maxval=s.degrade_contrast), 1.0)
    mean = jnp.mean(x, axis=(1, 2, 3, 4), keepdims=True)
    x = mean + c[:, None, None, None, None] * (x - mean)
    std = jnp.where(on, jax.random.uniform(kn, (b,), maxval=s.degrade_noise), 0.0)
    x = x + std[:, None, None, None, None] * jax.random.normal(ke, x.shape)
    return jnp.where(on[:, None, None, None, None], jnp.clip(x, -1.0, 1.0), video)


def sync_loss(model: SyncJudge, batch: dict, key, cfg):
    """The `sync` task's loss for the train step: every window of each clip of the batch
    (`data.frames` frames from the pipeline: the whole clip at 50), the mouth box jittered
    and flipped per clip (the same box for all of a clip's windows, so the shifted negatives
    differ from the positive only in time), and, with `sync.degrade` > 0, a share of the
    clips degraded (degrade_video: blur, down-up sampling, contrast, noise; video only)."""
    s = cfg.sync
    video, audio = batch["video"].astype(jnp.float32), batch["audio"]
    kb, kf = jax.random.split(key)
    if s.degrade > 0:
        video = degrade_video(jax.random.fold_in(key, 1), video, s)
    flip = jax.random.bernoulli(kf, 0.5, (video.shape[0],))[:, None, None, None, None]
    video = jnp.where(flip, video[:, :, :, ::-1], video)
    box = jittered_boxes(kb, video.shape[0], s.crop, s.crop_jitter)
    box = jnp.where(flip[:, 0, 0, 0], box.at[:, 2:].set(1.0 - box[:, 3:1:-1]), box)
    v = model.video(video, box)
    a = model.audio(audio)
    return sync_nce(v, a, s.min_shift, s.max_shift, s.tclip, s.score_penalty)
