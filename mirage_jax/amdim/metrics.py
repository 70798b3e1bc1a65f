"""Lip-sync and realism metrics on the sync judge (issue 7, musts 4-5).

SyncNet's protocol (Chung & Zisserman 2016, syncnet_python's `calc_pdist`) with our judge
(sync.py) in SyncNet's place:

  for each offset o in -K..K (K = `sync.max_shift` = 15 frames): the mean, over every
  video window w of the clip, of the distance between the video embedding of window w and
  the audio embedding of window w + o (audio outside the clip is silence, as SyncNet pads
  with zeros). Distance: Euclidean between L2-normalised embeddings (in [0, 2]).
  Sync-D = the minimum of that curve; Sync-C = its median minus its minimum; the offset
  found = the argmin. Offset o > 0: the audio lags the video by o frames.

We also report `sync_c0` = median - distance at offset 0, the confidence of the alignment
as given (Sync-C searches the offset, so audio that is merely late still scores high on
it; `sync_c0` does not).

Besides sync: the offset accuracy over clips, the Fréchet distance between two sets of
clips in the judge's video-embedding space (the AMDIM video features), and the viseme
accuracy of frames under a linear probe fit on real frames (`VisemeProbe`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mirage_jax.amdim import probe as probe_lib
from mirage_jax.data.pipeline import HOP, SILENCE, log_mel


class Judge:
    """A trained SyncJudge for evaluation, jitted: `video_embeddings(videos)` [N, T, H, W, 3]
    (uint8, or float in [-1, 1]) -> [N, T - window + 1, D]; `audio_embeddings(feats)`
    [N, T, F] -> [N, T - window + 1, D]; `frame_features(videos)` -> [N, T, width].
    Any object with these three methods and `window`, `max_offset` can be judged with.

    Clips go through in batches of exactly `batch` (the last one padded): one compiled shape
    per clip length, bounded memory, and a clip's numbers do not depend on the clips that
    came with it, so a sharded evaluation reproduces an unsharded one clip by clip."""

    def __init__(self, model, cfg, batch: int = 8):
        self.cfg, self.window, self.max_offset = cfg, cfg.sync.window, cfg.sync.max_shift
        self.n_mels, self.batch = cfg.data.audio_features, batch
        self._graphdef, self._params = nnx.split(model, nnx.Param)

    @classmethod
    def load(cls, checkpoint, weights: str = "ema") -> Judge:
        """The judge of a `task=sync` run (workdir, checkpoints dir or export), on this
        process's first device."""
        from mirage_jax import sharding
        from mirage_jax.train.checkpoint import load_run

        run = load_run(checkpoint, sharding.data_mesh(jax.local_devices()[:1]), weights)
        if run["cfg"].task != "sync":
            raise ValueError(f"{run['where']} is a '{run['cfg'].task}' checkpoint, not a sync "
                             f"judge")
        judge = cls(nnx.merge(run["graphdef"], run["params"]), run["cfg"])
        judge.step, judge.where = run["step"], run["where"]
        return judge

    def _run(self, method: str, x) -> np.ndarray:
        x, out = np.asarray(x), []
        for i in range(0, len(x), self.batch):
            part = x[i:i + self.batch]
            pad = np.zeros((self.batch - len(part), *part.shape[1:]), part.dtype)
            y = _apply(self._graphdef, self._params, method, _signed(np.concatenate([part, pad])))
            out.append(np.asarray(y)[:len(part)])
        return np.concatenate(out)

    def video_embeddings(self, videos):
        return self._run("video", videos)

    def audio_embeddings(self, feats):
        return self._run("audio", np.asarray(feats, np.float32))

    def frame_features(self, videos):
        return self._run("frame_features", videos)


def _signed(videos):
    """uint8 pixels -> [-1, 1]; float arrays (already signed, or audio features) as they are."""
    if videos.dtype == np.uint8:
        return jnp.asarray(videos, jnp.float32) / 127.5 - 1.0
    return jnp.asarray(videos, jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _apply(graphdef, params, method: str, x):
    return getattr(nnx.merge(graphdef, params), method)(x)


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def offset_curve(v, a_padded, max_offset: int) -> np.ndarray:
    """v [W, D]: video windows; a_padded [W + 2K, D]: audio windows of the clip's audio
    padded with K frames of silence each side (window j codes clip window j - K).
    Returns [2K + 1] mean distances, offsets -K..K."""
    v, a = _unit(np.asarray(v, np.float64)), _unit(np.asarray(a_padded, np.float64))
    w, k = len(v), max_offset
    if len(a) != w + 2 * k:
        raise ValueError(f"{len(a)} padded audio windows for {w} video windows and K={k}")
    return np.array([np.linalg.norm(v - a[o + k:o + k + w], axis=-1).mean()
                     for o in range(-k, k + 1)])


def scores_from_curve(dists) -> dict:
    """Sync-D, Sync-C, the offset found (and sync_c0) of one clip's curve (offsets -K..K)."""
    dists = np.asarray(dists, np.float64)
    k = (len(dists) - 1) // 2
    i, med = int(np.argmin(dists)), float(np.median(dists))
    return {"offsets": list(range(-k, k + 1)), "dists": dists.tolist(),
            "sync_d": float(dists[i]), "sync_c": med - float(dists[i]), "offset": i - k,
            "dist_at_0": float(dists[k]), "sync_c0": med - float(dists[k])}


def pad_audio(feats, k: int, fill: float = SILENCE):
    """[..., T, F] -> [..., T + 2k, F]: k frames of `fill` (log-mel silence) each side."""
    feats = np.asarray(feats, np.float32)
    pad = [(0, 0)] * (feats.ndim - 2) + [(k, k), (0, 0)]
    return np.pad(feats, pad, constant_values=fill)


def sync_scores_batch(judge, videos, audios, video_emb=None) -> list[dict]:
    """`sync_scores` of N clips at once: videos [N, T, H, W, 3], audios [N, T, F]
    (`video_emb` [N, W, D]: the videos' embeddings, if already computed)."""
    k = judge.max_offset
    v = judge.video_embeddings(videos) if video_emb is None else video_emb
    a = judge.audio_embeddings(pad_audio(audios, k))
    return [scores_from_curve(offset_curve(v[i], a[i], k)) for i in range(len(v))]


def sync_scores(judge, video, audio) -> dict:
    """SyncNet's protocol on one clip: video [T, H, W, 3], audio features [T, F] (log-mel,
    one frame per video frame) -> {offsets, dists (mean distance per offset), sync_d,
    sync_c, offset, dist_at_0, sync_c0}."""
    return sync_scores_batch(judge, np.asarray(video)[None], np.asarray(audio)[None])[0]


def offset_accuracy(found, expected, tol: int = 0) -> float:
    """Fraction of clips whose found offset is within `tol` frames of the expected one."""
    found, expected = np.asarray(found), np.broadcast_to(np.asarray(expected), np.shape(found))
    return float(np.mean(np.abs(found - expected) <= tol))


def frechet_distance(x, y) -> float:
    """Fréchet distance between Gaussians fit to feature sets x [N, D] and y [M, D]:
    |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2)) (FID's formula)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = x.mean(0), y.mean(0)
    sx, sy = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    # tr((S_x S_y)^(1/2)) = sum of the square roots of the eigenvalues of S_x S_y (real and
    # >= 0 for two PSD matrices; rounding can leave tiny negative or imaginary parts).
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvals(sx @ sy).real, 0.0, None)))
    return float(max(np.sum((mx - my) ** 2) + np.trace(sx) + np.trace(sy) - 2 * tr_covmean, 0.0))


def video_features(judge, videos, batch: int = 8) -> np.ndarray:
    """Every window's video embedding of clips [N, T, H, W, 3] -> [N * W, D] (the feature
    set of `frechet_distance`)."""
    out = [judge.video_embeddings(videos[i:i + batch]) for i in range(0, len(videos), batch)]
    out = np.concatenate(out)
    return out.reshape(-1, out.shape[-1])


class VisemeProbe:
    """A multinomial logistic regression from per-frame features to the frame's viseme, fit
    on real frames (probe.py's fit: standardised features, L2 chosen on held-out clips) and
    then applied to any frames, e.g. generated ones against the visemes of the speech that
    conditioned them. `features(videos [N, T, H, W, 3]) -> [N, T, C]` defaults to the
    judge's per-frame mouth features."""

    def __init__(self, features, n_classes: int):
        self.features, self.n_classes = features, n_classes
        self.params = None

    def fit(self, videos, visemes, clip_ids, l2s=(1e-4, 1e-3, 1e-2), batch: int = 8) -> dict:
        """videos [N, T, ...] real clips, visemes [N, T]; a fifth of the clips (by
        `clip_ids % 5 == 4`) choose the L2 weight. Returns the chosen fit's row."""
        x = self._feats(videos, batch)
        y = np.asarray(visemes).reshape(-1).astype(np.int32)
        is_val = np.repeat(np.asarray(clip_ids) % 5 == 4, np.shape(visemes)[1])
        self.mu, self.sd = x[~is_val].mean(0), x[~is_val].std(0) + 1e-6
        xs = (x - self.mu) / self.sd
        self.params, row = probe_lib.select_l2(xs[~is_val], y[~is_val], xs[is_val], y[is_val],
                                               self.n_classes, l2s)
        return row

    def _feats(self, videos, batch):
        out = [np.asarray(self.features(videos[i:i + batch])) for i in range(0, len(videos),
                                                                              batch)]
        out = np.concatenate(out)
        return out.reshape(-1, out.shape[-1]).astype(np.float32)

    def _predict_std(self, xs):
        logits = np.asarray(xs @ np.asarray(self.params["w"]) + np.asarray(self.params["b"]))
        logits[:, self.n_classes:] = -np.inf
        return np.argmax(logits, -1)

    def predict(self, videos, batch: int = 8) -> np.ndarray:
        """[N, T] predicted visemes of frames [N, T, H, W, 3]."""
        x = self._feats(videos, batch)
        return self._predict_std((x - self.mu) / self.sd).reshape(len(videos), -1)

    def accuracy(self, videos, visemes, batch: int = 8) -> float:
        """Viseme accuracy of frames against `visemes` [N, T] (for generated frames: the
        visemes of the conditioning speech)."""
        return float(np.mean(self.predict(videos, batch) == np.asarray(visemes)))


def delay_audio(wave, frames: int):
    """A waveform delayed by `frames` video frames (negative: advanced), zeros shifted in,
    length kept: the sound of video frame t is then heard at frame t + frames."""
    wave, n = np.asarray(wave, np.float32), frames * HOP
    out = np.zeros_like(wave)
    if n >= 0:
        out[n:] = wave[:len(wave) - n]
    else:
        out[:n] = wave[-n:]
    return out


def audio_features(wave, n_frames: int, n_mels: int) -> np.ndarray:
    """[n_frames, n_mels] log-mel of a clip's waveform, as the training pipeline makes it."""
    return log_mel(np.asarray(wave, np.float32), 0, n_frames, n_mels)
