"""Synthetic A-roll corpus: espeak TTS, visemes, face renderer, TFDS ArrayRecord build."""
import time

import numpy as np
import pytest

from mirage_jax.data import face, sentences, synthetic_aroll, tts, visemes

SPF = synthetic_aroll.SAMPLES_PER_FRAME


def _bilabial_frames(phonemes: str, starts: np.ndarray, n_frames: int):
    """Frames overlapping each p/b/m phoneme, whose span runs to the next phoneme."""
    ends = np.append(starts[1:], n_frames * SPF)
    frames = set()
    for ph, s, e in zip(phonemes.split(), starts, ends):
        if visemes.is_bilabial(ph):
            frames.update(range(s // SPF, min(max(-(-e // SPF), s // SPF + 1), n_frames)))
    return sorted(frames)


def test_speak_audio_and_phoneme_events():
    audio, events = tts.speak("Peter bought my big map.", voice="woman")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.5 < len(audio) / 16000 < 4.0
    assert np.sqrt(np.mean(audio ** 2)) > 0.02 and np.abs(audio).max() <= 1.0
    starts = np.array([s for _, s in events])
    assert len(events) > 10 and np.all(np.diff(starts) >= 0) and starts[-1] <= len(audio)
    assert sum(visemes.is_bilabial(p) for p, _ in events) >= 5  # p b m b m p
    # Events sit on speech, not silence: audio around the vowels is loud.
    vowel = [s for p, s in events if visemes.phoneme_to_viseme(p) == 9]
    assert vowel and all(np.abs(audio[s:s + 800]).max() > 0.05 for s in vowel)
    again = tts.speak("Peter bought my big map.", voice="woman")
    assert again[1] == events and len(again[0]) == len(audio)  # timings are reproducible
    native, _ = tts.speak("Peter bought my big map.", voice="woman", sample_rate=22050)
    assert abs(len(native) / len(audio) - 22050 / 16000) < 0.01


def test_speak_errors():
    with pytest.raises(ValueError, match="text"):
        tts.speak("   ")
    with pytest.raises(ValueError, match="rate"):
        tts.speak("hello", rate=10)
    with pytest.raises(ValueError, match="voice"):
        tts.speak("hello", voice="no-such-voice-xx")


def test_viseme_table():
    v = visemes.phoneme_to_viseme
    assert v("p") == v("b") == v("m") == 1 and visemes.VISEME_NAMES[1] == "closed"
    assert v("_:") == 0 and v("f") == v("v") == 2 and v("s") == v("z") == 4
    assert visemes.VISEME_NAMES[v("'aI")] == "open"
    assert visemes.VISEME_NAMES[v("'u:")] == "rounded"
    assert visemes.VISEME_NAMES[v("i:")] == "spread"
    assert len(visemes.VISEME_NAMES) == len(visemes.MOUTH_TARGETS) == 11


def test_clip_mouth_closed_on_bilabials_and_aligned():
    checked = 0
    for i in range(12):
        ex = synthetic_aroll.generate_clip(i, frames=50, size=32)
        n = 50
        assert ex["video"].shape == (n, 32, 32, 3) and ex["video"].dtype == np.uint8
        assert ex["audio"].shape == (n * SPF,) and ex["audio"].dtype == np.float32
        assert ex["viseme"].shape == ex["mouth_open"].shape == (n,)
        starts = ex["phoneme_samples"]
        assert len(starts) == len(ex["phonemes"].split()) > 3
        assert np.all(np.diff(starts) >= 0) and 0 <= starts[0] and starts[-1] < n * SPF
        # Speech lies inside the clip: the audio after the last phoneme is short.
        loud = np.nonzero(np.abs(ex["audio"]) > 1e-3)[0]
        assert loud[0] >= starts[0] - SPF and loud[-1] < n * SPF
        frames = _bilabial_frames(ex["phonemes"], starts, n)
        checked += len(frames)
        assert np.all(ex["mouth_open"][frames] < 1e-6), (i, ex["sentence"])
        assert np.all(ex["viseme"][frames] == 1)
        assert ex["mouth_open"].max() > 0.3  # the mouth really opens in between
        assert np.all((ex["mouth_open"] >= 0) & (ex["mouth_open"] <= 1))
    assert checked > 20


def test_renderer_shape_speed_and_mouth_pixels():
    spk = face.Speaker.sample(3)
    assert spk.gender in spk.caption() and spk.shirt in spk.caption()
    t = 50
    blink, sway = np.zeros(t, np.float32), np.zeros((t, 2), np.float32)
    shut = np.tile([[0.0, 0.5, 0.2]], (t, 1)).astype(np.float32)
    wide = np.tile([[1.0, 0.5, 0.2]], (t, 1)).astype(np.float32)
    best = min(_timed(face.render_clip, spk, shut, blink, sway, 64) for _ in range(3))
    assert best < 0.1
    a = face.render_clip(spk, shut, blink, sway, 64)
    b = face.render_clip(spk, wide, blink, sway, 64)
    assert a.shape == (t, 64, 64, 3) and a.dtype == np.uint8
    diff = np.abs(a.astype(int) - b.astype(int)).sum(-1)[0]
    ys, xs = np.nonzero(diff > 30)
    assert len(ys) > 15  # an open mouth is a visible dark hole
    assert ys.min() > 28 and ys.mean() > 34 and abs(xs.mean() - 32) < 4  # lower mid face
    assert diff[:25].sum() == 0  # eyes, hair and wall untouched
    closed = face.render_clip(spk, shut, np.ones(t, np.float32), sway, 64)
    assert np.abs(closed[0].astype(int) - a[0].astype(int))[:32].sum() > 0  # blinking


def _timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def test_sentences_distinct_and_deterministic():
    many = sentences.sentences(3000, seed=0)
    assert len(set(many)) >= 2000
    assert sentences.sentences(20, seed=5) == sentences.sentences(20, seed=5)
    assert all(len(s.split()) <= 4 for s in sentences.sentences(200, seed=1, max_words=4))


def test_tiny_build_writes_array_record_and_reads_back(tmp_path):
    import tensorflow_datasets as tfds

    synthetic_aroll.prepare("small", str(tmp_path), num_clips=8, size=32, workers=2)
    files = list(tmp_path.rglob("*array_record*"))
    assert {f.name.split(".")[0] for f in files} == {"synthetic_aroll-train", "synthetic_aroll-test"}
    ds = tfds.data_source("synthetic_aroll/small_32px_50f", data_dir=str(tmp_path))
    assert len(ds["train"]) == 7 and len(ds["test"]) == 1
    for ex in [ds["train"][i] for i in range(7)] + [ds["test"][0]]:
        assert ex["video"].shape == (50, 32, 32, 3) and ex["video"].dtype == np.uint8
        assert ex["audio"].shape == (50 * SPF,) and ex["audio"].dtype == np.float32
        assert ex["viseme"].shape == (50,) and ex["viseme"].dtype == np.int32
        assert ex["mouth_open"].shape == (50,) and ex["mouth_open"].dtype == np.float32
        assert ex["phoneme_samples"].dtype == np.int32
        phonemes = ex["phonemes"].decode()
        assert len(phonemes.split()) == len(ex["phoneme_samples"])
        assert ex["caption"] and ex["sentence"] and 0 <= int(ex["speaker_id"]) < 16
        frames = _bilabial_frames(phonemes, ex["phoneme_samples"], 50)
        assert np.all(ex["mouth_open"][frames] < 1e-6)
    # Parallel generation is reproducible: the stored clip equals one made here. Timings and
    # labels are exact; espeak's glottal phase and echo depend on what a process spoke
    # before, so the waveform is compared by its per-frame loudness.
    ex = ds["train"][0]
    split, idx = ex["clip_id"].decode().split("_")
    ref = synthetic_aroll.generate_clip(int(idx), split, frames=50, size=32)
    assert ex["sentence"].decode() == ref["sentence"]
    np.testing.assert_array_equal(ex["phoneme_samples"], ref["phoneme_samples"])
    np.testing.assert_array_equal(ex["mouth_open"], ref["mouth_open"])
    np.testing.assert_array_equal(ex["viseme"], ref["viseme"])
    loud = [np.sqrt((a.reshape(50, SPF) ** 2).mean(1)) for a in (ex["audio"], ref["audio"])]
    assert np.abs(loud[0] - loud[1]).max() < 0.15 * loud[1].max()
    assert np.abs(ex["video"].astype(int) - ref["video"]).mean() < 0.5


def test_configs():
    cfgs = {c.name: c for c in synthetic_aroll.SyntheticAroll.BUILDER_CONFIGS}
    assert cfgs["small"].num_train + cfgs["small"].num_test == 352
    assert cfgs["large"].num_train + cfgs["large"].num_test == 20_000
    assert cfgs["small"].frames == 50 and cfgs["small"].size == 64
    with pytest.raises(ValueError, match="config"):
        synthetic_aroll.prepare("medium", "/nonexistent")
