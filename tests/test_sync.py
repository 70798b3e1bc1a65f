"""The sync judge (amdim/sync.py) and its metrics (amdim/metrics.py, amdim/calibrate.py):
SyncNet's protocol on constructed embeddings, the loss's shifted negatives, the Fréchet
distance, the viseme probe, and a tiny judge trained by the shared loop, end to end."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from mirage_jax import config
from mirage_jax.amdim import metrics
from mirage_jax.amdim.sync import candidates, sync_nce
from mirage_jax.data.pipeline import HOP, SILENCE


def _cfg(*overrides):
    return config.load(REPO / "configs" / "sync_demo.py", list(overrides))


class CodeJudge:
    """A judge that reads time codes: video frame t of a clip holds the code c_t in every
    pixel, audio frame t holds it in every bin (silence: SILENCE); window w embeds as the
    fixed random vector of its first frame's code. Codes that match make distance 0."""

    window, max_offset = 5, 15

    def __init__(self, n_codes=400, dim=64):
        self.table = np.random.default_rng(0).normal(size=(n_codes + 1, dim))  # last: silence

    def _embed(self, codes):
        w = codes.shape[1] - self.window + 1
        return self.table[codes[:, :w]]

    def video_embeddings(self, videos):
        return self._embed(np.rint(np.asarray(videos)[:, :, 0, 0, 0]).astype(int))

    def audio_embeddings(self, feats):
        x = np.asarray(feats)[:, :, 0]
        codes = np.where(np.isclose(x, SILENCE), -1, np.rint(x)).astype(int)
        return self._embed(codes)


def _clip(codes, frames=40):
    video = np.broadcast_to(np.asarray(codes, np.float32)[:, None, None, None], (frames, 2, 2, 3))
    return video


@pytest.mark.parametrize("lag", [0, 4, -7, 12])
def test_syncnet_protocol_finds_the_offset(lag):
    judge, t = CodeJudge(), 40
    video = _clip(np.arange(t), t)
    # Audio lagging the video by `lag` frames: audio frame t carries video frame t - lag.
    codes = np.arange(t) - lag
    audio = np.where((codes >= 0) & (codes < t), codes, SILENCE)[:, None].repeat(4, 1)
    r = metrics.sync_scores(judge, video, audio)
    assert r["offsets"] == list(range(-15, 16)) and len(r["dists"]) == 31
    assert r["offset"] == lag
    # At the lag every window whose audio is inside the clip matches (distance 0).
    assert r["sync_d"] == pytest.approx(min(r["dists"]))
    assert r["sync_d"] < 0.5 * sorted(r["dists"])[1]
    if lag == 0:
        assert r["sync_d"] == pytest.approx(0.0, abs=1e-9)
    assert r["sync_c"] == pytest.approx(np.median(r["dists"]) - min(r["dists"]))
    assert r["sync_c"] > 1.0
    assert (r["sync_c0"] == pytest.approx(r["sync_c"])) == (lag == 0)
    # Audio of another clip (other codes): no offset fits, a flat curve, no confidence.
    other = (np.arange(t) + 200)[:, None].repeat(4, 1).astype(np.float32)
    r_other = metrics.sync_scores(judge, video, other)
    assert r_other["sync_c"] < 0.1 * r["sync_c"]
    assert metrics.offset_accuracy([lag, lag + 1, lag + 3], lag) == pytest.approx(1 / 3)
    assert metrics.offset_accuracy([lag, lag + 1, lag + 3], lag, tol=1) == pytest.approx(2 / 3)


def test_scores_from_curve():
    dists = np.abs(np.arange(-15, 16) - 3) * 0.1 + 0.5
    r = metrics.scores_from_curve(dists)
    assert r["offset"] == 3 and r["sync_d"] == pytest.approx(0.5)
    assert r["sync_c"] == pytest.approx(np.median(dists) - 0.5)
    assert r["dist_at_0"] == pytest.approx(0.8)


def test_delay_audio_moves_the_features():
    rng = np.random.default_rng(0)
    wave = rng.normal(size=30 * HOP).astype(np.float32)
    f = metrics.audio_features(wave, 30, 16)
    for k in (4, -3):
        g = metrics.audio_features(metrics.delay_audio(wave, k), 30, 16)
        lo, hi = max(k, 0) + 1, 30 + min(k, 0) - 1  # frames whose window lies inside both
        np.testing.assert_allclose(g[lo:hi], f[lo - k:hi - k], atol=1e-4)


def test_candidates():
    b, w = 3, 20
    cand = np.asarray(candidates(b, w, 3, 15))
    assert cand.shape == (b * w, b * w) and (cand == cand.T).all() and cand.diagonal().all()
    for i in (0, 7, 19):  # window i of clip 0
        same = [j for j in range(w) if j == i or 3 <= abs(j - i) <= 15]
        assert cand[i, :w].nonzero()[0].tolist() == same
        assert cand[i, w:].all()  # every window of the other clips


def _nce_numpy(v, a, cand, c):
    s = c * np.tanh(v @ a.T / np.sqrt(v.shape[1]) / c)
    lse = lambda x, m: np.log(np.sum(np.exp(x) * m))
    v2a = np.mean([lse(s[i], cand[i]) - s[i, i] for i in range(len(s))])
    a2v = np.mean([lse(s[:, j], cand[:, j]) - s[j, j] for j in range(len(s))])
    return 0.5 * (v2a + a2v)


def test_loss_has_shifted_negatives():
    """A judge that knows the clip (identity) and nothing of time ties its positive with
    every shifted window of the clip; one that also codes time does not. Without shifted
    negatives (min_shift beyond the clip) the two score alike: identity would be enough."""
    rng = np.random.default_rng(0)
    b, w, d = 4, 26, 32
    ident = np.repeat(rng.normal(size=(b, 1, d)), w, axis=1) * 2.0
    timed = ident + rng.normal(size=(b, w, d)) * 2.0
    loss = {}
    for name, x in (("identity", ident), ("timed", timed)):
        x = jnp.asarray(x, jnp.float32)
        for shifts in ("with", "without"):
            lo, hi = (3, 15) if shifts == "with" else (w + 1, w + 1)
            loss[name, shifts] = sync_nce(x, x, lo, hi, 20.0, 0.0)[1]
    # Identity ties the positive with each shifted window: at least log(1 + their count).
    n_shifted = np.asarray(candidates(1, w, 3, 15)).sum(1) - 1
    assert float(loss["identity", "with"]["nce"]) >= np.mean(np.log(1 + n_shifted)) - 1e-3
    assert float(loss["identity", "with"]["top1_vs_shifted"]) == 0.0
    assert float(loss["timed", "with"]["top1_vs_shifted"]) > 0.9
    gap_with = float(loss["identity", "with"]["nce"] - loss["timed", "with"]["nce"])
    gap_without = float(loss["identity", "without"]["nce"] - loss["timed", "without"]["nce"])
    assert gap_with > 1.5 and gap_with > 5 * abs(gap_without), (gap_with, gap_without)
    # The loss against a direct computation, penalty included.
    v, a = rng.normal(size=(2, w, 8)) * 3, rng.normal(size=(2, w, 8)) * 3
    total, parts = sync_nce(jnp.asarray(v, jnp.float32), jnp.asarray(a, jnp.float32), 3, 15,
                            20.0, 5e-2)
    cand = np.asarray(candidates(2, w, 3, 15))
    vf, af = v.reshape(-1, 8), a.reshape(-1, 8)
    want = _nce_numpy(vf, af, cand, 20.0)
    np.testing.assert_allclose(float(parts["nce"]), want, rtol=1e-4)
    raw = vf @ af.T / np.sqrt(8)
    np.testing.assert_allclose(float(total), want + 5e-2 * np.mean(raw[cand] ** 2), rtol=1e-4)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 8))
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    near = metrics.frechet_distance(x, rng.normal(size=(2000, 8)))
    d = [metrics.frechet_distance(x, x + s) for s in (0.25, 0.5, 1.0)]
    assert near < d[0] < d[1] < d[2]
    assert d[2] == pytest.approx(8.0, rel=1e-6)  # a shift of 1 in 8 dims, same covariance
    assert metrics.frechet_distance(x, 2 * x) == pytest.approx(8 * (1 + 4 - 4), rel=0.1)


def test_viseme_probe():
    """Fit on 'real' frames whose feature codes the viseme; frames with other visemes'
    features score low against the same labels."""
    rng = np.random.default_rng(0)
    n, t, k = 20, 10, 5
    centres = rng.normal(size=(k, 6)) * 3
    visemes = rng.integers(0, k, size=(n, t))

    def feats(v):  # videos are [N, T, 1, 1, 1] holding the viseme id
        ids = np.asarray(v)[:, :, 0, 0, 0].astype(int)
        return centres[ids] + rng.normal(size=(*ids.shape, 6)) * 0.3

    frames = visemes[:, :, None, None, None].astype(np.float32)
    p = metrics.VisemeProbe(feats, k)
    row = p.fit(frames, visemes, np.arange(n))
    assert row["fit"] > 0.95 and row["val"] > 0.95
    assert p.accuracy(frames, visemes) > 0.95
    assert p.accuracy(frames, np.roll(visemes, 1, axis=0)) < 0.5
    assert p.predict(frames).shape == (n, t)


def test_config_checks():
    with pytest.raises(config.ConfigError, match="data.frames"):
        _cfg("data.frames=6")
    with pytest.raises(config.ConfigError, match="sync.min_shift"):
        _cfg("sync.min_shift=0")
    with pytest.raises(config.ConfigError, match="data.video"):
        _cfg("data.video=latents", "vae_checkpoint=x")


def test_training_lowers_the_sync_loss(sync_judge_run, corpus_dir):
    cfg, workdir = sync_judge_run  # conftest.py: trained by the shared loop, 60 steps
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == cfg.train.steps and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, (losses[:5], losses[-5:])
    assert {"nce_v2a", "nce_a2v", "score_penalty", "top1_vs_shifted"} <= set(rows[-1])

    # The trained judge through the metrics: one clip of the test split, 12 frames.
    judge = metrics.Judge.load(workdir)
    from mirage_jax.amdim.calibrate import load_clips

    clips = load_clips("synthetic_aroll/tiny", str(corpus_dir), "test", max_clips=2)
    feats = metrics.audio_features(clips["audio"][0], 12, 16)
    r = metrics.sync_scores(judge, clips["video"][0], feats)
    assert len(r["dists"]) == 31 and -15 <= r["offset"] <= 15 and r["sync_c"] >= 0.0
    assert judge.video_embeddings(clips["video"]).shape == (2, 8, 32)
    assert judge.frame_features(clips["video"]).shape == (2, 12, 32)


def test_calibrate_cli_end_to_end(sync_judge_run, corpus_dir, tmp_path):
    from mirage_jax import cli

    _, workdir = sync_judge_run
    out = tmp_path / "calibration.json"
    assert cli.main(["sync-calibrate", "--checkpoint", str(workdir), "--data_dir",
                     str(corpus_dir), "--shifts=-4,5", "--train-clips", "10",
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["clips"] == 8 and r["shifts"] == [-4, 5]
    assert len(r["shifted"]["offsets_found"]) == 16
    for cond in ("true", "shifted", "other_clip"):
        assert set(r[cond]["sync_c"]) == {"mean", "median", "std"}
    assert 0.0 <= r["true"]["offset_accuracy"] <= 1.0
    assert set(r["frechet"]) == {"test", "test_frozen_mouth", "test_shuffled_frames"}
    assert all(v >= 0.0 for v in r["frechet"].values())
    assert 0.0 <= r["viseme_probe"]["mouth_pixels"]["test_own_visemes"] <= 1.0
    # The judge exports like the other models and the metrics load it back from there.
    export_dir = tmp_path / "judge"
    assert cli.main(["export", "--checkpoint", str(workdir), "--out", str(export_dir)]) == 0
    assert metrics.Judge.load(export_dir).video_embeddings(np.zeros((1, 12, 16, 16, 3),
                                                                    np.uint8)).shape == (1, 8, 32)


def _small_cfg(*overrides):
    return _cfg("data.height=16", "data.width=16", "data.frames=12", "data.audio_features=16",
                "sync.crop_size=16", "sync.ndf=8", "sync.width=32", "sync.n_rkhs=32", *overrides)


def test_degrade_video():
    import jax

    from mirage_jax.amdim.sync import degrade_video

    rng = np.random.default_rng(0)
    video = jnp.asarray(rng.uniform(-1, 1, (4, 6, 16, 16, 3)), jnp.float32)
    key = jax.random.PRNGKey(3)
    s = _small_cfg().sync
    assert s.degrade > 0  # the demo recipe trains with it
    off = _small_cfg("sync.degrade=0.0").sync
    np.testing.assert_array_equal(degrade_video(key, video, off), video)
    # Every part off (blur 0, no down-up, full contrast, no noise): clips come back as they are.
    none = _small_cfg("sync.degrade=1.0", "sync.degrade_blur=0.0", "sync.degrade_down=(1,)",
                      "sync.degrade_contrast=0.0", "sync.degrade_noise=0.0").sync
    np.testing.assert_allclose(degrade_video(key, video, none), video, atol=1e-5)
    # All clips degraded: smoother (less pixel-to-pixel change), inside [-1, 1].
    on = _small_cfg("sync.degrade=1.0", "sync.degrade_noise=0.0").sync
    x = np.asarray(degrade_video(key, video, on))
    assert x.shape == video.shape and np.abs(x).max() <= 1.0
    tv = lambda v: np.abs(np.diff(np.asarray(v), axis=3)).mean(axis=(1, 2, 3, 4))
    assert (tv(x) < tv(video)).all()
    # One draw per clip: a clip of one repeated frame stays one repeated frame.
    still = jnp.broadcast_to(video[:, :1], video.shape)
    y = np.asarray(degrade_video(key, still, on))
    np.testing.assert_allclose(y, np.broadcast_to(y[:, :1], y.shape), atol=1e-6)


def test_degradation_is_training_only_and_video_only(monkeypatch):
    import jax
    from flax import nnx

    from mirage_jax.amdim import sync

    cfg = _small_cfg("sync.degrade=1.0")
    clean = _small_cfg("sync.degrade=0.0")
    model = sync.SyncJudge(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(1)
    batch = {"video": jnp.asarray(rng.uniform(-1, 1, (2, 12, 16, 16, 3)), jnp.float32),
             "audio": jnp.asarray(rng.normal(size=(2, 12, 16)), jnp.float32)}
    key = jax.random.PRNGKey(0)
    seen = {"video": [], "audio": []}
    video_fn, audio_fn = model.video, model.audio
    monkeypatch.setattr(model, "video", lambda x, box=None: (seen["video"].append(x),
                                                             video_fn(x, box))[1])
    monkeypatch.setattr(model, "audio", lambda a: (seen["audio"].append(a), audio_fn(a))[1])
    loss_on, _ = sync.sync_loss(model, batch, key, cfg)
    loss_off, _ = sync.sync_loss(model, batch, key, clean)
    assert np.isfinite(float(loss_on)) and float(loss_on) != pytest.approx(float(loss_off))
    # Same key, same flips and boxes: only the video the judge saw differs, not the audio.
    np.testing.assert_array_equal(seen["audio"][0], seen["audio"][1])
    np.testing.assert_array_equal(seen["audio"][0], batch["audio"])
    assert np.abs(np.asarray(seen["video"][0]) - np.asarray(seen["video"][1])).mean() > 1e-3

    # The evaluation path (the model's own video / frame_features, which metrics.Judge jits)
    # never degrades; sync_loss does exactly when sync.degrade > 0.
    def boom(*_):
        raise AssertionError("degraded")

    monkeypatch.setattr(sync, "degrade_video", boom)
    a = np.asarray(video_fn(batch["video"]))
    np.testing.assert_array_equal(a, np.asarray(video_fn(batch["video"])))
    assert np.asarray(model.frame_features(batch["video"])).shape == (2, 12, 32)
    sync.sync_loss(model, batch, key, clean)
    with pytest.raises(AssertionError, match="degraded"):
        sync.sync_loss(model, batch, key, cfg)
