"""Media I/O: write_mp4 -> PyAV read-back, load_audio resampling and errors, read_video."""

from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile as sf

from mirage_jax.media import MediaError, load_audio, read_video, write_mp4


def tone(freq, seconds, sr, channels=1, amp=0.3):
    t = np.arange(int(round(seconds * sr))) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=0)  # [C, N]


def squares(n, h=48, w=64, color=(255, 40, 40)):
    f = np.full((n, h, w, 3), 30, np.uint8)
    for t in range(n):
        x = (2 * t) % (w - 12)
        f[t, 10:22, x : x + 12] = color
    return f


def make_av(path, frames, audio=None, sr=48000, fps=30):
    """Raw PyAV writer (not write_mp4) so the readers are tested on foreign files."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=Fraction(fps))
        vs.height, vs.width = frames.shape[1:3]
        vs.pix_fmt = "yuv420p"
        if audio is not None:
            as_ = c.add_stream("aac", rate=sr)
            as_.layout = "stereo" if audio.shape[0] == 2 else "mono"
        for im in frames:
            c.mux(vs.encode(av.VideoFrame.from_ndarray(im, format="rgb24")))
        c.mux(vs.encode(None))
        if audio is not None:
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio), format="fltp", layout=as_.layout.name)
            af.sample_rate, af.pts = sr, 0
            c.mux(as_.encode(af))
            c.mux(as_.encode(None))


def peak_hz(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


def test_write_mp4_streams_and_durations(tmp_path):
    audio = tone(440, 1.99, 16000)[0]  # 31840 samples = 49.75 frames -> 50 frames
    frames = squares(40, h=47, w=63)  # odd size and too few frames on purpose
    out = write_mp4(tmp_path / "o.mp4", frames, audio)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4"]  # no temp file left over
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and v.codec_context.pix_fmt == "yuv420p"
        assert v.average_rate == 25 and (v.width, v.height) == (64, 48)
        assert a.codec_context.name == "aac" and a.rate == 16000
        n = sum(1 for _ in c.decode(v))
        v_dur = float(v.duration * v.time_base)
        a_dur = float(a.duration * a.time_base)
    assert n == 50
    assert abs(v_dur - len(audio) / 16000) <= 1 / 25
    assert abs(v_dur - a_dur) <= 1 / 25
    back = load_audio(out)
    assert abs(len(back) - len(audio)) <= 640
    assert abs(peak_hz(back, 16000) - 440) < 3


def test_write_mp4_trims_long_video_and_silent(tmp_path):
    write_mp4(tmp_path / "a.mp4", squares(60), tone(300, 1.0, 16000)[0])
    frames, audio = read_video(tmp_path / "a.mp4")
    assert frames.shape == (25, 48, 64, 3) and audio.shape == (16000,)
    write_mp4(tmp_path / "s.mp4", squares(10), None)
    frames, audio = read_video(tmp_path / "s.mp4")
    assert frames.shape[0] == 10 and audio is None
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "bad.mp4", squares(3).astype(np.float32), None)


def test_load_audio_48k_stereo_to_16k_mono(tmp_path):
    x = tone(1000, 1.5, 48000, channels=2)
    x[1] *= 0.5  # unequal channels: mono must be their mean
    sf.write(tmp_path / "s.wav", x.T, 48000, subtype="FLOAT")
    y = load_audio(tmp_path / "s.wav")
    assert y.dtype == np.float32 and y.ndim == 1 and len(y) == 24000
    assert abs(peak_hz(y, 16000) - 1000) < 2
    assert abs(np.abs(y[1000:-1000]).max() - 0.225) < 0.01  # mean of 0.3 and 0.15
    # same through a compressed container (m4a-like: aac in mp4) at 48 kHz stereo
    make_av(tmp_path / "v.mp4", squares(30), tone(700, 1.0, 48000, channels=2))
    y = load_audio(tmp_path / "v.mp4")
    assert abs(len(y) - 16000) <= 16 and abs(peak_hz(y, 16000) - 700) < 3
    flac = tmp_path / "f.flac"
    sf.write(flac, tone(500, 0.5, 22050)[0], 22050)
    assert len(load_audio(flac)) == 8000


@pytest.mark.parametrize("kind", ["text", "empty", "nan", "missing", "silent_video"])
def test_load_audio_errors(tmp_path, kind):
    p = tmp_path / "x.wav"
    if kind == "text":
        p.write_text("this is not audio\n" * 20)
    elif kind == "empty":
        sf.write(p, np.zeros(0, np.float32), 16000)
    elif kind == "nan":
        x = tone(440, 0.2, 16000)[0]
        x[100] = np.nan
        sf.write(p, x, 16000, subtype="FLOAT")
    elif kind == "silent_video":
        p = tmp_path / "x.mp4"
        make_av(p, squares(5))
    with pytest.raises(MediaError, match=str(p.name)) as e:
        load_audio(p)
    assert isinstance(e.value, ValueError)
    msg = {"text": "not a readable", "empty": "empty", "nan": "NaN", "missing": "no such file",
           "silent_video": "no audio stream"}[kind]
    assert msg in str(e.value)


def test_read_video_30fps_to_25_crop_and_audio(tmp_path):
    frames = squares(60, h=48, w=80)  # 2 s at 30 fps
    for t in range(60):
        frames[t, 32:, :16] = 4 * t  # frame index stamped in a corner, to check the timing
    make_av(tmp_path / "v.mp4", frames, tone(440, 2.0, 48000, channels=2))
    v, a = read_video(tmp_path / "v.mp4", size=32)
    assert v.shape == (50, 32, 32, 3) and v.dtype == np.uint8
    assert a.dtype == np.float32 and abs(len(a) - 32000) <= 16
    assert abs(peak_hz(a, 16000) - 440) < 3
    full, _ = read_video(tmp_path / "v.mp4")
    assert full.shape == (50, 48, 80, 3)
    stamp = full[:, 36:44, 4:12, 0].mean(axis=(1, 2)) / 4  # source index of each 25 fps frame
    assert np.all(np.abs(stamp - np.round(np.arange(50) * 30 / 25)) <= 0.3)


def test_read_video_corrupt_and_missing(tmp_path):
    write_mp4(tmp_path / "ok.mp4", squares(25), tone(440, 1.0, 16000)[0])
    data = (tmp_path / "ok.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cut.mp4"):
        read_video(tmp_path / "cut.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(MediaError, match="junk.mp4"):
        read_video(tmp_path / "junk.mp4")
    with pytest.raises(MediaError, match="no such file"):
        read_video(tmp_path / "nope.mp4")
