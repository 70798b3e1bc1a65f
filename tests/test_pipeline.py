"""The grain pipeline on a tiny synthetic corpus (22 train clips of 20 frames, 32x32)."""

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from mirage_jax.config import base_config
from mirage_jax.data import pipeline, synthetic_aroll

DATASET = "synthetic_aroll/small_32px_20f"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("aroll")
    synthetic_aroll.prepare("small", str(d), num_clips=24, size=32, frames=20, workers=0)
    return str(d)


def make_cfg(data_dir, **data):
    c = base_config()
    with c.unlocked():
        c.data.update(
            dataset=DATASET,
            data_dir=data_dir,
            frames=8,
            height=32,
            width=32,
            audio_features=32,
            text_len=16,
            global_batch=4,
        )
        c.data.update(data)
    return c


def take(source, n):
    return [next(source) for _ in range(n)]


def test_batch_format(data_dir):
    cfg = make_cfg(data_dir)
    b = next(pipeline.GrainSource(cfg))
    expect = {
        "video": ((4, 8, 32, 32, 3), np.float32),
        "ref": ((4, 32, 32, 3), np.float32),
        "audio": ((4, 8, 32), np.float32),
        "text": ((4, 16), np.int32),
        "index": ((4,), np.int64),
        "ref_time": ((4,), np.float32),
        "mouth_open": ((4, 8), np.float32),
        "viseme": ((4, 8), np.int32),
    }
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == expect
    for k in ("video", "ref"):
        assert -1.0 <= b[k].min() and b[k].max() <= 1.0 and b[k].std() > 0.05
    assert np.isfinite(b["audio"]).all() and -2 < b["audio"].min() < b["audio"].max() < 4
    assert (b["text"][:, 0] == 1).all()  # BOS, then the caption's bytes
    assert ((0 <= b["index"]) & (b["index"] < 22)).all()


def test_log_mel_click_lands_in_its_frame():
    for offset in (0, 1):  # features of frames [offset, offset + 8) of the clip
        for k in range(offset, offset + 8):
            for within in (40, 320, 600):
                audio = np.zeros(12 * pipeline.HOP, np.float32)
                audio[k * pipeline.HOP + within] = 1.0
                feats = pipeline.log_mel(audio, offset, 8, 32)
                assert feats.shape == (8, 32)
                assert int(np.argmax(feats.sum(1))) == k - offset, (offset, k, within)


def test_log_mel_equals_librosa():
    """The in-house STFT and mel bank are librosa's (periodic Hann, no centring, Slaney)."""
    import librosa

    for n_mels in (32, 80):
        np.testing.assert_allclose(
            pipeline.mel_bank(n_mels),
            librosa.filters.mel(sr=pipeline.SAMPLE_RATE, n_fft=pipeline.N_FFT, n_mels=n_mels),
            rtol=0, atol=1e-8)
    audio = np.random.default_rng(0).normal(0.0, 0.1, 30 * pipeline.HOP).astype(np.float32)
    start, frames, hop = 3, 17, pipeline.HOP
    y = audio[start * hop - hop // 2:(start + frames) * hop + hop // 2]
    spec = librosa.stft(y, n_fft=pipeline.N_FFT, hop_length=hop, window="hann", center=False)
    mel = librosa.filters.mel(sr=pipeline.SAMPLE_RATE, n_fft=pipeline.N_FFT, n_mels=40)
    want = ((np.log(mel @ np.abs(spec) ** 2 + pipeline.LOG_FLOOR) + 5.0) / 4.0).T
    got = pipeline.log_mel(audio, start, frames, 40)
    assert got.shape == (frames, 40)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_audio_follows_the_mouth(data_dir):
    """Mel energy tracks mouth opening best at lag 0 (+-1 frame), not 2-3 frames off."""
    b = next(pipeline.GrainSource(make_cfg(data_dir, global_batch=16, frames=20)))
    energy, mouth = b["audio"].mean(-1), b["mouth_open"]

    def corr(lag):  # mouth at frame k + lag against audio features at frame k
        m = mouth[:, max(lag, 0) : 20 + min(lag, 0)]
        e = energy[:, max(-lag, 0) : 20 + min(-lag, 0)]
        return np.corrcoef(m.ravel(), e.ravel())[0, 1]

    assert corr(0) > 0.4
    assert corr(0) > max(corr(lag) for lag in (-3, -2, 2, 3)) + 0.1


def test_window_and_ref_come_from_the_stored_clip(data_dir):
    stored = tfds.data_source(DATASET, data_dir=data_dir)["train"]
    b = next(pipeline.GrainSource(make_cfg(data_dir, global_batch=8, random_flip=True)))
    flips = []
    for i in range(8):
        rec = stored[int(b["index"][i])]
        clip = rec["video"].astype(np.float32) / 127.5 - 1.0
        video = b["video"][i]
        plain = [s for s in range(13) if np.array_equal(video, clip[s : s + 8])]
        mirrored = [s for s in range(13) if np.array_equal(video, clip[s : s + 8, :, ::-1])]
        assert plain or mirrored, f"example {i}: video is not a window of its record"
        flip = not plain
        src, start = (clip[:, :, ::-1], mirrored[0]) if flip else (clip, plain[0])
        assert not 0 <= b["ref_time"][i] < 8  # outside the window: the clip is longer
        np.testing.assert_array_equal(b["ref"][i], src[start + int(b["ref_time"][i])])
        np.testing.assert_array_equal(b["mouth_open"][i], rec["mouth_open"][start : start + 8])
        flips.append(flip)
    assert any(flips) and not all(flips)


def test_two_hosts_read_disjoint_halves(data_dir):
    cfg = make_cfg(data_dir, global_batch=2)
    seen = []
    for host in (0, 1):
        src = pipeline.GrainSource(cfg, process_index=host, process_count=2)
        seen.append([int(b["index"][0]) for b in take(src, 11)])  # one epoch of 11 each
    assert all(len(set(s)) == 11 for s in seen)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(22))


def test_resume_gives_the_same_batches(data_dir):
    cfg = make_cfg(data_dir, random_flip=True)
    src = pipeline.GrainSource(cfg)
    take(src, 5)
    state = src.get_state()
    after = take(src, 3)
    fresh = pipeline.GrainSource(cfg)
    fresh.set_state(state)
    for a, b in zip(after, take(fresh, 3)):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert fresh.batch(8)["video"].shape == (4, 8, 32, 32, 3)
    with pytest.raises(RuntimeError, match="step 3 but the data iterator is at step 9"):
        fresh.batch(3)


def test_orbax_composite_round_trip(data_dir, tmp_path):
    """How the loop saves it: an async CheckpointManager, the iterator next to the state."""
    cfg = make_cfg(data_dir)
    src = pipeline.GrainSource(cfg)
    take(src, 2)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": pipeline.checkpoint_handler()}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
    with ocp.CheckpointManager(tmp_path, options=options, item_handlers=handlers) as mgr:
        mgr.save(
            2,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"x": np.zeros(3)}), data=pipeline.checkpoint_args(src)
            ),
        )
        after = take(src, 2)  # the loop goes on while the save finishes
        mgr.wait_until_finished()
    fresh = pipeline.GrainSource(cfg)
    with ocp.CheckpointManager(tmp_path, item_handlers=handlers) as mgr:
        mgr.restore(2, args=ocp.args.Composite(data=pipeline.checkpoint_args(fresh, True)))
    for a, b in zip(after, take(fresh, 2)):
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["index"], b["index"])


def test_wrong_stored_size_is_named(data_dir):
    with pytest.raises(ValueError, match=r"small_32px_20f.*32x32.*64x64"):
        pipeline.GrainSource(make_cfg(data_dir, height=64, width=64))


def test_precomputed_features_are_windowed_with_the_video():
    c = base_config()
    with c.unlocked():
        c.data.update(frames=4, height=8, width=8, audio_features=6, text_len=10)
    t = pipeline.ClipTransform(c)
    feats = np.arange(10 * 6, dtype=np.float32).reshape(10, 6)
    video = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 3), np.uint8)
    rec = {"video": video, "audio_features": feats, "caption": b"hi", "_index": 7}
    out = t.random_map(rec, np.random.default_rng(1))
    s = int(out["audio"][0, 0]) // 6
    np.testing.assert_array_equal(out["audio"], feats[s : s + 4])
    np.testing.assert_allclose(out["video"][:, 0, 0, 0], np.arange(s, s + 4) / 127.5 - 1.0, atol=1e-6)
    ref = s + int(out["ref_time"])
    assert not s <= ref < s + 4
    np.testing.assert_allclose(out["ref"][0, 0, 0], ref / 127.5 - 1.0)
    assert out["index"] == 7 and list(out["text"][:4]) == [1, 104 + 3, 105 + 3, 2]


def test_worker_processes_resume_too(data_dir):
    cfg = make_cfg(data_dir, workers=1)
    src = pipeline.GrainSource(cfg)
    take(src, 3)
    state = src.get_state()
    after = take(src, 2)
    fresh = pipeline.GrainSource(cfg)
    fresh.set_state(state)
    for a, b in zip(after, take(fresh, 2)):
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["audio"], b["audio"])
