"""TFDS `aroll_folder`: real files -> ArrayRecord clips; bad files skipped and named."""

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mirage_jax.data import aroll_folder
from mirage_jax.data.aroll_folder import prepare, scene_cuts, split_clips


def make_av(path, frames, sr=48000, channels=2, fps=25, audio=True):
    """Moving-square video with a sine tone, written with raw PyAV."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=Fraction(fps))
        vs.height, vs.width = frames.shape[1:3]
        vs.pix_fmt = "yuv420p"
        vs.options = {"preset": "ultrafast"}
        if audio:  # all streams must exist before the first packet is muxed
            as_ = c.add_stream("aac", rate=sr)
            as_.layout = "stereo" if channels == 2 else "mono"
        for im in frames:
            c.mux(vs.encode(av.VideoFrame.from_ndarray(im, format="rgb24")))
        c.mux(vs.encode(None))
        if audio:
            n = int(len(frames) / fps * sr)
            x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / sr)).astype(np.float32)
            af = av.AudioFrame.from_ndarray(np.stack([x] * channels), format="fltp", layout=as_.layout.name)
            af.sample_rate, af.pts = sr, 0
            c.mux(as_.encode(af))
            c.mux(as_.encode(None))


def scene(n, bg, h=36, w=48):
    f = np.empty((n, h, w, 3), np.uint8)
    f[:] = bg
    for t in range(n):
        f[t, 8:18, t % (w - 10) : t % (w - 10) + 10] = (255, 255, 0)
    return f


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("manual")
    (d / "sub").mkdir()
    make_av(d / "talk.mp4", scene(45, (200, 30, 30)), fps=30)  # 1.5 s -> 37/38 frames at 25 fps: 3 clips of 12
    (d / "talk.txt").write_text("A woman talks.\n")
    # scene cut at frame 30: shots of 30 and 20 frames -> 2 + 1 clips (a clip over the cut would make 4)
    make_av(d / "sub" / "cut.mov", np.concatenate([scene(30, (20, 20, 200)), scene(20, (240, 240, 240))]),
            sr=16000, channels=1)
    make_av(d / "tiny.mkv", scene(8, (0, 120, 0)))  # shorter than one clip: dropped
    make_av(d / "mute.mp4", scene(30, (90, 90, 90)), audio=False)
    good = (d / "talk.mp4").read_bytes()
    (d / "broken.mp4").write_bytes(good[: len(good) // 3])
    (d / "notes.txt").write_text("not a video")
    return d


def test_scene_cut_helpers():
    f = np.concatenate([scene(10, (0, 0, 0)), scene(7, (255, 255, 255))])
    assert scene_cuts(f, 30.0).tolist() == [10]
    assert split_clips(17, [10], 4) == ([0, 4, 10], 0)
    assert split_clips(17, [3, 10], 4) == ([3, 10], 1)


def test_prepare_writes_array_record_and_skips_bad(manual_dir, tmp_path):
    summary = prepare(manual_dir, tmp_path / "data", size=16, clip_frames=12)
    assert summary["name"] == "aroll_folder/s16_t12"
    skipped = {s["file"]: s["reason"] for s in summary["skipped"]}
    assert set(skipped) == {"broken.mp4", "mute.mp4"}
    assert "no audio stream" in skipped["mute.mp4"]
    assert summary["files"] == 5 and summary["files_used"] == 2
    assert summary["scene_cuts"] == 1 and summary["short_dropped"] == 1
    assert summary["clips"] == summary["examples"] == 6

    ds_dir = Path(summary["data_dir"])
    assert list(ds_dir.glob("*.array_record*"))
    on_disk = json.loads((ds_dir / "skipped.json").read_text())
    assert {s["file"] for s in on_disk["skipped"]} == {"broken.mp4", "mute.mp4"}

    src = tfds.data_source("aroll_folder/s16_t12", data_dir=str(tmp_path / "data"))["train"]
    assert len(src) == 6
    ex = {e["clip_id"].decode() if isinstance(e["clip_id"], bytes) else e["clip_id"]: e for e in src}
    assert sorted(ex) == ["sub/cut_0000", "sub/cut_0001", "sub/cut_0002",
                          "talk_0000", "talk_0001", "talk_0002"]
    for e in ex.values():
        assert e["video"].shape == (12, 16, 16, 3) and e["video"].dtype == np.uint8
        assert e["audio"].shape == (12 * 640,) and e["audio"].dtype == np.float32
    cap = ex["talk_0001"]["caption"]
    assert (cap.decode() if isinstance(cap, bytes) else cap) == "A woman talks."
    assert ex["sub/cut_0000"]["caption"] in (b"", "")
    # no clip spans the cut: the third "cut" clip is all white-background, the first two all blue
    assert ex["sub/cut_0002"]["video"][:, -1, -1].min() > 200
    assert ex["sub/cut_0001"]["video"][:, -1, -1, 2].min() > 150
    assert ex["sub/cut_0001"]["video"][:, -1, -1, 0].max() < 80
    # the tone survives as sound (not silence) at 16 kHz
    a = ex["talk_0000"]["audio"]
    assert 0.15 < np.abs(a[640:]).max() < 0.4
    spec = np.abs(np.fft.rfft(a))
    assert abs(np.argmax(spec) * 16000 / len(a) - 440) < 5

    # preparing again reuses the dataset and its summary
    again = prepare(manual_dir, tmp_path / "data", size=16, clip_frames=12)
    assert again["clips"] == 6 and len(again["skipped"]) == 2


def test_default_config_and_empty_dir(tmp_path):
    assert aroll_folder.ArollFolder.BUILDER_CONFIGS[0].name == "s64_t50"
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssertionError, match="video files"):  # TFDS prints our instructions
        prepare(tmp_path / "empty", tmp_path / "data")
    (tmp_path / "empty" / "a.txt").write_text("caption without a video")
    with pytest.raises(FileNotFoundError, match="no video files"):
        prepare(tmp_path / "empty", tmp_path / "data")
    (tmp_path / "empty" / "bad.webm").write_bytes(b"\x1aE\xdf\xa3" + b"\x00" * 500)
    with pytest.raises(ValueError, match="skipped: bad.webm"):  # nothing usable: say why
        prepare(tmp_path / "empty", tmp_path / "data")
