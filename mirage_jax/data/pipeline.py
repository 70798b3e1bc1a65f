"""The grain input pipeline: ArrayRecord clips (TFDS) -> per-process model batches.

    tfds.data_source(...)[split] -> IndexSampler (shard by process, shuffle, repeat forever)
      -> worker processes -> Clip transform (window, ref frame, log-mel, text, flip) -> Batch

Everything random (order, window start, ref frame, flip) comes from `cfg.seed` through
grain's per-record generators, so a run is reproducible and a resumed iterator
(`get_state`/`set_state`, or Orbax via `checkpoint_args`) yields exactly the batches the
uninterrupted run would have. Batches follow mirage_jax/model/tokens.py, per process.
"""

from __future__ import annotations

import functools
import json
import time

import grain.python as grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from mirage_jax.model.tokens import audio_frames, encode_text, first_audio_frame

SAMPLE_RATE = 16000
FPS = 25
HOP = SAMPLE_RATE // FPS  # 640 samples per video frame
N_FFT = 2 * HOP  # 80 ms Hann window centred on its video frame
LOG_FLOOR = 1e-5
SILENCE = (np.log(LOG_FLOOR) + 5.0) / 4.0  # `log_mel` of silence


def _hz_to_mel(f):
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, f / (200.0 / 3.0))


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * 200.0 / 3.0)


@functools.lru_cache(maxsize=8)
def mel_bank(n_mels: int) -> np.ndarray:
    """[n_mels, N_FFT // 2 + 1] triangular filters, Slaney mel scale and area normalisation:
    `librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels)` (a test checks), built
    here because importing librosa's filters and spectrum modules costs every training
    process about 5 s."""
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    ramps = edges[:, None] - np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)[None, :]
    width = np.diff(edges)
    rise, fall = -ramps[:-2] / width[:-1, None], ramps[2:] / width[1:, None]
    bank = np.maximum(0.0, np.minimum(rise, fall)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return bank.astype(np.float32)


# Periodic Hann (librosa's and scipy's `get_window("hann", N_FFT)`), as the STFT uses.
_WINDOW = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def log_mel(audio: np.ndarray, start: int, frames: int, n_mels: int) -> np.ndarray:
    """[frames, n_mels] log-mel features of video frames [start, start + frames) of `audio`.

    Feature frame k is a 1280-sample Hann window centred on video frame start+k, i.e. on
    samples [(start+k)*640 - 320, (start+k)*640 + 960): the frame's own 640 samples get
    weight >= 0.5 and each neighbour's < 0.5, so a sound inside video frame k is strongest
    in feature frame k. Context outside the clip is silence. Values are ln(mel power +
    1e-5), shifted and scaled by fixed constants to about [-1.6, 2] (silence at the bottom).
    """
    lo, hi = start * HOP - HOP // 2, (start + frames) * HOP + HOP // 2
    y = np.zeros(hi - lo, np.float32)
    a, b = max(lo, 0), min(hi, len(audio))
    if b > a:
        y[a - lo : b - lo] = audio[a:b]
    windows = np.lib.stride_tricks.sliding_window_view(y, N_FFT)[::HOP]  # [frames, N_FFT]
    power = np.abs(np.fft.rfft(windows * _WINDOW, axis=-1)) ** 2  # an STFT without centring
    mel = power.astype(np.float32) @ mel_bank(n_mels).T  # [frames, n_mels]
    return ((np.log(mel + LOG_FLOOR) + 5.0) / 4.0).astype(np.float32)


class _Indexed(grain.RandomAccessDataSource):
    """Adds the record index to each record, so batches can name their examples."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return {**self.source[index], "_index": index}

    def __repr__(self):
        return f"Indexed({self.source!r})"


class ClipTransform(grain.RandomMapTransform):
    """One stored clip -> one training example (see `GrainSource` for the keys).

    The window depends on `data.video`: 'pixels' takes `frames` video frames with one audio
    frame each; 'encode' takes 1 + k*r video frames and (1 + k)*r audio frames starting
    r - 1 frames earlier (latent frame m then has audio frames m*r .. m*r + r - 1); 'latents'
    takes 1 + k latent frames of a record written by `mirage-jax encode`, anywhere in the
    clip, with the audio frames they code. Audio before the clip is silence.
    """

    def __init__(self, cfg):
        d = cfg.data
        self.frames, self.height, self.width = d.frames, d.height, d.width
        self.n_mels, self.text_len = d.audio_features, d.text_len
        self.random_flip, self.dataset, self.mode = d.random_flip, d.dataset, d.video
        self.r = 1 if d.video == "pixels" else cfg.vae.temporal_factor
        self.n_audio = audio_frames(cfg)

    def random_map(self, rec: dict, rng: np.random.Generator) -> dict:
        index = int(rec["_index"])
        where = f"{self.dataset} record {index}"
        if self.mode == "latents":
            if "latents" not in rec:
                raise ValueError(f"{where} has no latents: data.video='latents' needs a "
                                 f"dataset written by `mirage-jax encode`")
            clip = rec["latents"]
            t = 1 + (self.frames - 1) // self.r  # latent frames
            n = clip.shape[0]
            if n < t:
                raise ValueError(f"{where}: {n} latent frames < the {t} of data.frames="
                                 f"{self.frames}")
            j0 = int(rng.integers(0, n - t + 1))
            a0 = first_audio_frame(j0, self.r)
            video = np.asarray(clip[j0:j0 + t], np.float32)
            n_frames = len(rec["frame_latents"])
        else:
            clip = rec["video"]
            if clip.shape[1:3] != (self.height, self.width):
                raise ValueError(f"{where}: frames are {clip.shape[1]}x{clip.shape[2]}, "
                                 f"config wants {self.height}x{self.width}")
            n, t = clip.shape[0], self.frames
            if n < t:
                raise ValueError(f"{where}: {n} frames < data.frames={t}")
            t0 = int(rng.integers(0, n - t + 1))
            a0 = t0 + first_audio_frame(0, self.r)  # the window's first unit codes frame t0
            video = _pixels(clip[t0:t0 + t])
            n_frames = n
        # The reference: a frame outside the frames this window codes, if the clip has one.
        lo, hi = max(a0, 0), a0 + self.n_audio
        outside = n_frames - (hi - lo)
        ref = lo
        if outside > 0:
            ref = int(rng.integers(0, outside))
            ref = ref if ref < lo else ref + (hi - lo)
        if self.mode == "latents":
            ref_img = np.asarray(rec["frame_latents"][ref], np.float32)
        else:
            ref_img = _pixels(clip[ref])
        if self.random_flip and bool(rng.integers(0, 2)):
            video, ref_img = video[:, :, ::-1].copy(), ref_img[:, ::-1].copy()
        if "audio_features" in rec:
            audio = _frames(rec["audio_features"], a0, self.n_audio, SILENCE)
            if audio.shape[1] != self.n_mels:
                raise ValueError(f"{where}: audio_features have {audio.shape[1]} bins, config "
                                 f"wants data.audio_features={self.n_mels}")
        else:
            audio = log_mel(rec["audio"], a0, self.n_audio, self.n_mels)
        caption = rec["caption"]
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        out = {
            "video": video,
            "ref": ref_img,
            "audio": audio.astype(np.float32),
            "text": encode_text([caption], self.text_len)[0],
            "index": np.int64(index),
            "ref_time": np.float32(ref - a0),
        }
        if "mouth_open" in rec:
            out["mouth_open"] = _frames(rec["mouth_open"], a0, self.n_audio, 0.0)
        if "viseme" in rec:
            out["viseme"] = _frames(rec["viseme"], a0, self.n_audio, 0).astype(np.int32)
        return out


def _frames(x, start: int, n: int, fill) -> np.ndarray:
    """Rows [start, start + n) of a per-frame array; rows outside it are `fill`."""
    x = np.asarray(x)
    out = np.full((n, *x.shape[1:]), fill, x.dtype if x.dtype != np.float64 else np.float32)
    a, b = max(start, 0), min(start + n, len(x))
    if b > a:
        out[a - start:b - start] = x[a:b]
    return out


def _pixels(x: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1]; float arrays (latents) pass through."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    return np.asarray(x, np.float32)


def open_split(cfg):
    """`tfds.data_source` for the config's split, with the stored frame size checked."""
    d = cfg.data
    try:
        source = tfds.data_source(d.dataset, data_dir=d.data_dir)[d.split]
    except Exception as e:  # tfds's own errors do not say how to make the data
        raise FileNotFoundError(
            f"cannot open dataset '{d.dataset}' split '{d.split}' under '{d.data_dir}' "
            f"({type(e).__name__}: {e}); build it with `mirage-jax prepare`"
        ) from e
    feats = source.dataset_info.features
    if d.video == "latents":
        from mirage_jax.data import latent_dataset

        latent_dataset.check_fits(cfg, source.dataset_info.data_dir)
    elif "video" not in feats:
        raise ValueError(f"dataset '{d.dataset}' holds no pixel video; for cached latents "
                         f"set data.video='latents'")
    else:
        shape = tuple(feats["video"].shape)
        if shape[1:3] != (d.height, d.width):
            raise ValueError(
                f"dataset '{d.dataset}' stores {shape[1]}x{shape[2]} frames but the config "
                f"asks for data.height x data.width = {d.height}x{d.width}; prepare the "
                f"dataset at that size or change the config"
            )
        if shape[0] is not None and shape[0] < d.frames:
            raise ValueError(
                f"dataset '{d.dataset}' stores clips of {shape[0]} frames, "
                f"fewer than data.frames={d.frames}"
            )
    return source


def make_loader(
    cfg, process_index: int | None = None, process_count: int | None = None
) -> grain.DataLoader:
    """The grain DataLoader for this process's share of `cfg.data`."""
    d = cfg.data
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if d.global_batch % pc:
        raise ValueError(f"data.global_batch={d.global_batch} does not split over {pc} processes")
    source = open_split(cfg)
    shard = grain.ShardOptions(shard_index=pi, shard_count=pc, drop_remainder=True)
    if len(source) // pc == 0:
        raise ValueError(
            f"dataset '{d.dataset}' split '{d.split}' has {len(source)} records, "
            f"fewer than the {pc} processes reading it"
        )
    sampler = grain.IndexSampler(
        len(source), shard_options=shard, shuffle=True, num_epochs=None, seed=int(cfg.seed)
    )
    clip = ClipTransform(cfg)
    if d.workers > 0 and not flags.FLAGS.is_parsed():
        # grain 0.2.18 reads an absl flag when starting workers and fails if no absl main
        # parsed the command line; use the defaults of all flags instead.
        flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(
        data_source=_Indexed(source),
        sampler=sampler,
        shard_options=shard,
        operations=[clip, grain.Batch(d.global_batch // pc, drop_remainder=True)],
        worker_count=d.workers,
    )


class GrainSource:
    """Per-process batches from the TFDS corpus; a checkpointable iterator.

    Each batch (numpy, b = data.global_batch // process_count):
      video [b, T, H, W, 3] f32 in [-1, 1]   T = data.frames, a random window of the clip
      ref   [b, H, W, 3] f32 in [-1, 1]      a frame outside the window (if the clip has one)
      audio [b, T, F] f32                    log-mel (`log_mel`) or stored `audio_features`
      text  [b, L] int32                     `encode_text(caption)`
      index [b] int64                        record index in the split (for error messages)
      ref_time [b] f32                       ref frame - window start, in frames
      mouth_open [b, T] f32, viseme [b, T] int32   when the dataset stores them
    """

    def __init__(self, cfg, process_index: int | None = None, process_count: int | None = None):
        self.loader = make_loader(cfg, process_index, process_count)
        self._it = iter(self.loader)
        self._consumed = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = next(self._it)
        self._consumed += 1
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The loop's interface: batches must be asked for in order (the iterator is the
        state); `step` is checked against the batches consumed so far."""
        if step != self._consumed:
            raise RuntimeError(
                f"asked for the batch of step {step} but the data iterator is at "
                f"step {self._consumed}; restore its state with the checkpoint"
            )
        return next(self)

    def get_state(self) -> bytes:
        return json.dumps(
            {"grain": self._it.get_state().decode(), "consumed": self._consumed}
        ).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state.decode() if isinstance(state, bytes) else state)
        self._it.set_state(state["grain"].encode())
        self._consumed = int(state["consumed"])

    def start_prefetch(self) -> None:
        """Called by grain's Orbax handler after a restore."""
        self._it.start_prefetch()


def checkpoint_args(source: GrainSource, restore: bool = False):
    """The item to put into an `ocp.args.Composite` next to the train state:
    `Composite(state=..., data=checkpoint_args(source))` when saving, and
    `checkpoint_args(source, restore=True)` when restoring (it sets `source`'s state).
    Each process writes and reads its own `process_<i>-of-<n>.json`."""
    import grain.checkpoint as gc  # needs orbax

    return (gc.CheckpointRestore if restore else gc.CheckpointSave)(item=source)


def checkpoint_handler():
    """The handler to register for that item in a CheckpointManager's `item_handlers`."""
    import grain.checkpoint as gc

    return gc.CheckpointHandler()


def bench_data(cfg, seconds: float = 10.0) -> dict:
    """Examples/s of the pipeline (this process's share, `data.workers` workers), timed after
    the first batch, which pays for opening the data and starting the workers."""
    t0 = time.perf_counter()
    source = GrainSource(cfg)
    first = next(source)
    startup = time.perf_counter() - t0
    b = first["video"].shape[0]
    n, t1 = 0, time.perf_counter()
    while time.perf_counter() - t1 < seconds:
        next(source)
        n += 1
    dt = time.perf_counter() - t1
    return {
        "examples_per_s": n * b / dt,
        "batches": n,
        "batch": b,
        "seconds": dt,
        "startup_s": startup,
        "workers": int(cfg.data.workers),
    }
