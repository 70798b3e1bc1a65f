"""Media I/O with PyAV: load audio, decode video, write mp4 with sound.

The model works at a fixed clock (25 fps video, 16 kHz mono audio, i.e. exactly
640 samples per frame), so every reader here resamples to that clock and every
writer keeps video and audio the same length. Failures raise `MediaError` naming
the file, so a data pipeline can skip and report a bad file instead of dying on
an FFmpeg message with no path in it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FPS = 25


class MediaError(ValueError):
    """A media file is missing, unreadable, or holds no usable content."""

    def __init__(self, path, msg: str):
        super().__init__(f"{path}: {msg}")
        self.path = str(path)


def _check_exists(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "no such file")
    return path


def _resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return x
    import librosa  # soxr-backed; imported lazily because librosa is slow to import

    return librosa.resample(x, orig_sr=sr_in, target_sr=sr_out, res_type="soxr_hq")


def _decode_audio(container, stream) -> tuple[np.ndarray, int, float]:
    """Decode one audio stream to float32 mono at its native rate.

    Channels are averaged by hand (FFmpeg's own downmix applies a -3 dB gain),
    and the returned start time lets callers align audio with video.
    """
    rate = stream.codec_context.sample_rate or stream.rate
    resampler = None
    chunks, start = [], None
    for frame in container.decode(stream):
        if start is None and frame.time is not None:
            start = float(frame.time)
        if resampler is None:
            resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=frame.sample_rate)
            rate = frame.sample_rate
        for f in resampler.resample(frame):
            chunks.append(f.to_ndarray().mean(axis=0))
    if resampler is not None:
        for f in resampler.resample(None):
            chunks.append(f.to_ndarray().mean(axis=0))
    x = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if stream.duration and stream.time_base:
        # AAC decodes whole 1024-sample frames; the container knows the true length.
        x = x[: int(round(float(stream.duration * stream.time_base) * rate))]
    return x, int(rate), start or 0.0


def _finish_audio(path, x: np.ndarray, sr_in: int, sample_rate: int) -> np.ndarray:
    if x.size == 0:
        raise MediaError(path, "audio is empty")
    if not np.all(np.isfinite(x)):
        raise MediaError(path, "audio contains NaN or Inf samples")
    return np.ascontiguousarray(_resample(x, sr_in, sample_rate), dtype=np.float32)


def load_audio(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any audio (or video-with-sound) file -> float32 mono at `sample_rate`.

    PyAV handles nearly everything (wav, mp3, m4a, flac, mp4); libsndfile
    (soundfile, a librosa dependency) is a fallback for the odd file FFmpeg refuses.
    """
    path = _check_exists(path)
    try:
        with av.open(str(path)) as c:
            if not c.streams.audio:
                raise MediaError(path, "file has no audio stream")
            x, sr, _ = _decode_audio(c, c.streams.audio[0])
    except MediaError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, OSError) as e:
        try:
            import soundfile

            x, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
            x = x.mean(axis=1)
        except Exception:
            raise MediaError(path, f"not a readable audio file ({e})") from e
    return _finish_audio(path, x, sr, sample_rate)


def _square_resize(frame: av.VideoFrame, size: int | None) -> np.ndarray:
    """Scale the short side to `size` (area filter), then centre crop a square."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    w, h = frame.width, frame.height
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = frame.reformat(width=nw, height=nh, format="rgb24", interpolation="AREA").to_ndarray()
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(img[y0 : y0 + size, x0 : x0 + size])


def read_video(path, fps: int = FPS, size: int | None = None, sample_rate: int = SAMPLE_RATE):
    """Decode a video file -> (frames uint8 [T,H,W,3], audio float32 [N] or None).

    Video is resampled to `fps` by timestamps (each output tick takes the nearest
    source frame), so variable-frame-rate phone footage lands on the model's
    clock. `size` (int) centre-crops to a square and resizes while decoding,
    which keeps memory at the target resolution. Audio is 16 kHz mono, aligned
    to the first video frame (zero-padded or trimmed by the start-time offset);
    None when the file has no audio stream.
    """
    path = _check_exists(path)
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise MediaError(path, "file has no video stream")
            vs = c.streams.video[0]
            vs.thread_type = "AUTO"
            times, images = [], []
            for frame in c.decode(vs):
                if frame.time is None:
                    continue
                times.append(float(frame.time))
                images.append(_square_resize(frame, size))
            if not images:
                raise MediaError(path, "no decodable video frames")
            if vs.frames and len(images) < 0.98 * vs.frames - 1:
                # FFmpeg stops quietly at a cut-off mdat; the index says what should be there
                raise MediaError(path, f"truncated video: decoded {len(images)} of {vs.frames} frames")
            src_rate = vs.average_rate or vs.guessed_rate or fps
            audio = None
            if c.streams.audio:
                c.seek(0)
                a, sr, a_start = _decode_audio(c, c.streams.audio[0])
                if a.size:
                    audio = (a, sr, a_start)
    except MediaError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, OSError) as e:
        raise MediaError(path, f"corrupt or unreadable video ({e})") from e

    times = np.asarray(times)
    order = np.argsort(times, kind="stable")  # decode order is presentation order, but be safe
    v_start = float(times[order][0])
    times = times[order] - v_start
    duration = times[-1] + 1.0 / float(src_rate)
    n_out = max(1, int(round(duration * fps)))
    ticks = np.arange(n_out) / fps
    if len(times) == 1:
        j = np.zeros(n_out, int)
    else:  # nearest source frame for each output tick
        hi = np.clip(np.searchsorted(times, ticks), 1, len(times) - 1)
        j = np.where(ticks - times[hi - 1] <= times[hi] - ticks, hi - 1, hi)
    frames = np.stack([images[order[k]] for k in j])

    if audio is not None:
        a, sr, a_start = audio
        a = _finish_audio(path, a, sr, sample_rate)
        offset = int(round((a_start - v_start) * sample_rate))
        audio = np.concatenate([np.zeros(offset, np.float32), a]) if offset > 0 else a[-offset:]
    return frames, audio


def _even(frames: np.ndarray) -> np.ndarray:
    """Edge-pad bottom/right to even height/width (yuv420p needs 2x2 chroma blocks)."""
    ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def write_mp4(path, frames: np.ndarray, audio: np.ndarray | None = None, fps: int = FPS,
              sample_rate: int = SAMPLE_RATE, crf: int = 18, preset: str = "veryfast") -> Path:
    """Write H.264 (yuv420p) + AAC mp4; atomic, video as long as the audio.

    Audio is the master clock: the video is cut or its last frame repeated so
    it lasts round(N * fps / sample_rate) frames, i.e. within one frame of the
    audio (generated video and its soundtrack must end together). Odd frame
    sizes are edge-padded by one pixel to even, because yuv420p cannot hold
    them. Writes to a temporary file in the same directory and renames it, so
    readers never see a partial file.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be [T,H,W,3] with T > 0, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if audio is not None:
        audio = np.asarray(audio, np.float32).reshape(-1)
        if not np.all(np.isfinite(audio)):
            raise ValueError("audio contains NaN or Inf")
        n = max(1, int(round(len(audio) * fps / sample_rate)))
        if n != len(frames):
            if abs(n - len(frames)) > 1:
                log.info("write_mp4 %s: %d frames -> %d to match audio", path, len(frames), n)
            idx = np.minimum(np.arange(n), len(frames) - 1)
            frames = frames[idx]
    frames = _even(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.mp4")
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="mp4") as c:
            vs = c.add_stream("libx264", rate=Fraction(fps))
            vs.width, vs.height = frames.shape[2], frames.shape[1]
            vs.pix_fmt = "yuv420p"
            vs.options = {"crf": str(crf), "preset": preset}
            streams = [vs]
            if audio is not None:
                as_ = c.add_stream("aac", rate=sample_rate)
                as_.layout = "mono"
                streams.append(as_)
            for img in frames:
                c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            if audio is not None:
                chunk = 1024 * 16
                for i in range(0, len(audio), chunk):
                    af = av.AudioFrame.from_ndarray(
                        np.clip(audio[None, i : i + chunk], -1, 1), format="fltp", layout="mono")
                    af.sample_rate, af.pts = sample_rate, i
                    c.mux(as_.encode(af))
            for s in streams:
                c.mux(s.encode(None))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
