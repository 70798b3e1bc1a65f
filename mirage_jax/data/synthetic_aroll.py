"""TFDS builder `synthetic_aroll`: talking-face clips with real speech and exact lip sync.

Each clip: a procedurally drawn speaker (face.py) says an espeak-ng sentence (tts.py,
sentences.py); the mouth follows the phoneme timings through visemes (visemes.py). The
builder writes ArrayRecord shards that `tfds.data_source` reads without TensorFlow:

    prepare("small", "/data")                       # or SyntheticAroll(...).download_and_prepare()
    ds = tfds.data_source("synthetic_aroll/small", data_dir="/data")

Clips are generated in worker processes ('spawn', safe next to jax in the parent; each
worker initialises espeak once) and yielded in order. A build is reproducible: sentences,
speakers, phoneme timings and mouth labels depend only on (seed, split, index); espeak's
fine waveform detail depends on what a worker spoke before, and through the loudness so
does the head sway, by a fraction of a pixel.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import itertools
import multiprocessing
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mirage_jax.data import face, sentences, tts, visemes

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640: audio and video align exactly per frame
WORDS_PER_SECOND = 3.2  # sentence length budget; longer speech is cut at a word boundary


@dataclasses.dataclass(eq=False)
class SyntheticArollConfig(tfds.core.BuilderConfig):
    num_train: int = 320
    num_test: int = 32
    frames: int = 50  # clip length in video frames at 25 fps
    size: int = 64  # square frame side in pixels
    num_speakers: int = 16
    seed: int = 0


def generate_clip(index: int, split: str = "train", frames: int = 50, size: int = 64,
                  num_speakers: int = 16, seed: int = 0) -> dict:
    """One example of the corpus as numpy values (reproducible: see the module docstring)."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    speaker_id = int(rng.integers(num_speakers))
    spk = face.Speaker.sample(speaker_id, seed)
    n_samples = frames * SAMPLES_PER_FRAME
    words = sentences.sentence(rng, max(2, int(frames / FPS * WORDS_PER_SECOND))).split()
    rate = int(np.clip(spk.rate + rng.integers(-10, 11), 80, 450))
    pitch = int(np.clip(spk.pitch + rng.integers(-5, 6), 0, 100))
    while True:
        text = " ".join(words)
        speech, events = _trim_tail(*tts.speak(text, spk.voice, rate, pitch, SAMPLE_RATE))
        if len(speech) <= n_samples or len(words) == 1:
            break
        words = words[:-1]
        words[-1] = words[-1].rstrip(",.?") + "."
    speech = speech[:n_samples]  # only a single too-long word is ever cut mid-way
    offset = int(rng.integers(0, min(n_samples - len(speech), SAMPLE_RATE // 2) + 1))
    audio = np.zeros(n_samples, np.float32)
    audio[offset:offset + len(speech)] = speech
    events = [(p, s + offset) for p, s in events if s + offset < n_samples]
    viseme, mouth = visemes.viseme_track(events, frames, FPS, SAMPLE_RATE)
    video = face.render_clip(spk, mouth, face.blink_track(frames, rng, FPS),
                             face.head_motion(audio, frames, rng, SAMPLES_PER_FRAME, FPS), size)
    return {
        "video": video,
        "audio": audio,
        "caption": spk.caption(rng),
        "clip_id": f"{split}_{index:07d}",
        "speaker_id": np.int32(speaker_id),
        "sentence": text,
        "viseme": viseme,
        "mouth_open": mouth[:, 0].copy(),
        "phonemes": " ".join(p for p, _ in events),
        "phoneme_samples": np.array([s for _, s in events], np.int32),
    }


def _trim_tail(audio, events, tail_s: float = 0.08):
    """Cut espeak's closing pause (keep a short decay) so sentence fitting is tight."""
    last = max((i for i, (p, _) in enumerate(events) if not p.startswith("_")), default=None)
    if last is None or last + 1 >= len(events):
        return audio, events
    end = min(len(audio), events[last + 1][1] + int(tail_s * SAMPLE_RATE))
    return audio[:end], [e for e in events[:last + 2] if e[1] < end]


def _job(args):
    index, split, kw = args
    ex = generate_clip(index, split, **kw)
    return ex["clip_id"], ex


def _init_worker():
    tts.native_sample_rate()  # espeak global state: once per process


class SyntheticAroll(tfds.core.GeneratorBasedBuilder):
    """Synthetic A-roll: a drawn face speaking espeak-ng sentences, with viseme labels."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        SyntheticArollConfig(name="tiny", description="48 clips of 0.5 s, 16x16, for tests",
                             num_train=40, num_test=8, frames=12, size=16, num_speakers=8),
        SyntheticArollConfig(name="small", description="352 clips of 2 s, 64x64, 16 speakers",
                             num_train=320, num_test=32, num_speakers=16),
        SyntheticArollConfig(name="large", description="20,000 clips of 2 s, 64x64, 500 speakers",
                             num_train=19_000, num_test=1_000, num_speakers=500),
    ]

    def __init__(self, *, workers: int | None = None, num_clips: int | None = None, **kwargs):
        """`workers`: generator processes (default: one per core but one, which is left to
        TFDS's encoder and writer in this process; 0 generates inline).
        `num_clips`: override the config's clip count (a tenth, at least one, is `test`)."""
        if num_clips is not None and num_clips < 2:
            raise ValueError(f"num_clips must be >= 2 (train and test), got {num_clips}")
        self._workers = max(_cpu_count() - 1, 1) if workers is None else workers
        self._num_clips, self._pool = num_clips, None
        super().__init__(**kwargs)

    def _download_and_prepare(self, dl_manager, *args, **kwargs):
        """One pool of worker processes for all splits (each worker costs a second to start)."""
        if self._workers <= 0:
            return super()._download_and_prepare(dl_manager, *args, **kwargs)
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs jax
        with cf.ProcessPoolExecutor(self._workers, mp_context=ctx,
                                    initializer=_init_worker) as self._pool:
            try:
                return super()._download_and_prepare(dl_manager, *args, **kwargs)
            except cf.process.BrokenProcessPool as e:
                raise RuntimeError(
                    "a synthetic_aroll worker process died; a script that builds the dataset "
                    "must guard it with `if __name__ == '__main__':`") from e
            finally:
                self._pool = None

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. (tfds 4.9.10 otherwise imports `importlib_resources`, which it does not
        declare as a dependency on Python >= 3.9, just to locate it.)"""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        t, tensor = c.frames, tfds.features.Tensor
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "video": tensor(shape=(t, c.size, c.size, 3), dtype=np.uint8, encoding="zlib"),
                "audio": tensor(shape=(t * SAMPLES_PER_FRAME,), dtype=np.float32, encoding="bytes"),
                "caption": tfds.features.Text(),
                "clip_id": tfds.features.Text(),
                "speaker_id": tensor(shape=(), dtype=np.int32),
                "sentence": tfds.features.Text(),
                "viseme": tensor(shape=(t,), dtype=np.int32),
                "mouth_open": tensor(shape=(t,), dtype=np.float32),
                "phonemes": tfds.features.Text(),
                "phoneme_samples": tensor(shape=(None,), dtype=np.int32),
            }),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        n_train, n_test = self.builder_config.num_train, self.builder_config.num_test
        if self._num_clips is not None:
            n_test = max(1, self._num_clips // 10)
            n_train = self._num_clips - n_test
        return {"train": self._generate_examples("train", n_train),
                "test": self._generate_examples("test", n_test)}

    def _generate_examples(self, split: str, n: int):
        c = self.builder_config
        kw = dict(frames=c.frames, size=c.size, num_speakers=c.num_speakers, seed=c.seed)
        jobs = ((i, split, kw) for i in range(n))
        if self._pool is None:
            yield from map(_job, jobs)
        else:
            yield from _ordered_map(self._pool, _job, jobs, window=4 * self._workers)


def _ordered_map(pool: cf.Executor, fn, jobs, window: int):
    """Like pool.map, in order, with at most `window` clips in flight: memory stays flat
    when workers outpace TFDS's single-threaded writer."""
    jobs = iter(jobs)
    pending = collections.deque(pool.submit(fn, j) for j in itertools.islice(jobs, window))
    while pending:
        result = pending.popleft().result()
        for j in itertools.islice(jobs, 1):
            pending.append(pool.submit(fn, j))
        yield result


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def prepare(config_name: str, data_dir: str, num_clips: int | None = None, *,
            size: int | None = None, frames: int | None = None,
            workers: int | None = None) -> SyntheticAroll:
    """Build `synthetic_aroll/<config_name>` as ArrayRecord under `data_dir`; returns the builder.

    `num_clips` overrides the clip count (a tenth, at least one, goes to `test`) and keeps
    the config name, so use a separate `data_dir`. A different `size` or `frames` yields
    the config `<config_name>_<size>px_<frames>f` (tfds.data_source finds it on disk).
    """
    configs = {c.name: c for c in SyntheticAroll.BUILDER_CONFIGS}
    if config_name not in configs:
        raise ValueError(f"unknown synthetic_aroll config {config_name!r}; "
                         f"choose from {sorted(configs)}")
    cfg = configs[config_name]
    size, frames = size or cfg.size, frames or cfg.frames
    if (size, frames) != (cfg.size, cfg.frames):  # TFDS forbids reusing a config's name
        cfg = dataclasses.replace(cfg, name=f"{config_name}_{size}px_{frames}f", size=size,
                                  frames=frames, description=f"{cfg.description}; {size}x{size}, "
                                  f"{frames} frames")
    builder = SyntheticAroll(config=cfg, data_dir=data_dir, file_format="array_record",
                             workers=workers, num_clips=num_clips)
    builder.download_and_prepare()
    return builder
