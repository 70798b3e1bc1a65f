"""A small in-memory source of aligned audio/video clips, drawn procedurally.

Stands in for the corpus until the grain pipeline lands, and yields the same batch format
(see mirage_jax/model/tokens.py). Each clip is a coloured face whose mouth opening follows
a random speech envelope; the audio features are a band spectrum whose energy follows the
same envelope, so there is something real to learn: the mouth must track the audio.
Batches are a pure function of (seed, step), which makes resumed runs reproducible.
"""

from __future__ import annotations

import numpy as np

from mirage_jax.model.tokens import encode_text

COLOURS = {
    "red": (0.9, 0.2, 0.2),
    "green": (0.2, 0.8, 0.3),
    "blue": (0.2, 0.3, 0.9),
    "yellow": (0.9, 0.85, 0.2),
    "grey": (0.5, 0.5, 0.5),
    "purple": (0.6, 0.3, 0.8),
}


def envelope(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Syllable-like mouth opening in [0, 1]: smoothed random bursts with closures."""
    raw = rng.uniform(0, 1, frames) * (rng.uniform(0, 1, frames) > 0.35)
    kernel = np.array([0.25, 0.5, 0.25])
    return np.clip(np.convolve(raw, kernel, mode="same") * 1.3, 0.0, 1.0).astype(np.float32)


def draw(opening: np.ndarray, face, background, height: int, width: int) -> np.ndarray:
    """[T, H, W, 3] in [-1, 1]: a disk face with an elliptical mouth of the given opening."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    img = np.broadcast_to(np.asarray(background, np.float32), (height, width, 3)).copy()
    img[xx**2 + yy**2 < 0.7] = face
    mouth_h = 0.04 + 0.3 * opening[:, None, None]  # [T, 1, 1]
    mouth = (xx / 0.35) ** 2 + ((yy - 0.35) / mouth_h) ** 2 < 1.0  # [T, H, W]
    video = np.where(mouth[..., None], 0.05, img[None])
    return (2.0 * video - 1.0).astype(np.float32)


def spectrum(opening: np.ndarray, pitch: float, bins: int) -> np.ndarray:
    """[T, F] log-energy bands: a formant at `pitch` whose level follows the opening."""
    f = np.linspace(0, 1, bins)
    shape = np.exp(-(((f - pitch) / 0.15) ** 2))
    return (np.log1p(4.0 * opening[:, None] * shape[None]) - 0.5).astype(np.float32)


def clip(seed: int, index: int, cfg) -> dict:
    d = cfg.data
    rng = np.random.default_rng([seed, index])
    face_name, bg_name = rng.choice(list(COLOURS), 2, replace=False)
    opening = envelope(rng, d.frames)
    pitch = rng.uniform(0.2, 0.8)
    video = draw(opening, COLOURS[face_name], COLOURS[bg_name], d.height, d.width)
    ref = draw(np.zeros(1, np.float32), COLOURS[face_name], COLOURS[bg_name], d.height, d.width)[0]
    return {
        "video": video,
        "audio": spectrum(opening, pitch, d.audio_features),
        "ref": ref,
        "caption": f"a {face_name} face in front of a {bg_name} wall",
        "opening": opening,
    }


class ProceduralSource:
    """`batch(step)` -> this process's part of the global batch for that step."""

    def __init__(self, cfg, process_index: int = 0, process_count: int = 1):
        self.cfg, self.seed = cfg, cfg.seed
        self.per_process = cfg.data.global_batch // process_count
        self.offset = process_index * self.per_process

    def batch(self, step: int) -> dict[str, np.ndarray]:
        g = self.cfg.data.global_batch
        clips = [
            clip(self.seed, step * g + self.offset + i, self.cfg) for i in range(self.per_process)
        ]
        out = {k: np.stack([c[k] for c in clips]) for k in ("video", "audio", "ref", "opening")}
        out["text"] = encode_text([c["caption"] for c in clips], self.cfg.data.text_len)
        return out
