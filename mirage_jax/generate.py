"""Generation: speech in, video of a person delivering it out.

    speech (file, or text through espeak-ng) -> 16 kHz mono -> log-mel per video frame
      -> windows of the trained length; each window after the first keeps the last
         `overlap` frames (or latent frames) of the one before as clean conditioning (t = 0)
      -> rectified-flow sampling of the video tokens (Euler/Heun, linear-quadratic
         schedule), classifier-free guidance per condition, EMA weights
      -> pixels (unpatchify, or the VAE's decoder for latents) -> mp4 with the speech as AAC

The windows reuse the positions of training (relative to the window), so a window that
continues another sees exactly what a training window with a clean prefix saw.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mirage_jax import flow, media, sharding
from mirage_jax.data import tts
from mirage_jax.data.pipeline import HOP, SAMPLE_RATE, log_mel
from mirage_jax.model.tokens import (
    audio_frames,
    batch_to_streams,
    encode_text,
    first_audio_frame,
    streams_to_video,
    video_shape,
)
from mirage_jax.train.checkpoint import load_run


class GenerationError(ValueError):
    """Input that cannot be generated from; the message names it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 64
    cfg_audio: float = 2.0  # guidance scales; 1.0 = the plain conditional model
    cfg_text: float = 1.0
    cfg_ref: float = 1.0
    cosine: bool = False  # anneal the scales from full at t = 1 to 1 at t = 0
    sampler: str = "euler"
    seed: int = 0
    overlap: int = -1  # frames (latent frames) carried between windows; -1: a quarter
    max_seconds: float = 300.0  # longer speech is refused before any sampling (0: no limit)


def speech(audio: str | None = None, text: str | None = None, voice: str = "en-us") -> np.ndarray:
    """The speech to animate: a file (any rate, any channels) or text spoken by espeak-ng."""
    if (audio is None) == (text is None):
        raise GenerationError("give exactly one of --audio FILE and --text '...'")
    if text is not None:
        if not text.strip():
            raise GenerationError("--text is empty")
        wave, _ = tts.speak(text, voice)
        return wave
    wave = media.load_audio(audio, SAMPLE_RATE)
    if wave.size < HOP:
        raise GenerationError(f"{audio}: shorter than one video frame ({wave.size} samples)")
    if float(np.sqrt(np.mean(np.square(wave)))) < 1e-4:
        raise GenerationError(f"{audio}: the audio is silent; there is no speech to animate")
    return wave


def reference_image(path, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] from an image file, centre-cropped to square and resized."""
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(path)
    if not path.is_file():
        raise GenerationError(f"reference image not found: {path}")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise GenerationError(f"{path}: not an image file ({e})") from e
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((width, height), Image.BICUBIC)
    return np.asarray(img, np.uint8)


class Generator:
    """A trained DiT run (its latest EMA weights unless `step`, `weights` say otherwise), and
    the VAE it was trained on when it uses latents."""

    def __init__(self, run_dir, mesh=None, step: int | None = None, weights: str = "ema"):
        mesh = mesh or sharding.data_mesh()
        run = load_run(run_dir, mesh, weights, step)
        self.cfg, self.mesh, self.run_dir, self.step = run["cfg"], mesh, run_dir, run["step"]
        if self.cfg.task != "dit":
            raise GenerationError(f"{run['where']} is a '{self.cfg.task}' checkpoint, not a DiT")
        missing = [k for k in ("audio_in", "video_in", "video_out") if k not in run["params"]]
        if missing:
            raise GenerationError(f"{run['where']} has no {', '.join(missing)}: it cannot "
                                  f"generate video from speech")
        self.graphdef, self.params = run["graphdef"], run["params"]
        self.codec = None
        if self.cfg.data.video != "pixels":
            from mirage_jax.latents import Codec

            if not self.cfg.vae_checkpoint:
                raise GenerationError(f"{run['where']} trained on latents but names no "
                                      f"vae_checkpoint to decode them")
            self.codec = Codec(self.cfg.vae_checkpoint, mesh)
            self.codec.check(self.cfg)
        self._sample = jax.jit(self._sample_fn, static_argnames=("settings", "progress"))

    def restore(self, step: int, weights: str = "ema") -> None:
        """Another checkpoint of the same run, reusing the compiled sampler (the weights
        are an argument of it, so nothing recompiles)."""
        self.params = load_run(self.run_dir, self.mesh, weights, step)["params"]
        self.step = step

    # -- geometry: a 'unit' is a video frame (pixels) or a latent frame
    @property
    def r(self) -> int:
        return 1 if self.codec is None else self.codec.r

    def units_for(self, frames: int) -> int:
        return 1 + math.ceil((frames - 1) / self.r)

    def audio_start(self, u0: int) -> int:
        """First audio frame of a window starting at unit u0 (as the pipeline windows)."""
        return first_audio_frame(u0, self.r)

    def _sample_fn(self, params, batch, prefix, key, settings, progress):
        cfg = self.cfg
        streams = batch_to_streams(batch, cfg)
        v = streams["video"]
        _, h, w, _ = video_shape(cfg)
        per_unit = (h // cfg.model.patch) * (w // cfg.model.patch)
        gen = jnp.arange(v.x.shape[1])[None, :] >= prefix[:, None] * per_unit  # after the prefix
        streams["ref"] = streams["ref"].replace(mask=streams["ref"].mask & batch["ref_on"][:, None])
        model_fn = lambda s: nnx.merge(self.graphdef, params)(s)  # noqa: E731
        conds = [("text", settings.cfg_text), ("ref", settings.cfg_ref),
                 ("audio", settings.cfg_audio)]
        conds = [(g, s) for g, s in conds if s != 1.0]  # scale 1: always on, no extra pass
        velocity = flow.guided(model_fn, conds, settings.cosine)
        schedule = flow.linear_quadratic_schedule(settings.steps)
        out = flow.sample(velocity, streams, {"video": gen}, key, schedule, settings.sampler,
                          progress)
        return streams_to_video(out["video"].x, cfg, v.x.shape[1] // per_unit)

    def __call__(self, wave: np.ndarray, prompt: str = "", ref: np.ndarray | None = None,
                 settings: Settings = Settings(), show_progress: bool = True) -> np.ndarray:
        """uint8 frames [T, H, W, 3] for `wave` (16 kHz mono), T = its length in frames."""
        return self.many([wave], [prompt], [ref], settings, show_progress)[0]

    def many(self, waves, prompts, refs, settings: Settings = Settings(),
             show_progress: bool = True, ids=None) -> list[np.ndarray]:
        """Frames for several speeches at once: window w of every item runs in one batch,
        split over the mesh's devices (padded to a multiple of them). An item's noise
        depends on its place in the batch; one item alone is deterministic in the seed.
        With `ids` (an int per item) item i's noise depends on the seed and ids[i] only,
        whatever batch it is in (so a sharded evaluation reproduces an unsharded one)."""
        cfg, d = self.cfg, self.cfg.data
        n, h, w, c = video_shape(cfg)
        overlap = settings.overlap if settings.overlap >= 0 else max(1, n // 4)
        if not 0 <= overlap < n:
            raise GenerationError(f"overlap {overlap} must be in [0, {n}) units of the window")
        frames = [max(1, round(len(x) / HOP)) for x in waves]
        totals = [self.units_for(f) for f in frames]
        windows = [1 + max(0, math.ceil((u - n) / (n - overlap))) for u in totals]
        size = -(-len(waves) // self.mesh.size) * self.mesh.size  # pad to the devices
        shard = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
        pad = lambda x: np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])  # noqa: E731

        ref_x = np.zeros((len(waves), h, w, c), np.float32)
        for i, ref in enumerate(refs):
            if ref is not None:
                x = np.asarray(ref, np.float32)[None] / 127.5 - 1.0
                ref_x[i] = x[0] if self.codec is None else np.asarray(self.codec.encode(x[:, None]))[0, 0]
        fixed = {
            "text": pad(encode_text(list(prompts), d.text_len)),
            "ref": pad(ref_x),
            "ref_on": pad(np.array([r is not None for r in refs])),
        }
        self._bar = tqdm.tqdm(total=max(windows) * settings.steps, desc="generate", unit="step",
                              disable=not show_progress)
        videos = [np.zeros((0, h, w, c), np.float32) for _ in waves]
        key = jax.random.key(settings.seed)
        for win in range(max(windows)):
            u0 = win * (n - overlap)
            k = 0 if win == 0 else overlap  # clean units: the end of the previous window
            prev = np.zeros((len(waves), n, h, w, c), np.float32)
            audio = np.zeros((len(waves), audio_frames(cfg), d.audio_features), np.float32)
            for i, wave in enumerate(waves):
                if win >= windows[i]:
                    continue  # this item is done; its row is padding
                prev[i, :k] = videos[i][u0:u0 + k]
                audio[i] = log_mel(wave, self.audio_start(u0), audio_frames(cfg), d.audio_features)
            batch = {**fixed, "video": pad(prev), "audio": pad(audio)}
            batch = jax.device_put({k_: jnp.asarray(v) for k_, v in batch.items()}, shard)
            wkey = jax.random.fold_in(key, win)
            if ids is not None:
                wkey = jax.device_put(_item_keys(wkey, pad(np.asarray(ids, np.int32))), shard)
            x = np.asarray(self._sample(self.params, batch, jnp.full((size,), k), wkey,
                                        settings, self._tick))
            for i in range(len(waves)):
                if win < windows[i]:
                    videos[i] = np.concatenate([videos[i], x[i, k:]], 0)
        self._bar.close()
        out = []
        for video, total, f in zip(videos, totals, frames):
            video = video[:total]
            if self.codec is not None:
                video = np.asarray(self.codec.decode(jnp.asarray(video[None])))[0]
            out.append(np.clip(np.round((video[:f] + 1.0) * 127.5), 0, 255).astype(np.uint8))
        return out

    def _tick(self):
        self._bar.update(1)


@jax.jit
def _item_keys(key, ids):
    """One key per item, from `key` and the item's id."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def generate_file(gen: Generator, out, audio=None, text=None, voice="en-us", prompt="",
                  ref=None, settings: Settings = Settings()) -> pathlib.Path:
    """One mp4 (H.264 + AAC), written atomically; nothing is written if any input is bad."""
    return generate_files(gen, [dict(out=out, audio=audio, text=text, voice=voice,
                                     prompt=prompt, ref=ref)], settings)[0]


def read_list(path) -> list[dict]:
    """A --batch file: one job per line, tab-separated `OUT.mp4  SPEECH  [PROMPT]  [REF]`,
    where SPEECH is an audio file or `text:` followed by the words; # starts a comment."""
    jobs = []
    for no, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) < 2 or not cols[0].strip() or not cols[1].strip():
            raise GenerationError(f"{path}:{no}: want OUT.mp4<TAB>SPEECH[<TAB>PROMPT<TAB>REF], "
                                  f"got {line!r}")
        speech_ = cols[1].strip()
        is_text = speech_.startswith("text:")
        jobs.append(dict(out=cols[0].strip(), audio=None if is_text else speech_,
                         text=speech_[5:] if is_text else None, voice="en-us",
                         prompt=cols[2].strip() if len(cols) > 2 else "",
                         ref=cols[3].strip() or None if len(cols) > 3 else None))
    if not jobs:
        raise GenerationError(f"{path}: no jobs")
    return jobs


def generate_files(gen: Generator, jobs: list[dict], settings: Settings = Settings(),
                   show_progress: bool = True) -> list[pathlib.Path]:
    """Several mp4s in one batched run; every input is read and checked before any sampling."""
    d = gen.cfg.data
    waves = [speech(j["audio"], j["text"], j.get("voice", "en-us")) for j in jobs]
    for j, wave in zip(jobs, waves):
        seconds = len(wave) / SAMPLE_RATE
        if settings.max_seconds and seconds > settings.max_seconds:
            raise GenerationError(f"{j['audio'] or 'the text'}: {seconds:.1f} s of speech is over "
                                  f"the {settings.max_seconds:g} s limit (--max-seconds); "
                                  f"split it or raise the limit")
    refs = [None if j.get("ref") is None else reference_image(j["ref"], d.height, d.width)
            for j in jobs]
    videos = gen.many(waves, [j.get("prompt", "") for j in jobs], refs, settings, show_progress)
    return [media.write_mp4(j["out"], v, w) for j, v, w in zip(jobs, videos, waves)]
