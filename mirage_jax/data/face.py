"""A procedurally drawn talking head, rendered with vectorised numpy.

Why: a CPU-sized demo needs video whose only speech-driven content is the mouth, so a
model that generates the right mouth at the right frame has learned lip sync. Speakers
differ in face shape, skin, hair, clothes and background (and a caption says so); eyes
blink at random and the head sways with the speech energy, so that identity and motion
come from the reference image and audio rather than being constant.

All shapes are ellipses with a one-pixel soft edge, evaluated only inside their bounding
box over the whole clip; 50 frames of 64x64 render in a few milliseconds.
"""
from __future__ import annotations

import dataclasses

import numpy as np

SKIN = {"pale": (240, 214, 196), "light": (226, 187, 160), "olive": (198, 156, 112),
        "tan": (182, 132, 92), "brown": (140, 94, 62), "dark": (92, 60, 42)}
HAIR = {"black": (28, 24, 22), "brown": (96, 62, 38), "blonde": (222, 190, 120),
        "red": (170, 70, 36), "grey": (150, 150, 150), "white": (228, 228, 224)}
CLOTHES = {"blue": (40, 80, 170), "red": (170, 40, 45), "green": (50, 130, 70),
           "black": (30, 30, 34), "white": (232, 232, 232), "yellow": (220, 190, 60),
           "purple": (110, 60, 140), "orange": (225, 120, 40), "grey": (120, 120, 125)}
WALLS = {"grey": (128, 128, 132), "white": (220, 220, 214), "blue": (90, 130, 180),
         "green": (110, 150, 110), "beige": (210, 190, 150), "pink": (214, 160, 170),
         "dark": (50, 50, 58), "teal": (60, 140, 140)}
EYES = {"brown": (70, 45, 25), "blue": (60, 110, 170), "green": (70, 120, 70)}
STYLES = ("short", "long", "bald", "curly")
VOICES = {"woman": ("woman", "bright", "en-us"), "man": ("man", "deep", "uk", "fast", "en-us")}


@dataclasses.dataclass(frozen=True)
class Speaker:
    """Everything that identifies one synthetic speaker (look and voice)."""

    speaker_id: int
    gender: str
    skin: str
    hair: str
    style: str
    shirt: str
    wall: str
    eyes: str
    face_aspect: float  # width / height of the face ellipse
    face_scale: float  # face half-height as a fraction of the image
    voice: str
    rate: int  # words per minute
    pitch: int  # espeak base pitch 0-100

    @classmethod
    def sample(cls, speaker_id: int, seed: int = 0) -> "Speaker":
        """The speaker with this id (deterministic in `speaker_id` and `seed`)."""
        rng = np.random.default_rng([seed, speaker_id, 7])
        pick = lambda xs: list(xs)[rng.integers(len(xs))]  # noqa: E731
        gender = pick(("woman", "man"))
        style = pick(STYLES if gender == "man" else ("short", "long", "long", "curly"))
        return cls(
            speaker_id=int(speaker_id), gender=gender, skin=pick(SKIN), hair=pick(HAIR),
            style=style, shirt=pick(CLOTHES), wall=pick(WALLS), eyes=pick(EYES),
            face_aspect=float(rng.uniform(0.68, 0.9)), face_scale=float(rng.uniform(0.23, 0.28)),
            voice=pick(VOICES[gender]), rate=int(rng.integers(150, 195)),
            pitch=int(rng.integers(35, 60) + (15 if gender == "woman" else 0)))

    def caption(self, rng: np.random.Generator | None = None) -> str:
        """A sentence describing the speaker; `rng` varies the wording."""
        hair = f"{self.style} {self.hair} hair" if self.style != "bald" else "a bald head"
        who = f"a {self.gender} with {self.skin} skin and {hair}"
        an = lambda w: ("an " if w[0] in "aeiou" else "a ") + w  # noqa: E731
        where = f"in {an(self.shirt)} shirt against {an(self.wall)} wall"
        forms = (f"{who} {where}", f"{who} talking to the camera {where}",
                 f"close-up of {who}, speaking, {where}")
        return forms[0 if rng is None else int(rng.integers(len(forms)))]


def blink_track(n_frames: int, rng: np.random.Generator, fps: int = 25) -> np.ndarray:
    """float32 [T] eyelid closure in [0, 1]: blinks about every 3 s, ~5 frames each."""
    closure = np.zeros(n_frames + 8, np.float32)
    profile = np.array([0.4, 1.0, 1.0, 0.6, 0.2], np.float32)
    t = rng.uniform(0, 3.0) * fps
    while t < n_frames:
        i = int(t)
        closure[i:i + len(profile)] = np.maximum(closure[i:i + len(profile)], profile)
        t += rng.uniform(1.5, 5.0) * fps
    return closure[:n_frames]


def head_motion(audio: np.ndarray, n_frames: int, rng: np.random.Generator,
                samples_per_frame: int = 640, fps: int = 25) -> np.ndarray:
    """float32 [T, 2] head offset (x, y) in image fractions: slow drift plus a nod with energy."""
    frames = np.zeros(n_frames * samples_per_frame, np.float32)
    n = min(len(audio), len(frames))
    frames[:n] = audio[:n]
    energy = np.sqrt((frames.reshape(n_frames, -1) ** 2).mean(1))
    energy /= max(energy.max(), 1e-6)
    smooth = np.zeros_like(energy)
    acc = 0.0
    for i, e in enumerate(energy):  # one-pole low-pass: the head lags the voice
        acc += 0.25 * (e - acc)
        smooth[i] = acc
    t = np.arange(n_frames) / fps
    f, ph = rng.uniform(0.15, 0.5, 2), rng.uniform(0, 2 * np.pi, 2)
    dx = 0.012 * np.sin(2 * np.pi * f[0] * t + ph[0]) + 0.01 * np.gradient(smooth)
    dy = 0.006 * np.sin(2 * np.pi * f[1] * t + ph[1]) - 0.012 * smooth
    return np.stack([dx, dy], -1).astype(np.float32)


def _paint(img, grid, color, cx, cy, rx, ry, mask=None):
    """Alpha-blend an ellipse (per-frame centre/radii, [T]) of `color` into `img` in place.

    `mask(x, y, alpha) -> alpha` may cut the shape further (e.g. hair above a hairline).
    Returns the alpha over the bounding box and the box, for shapes drawn inside others.
    """
    size = img.shape[1]
    cx, cy, rx, ry = (np.broadcast_to(np.asarray(v, np.float32), (img.shape[0],))
                      for v in (cx, cy, rx, ry))
    rx, ry = np.maximum(rx, 1e-4), np.maximum(ry, 1e-4)
    x0 = int(np.clip(np.floor((cx - rx).min() * size) - 1, 0, size))
    x1 = int(np.clip(np.ceil((cx + rx).max() * size) + 2, 0, size))
    y0 = int(np.clip(np.floor((cy - ry).min() * size) - 1, 0, size))
    y1 = int(np.clip(np.ceil((cy + ry).max() * size) + 2, 0, size))
    if x1 <= x0 or y1 <= y0:
        return None, None
    x = grid[None, None, x0:x1]
    y = grid[None, y0:y1, None]
    c = lambda v: v[:, None, None]  # noqa: E731
    u, v = (x - c(cx)) / c(rx), (y - c(cy)) / c(ry)
    d = np.sqrt(u * u + v * v) + 1e-6
    # Signed distance to the outline ~ (d - 1) / |grad d|, in pixels; thin shapes fade.
    grad = np.sqrt((u / c(rx)) ** 2 + (v / c(ry)) ** 2) / d + 1e-6
    thin = np.minimum(2.0 * np.minimum(rx, ry) * size, 1.0)
    alpha = np.clip(0.5 - (d - 1.0) / grad * size, 0.0, 1.0) * c(thin)
    if mask is not None:
        alpha = mask(x, y, alpha)
    color = np.asarray(color, np.float32)
    color = color[:, None, None] if color.ndim == 2 else color
    region = img[:, y0:y1, x0:x1]
    region += alpha[..., None] * (color - region)
    return alpha, (y0, y1, x0, x1)


def _soft_step(v, size):
    """0 -> 1 over about one pixel as v crosses 0 (for soft cut lines)."""
    return np.clip(0.5 + v * size, 0.0, 1.0)


def render_clip(speaker: Speaker, mouth_params: np.ndarray, blink: np.ndarray,
                sway: np.ndarray, size: int = 64) -> np.ndarray:
    """uint8 [T, size, size, 3] frames of `speaker` with the given per-frame tracks.

    mouth_params: [T, 3] (opening, width, roundness) in [0, 1] (or [T] opening only);
    blink: [T] eyelid closure in [0, 1]; sway: [T, 2] head offset in image fractions.
    """
    mouth = np.asarray(mouth_params, np.float32)
    if mouth.ndim == 1:
        mouth = np.stack([mouth, np.full_like(mouth, 0.5), np.full_like(mouth, 0.2)], -1)
    n = mouth.shape[0]
    if np.shape(blink) != (n,) or np.shape(sway) != (n, 2):
        raise ValueError(f"render_clip(): want blink [T] and sway [T, 2] with T={n}, "
                         f"got {np.shape(blink)} and {np.shape(sway)}")
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    skin = np.array(SKIN[speaker.skin], np.float32)
    hair = np.array(HAIR[speaker.hair], np.float32)
    wall = np.array(WALLS[speaker.wall], np.float32)
    # Background: wall with a soft vertical light gradient.
    shade = (1.08 - 0.25 * grid)[None, :, None, None]
    img = np.broadcast_to(wall * shade, (n, size, size, 3)).astype(np.float32)

    ry = speaker.face_scale
    rx = ry * speaker.face_aspect
    hx, hy = 0.5 + sway[:, 0], 0.45 + sway[:, 1]
    if speaker.style in ("long", "curly"):
        grow = 1.45 if speaker.style == "long" else 1.3
        _paint(img, grid, hair, hx, hy + 0.3 * ry, rx * grow, ry * grow)
    _paint(img, grid, CLOTHES[speaker.shirt], 0.5 + 0.4 * sway[:, 0], 1.02, 0.42, 0.24)
    _paint(img, grid, skin * 0.82, hx, hy + 1.05 * ry, 0.42 * rx, 0.35 * ry)  # neck
    for side in (-1, 1):  # ears
        _paint(img, grid, skin * 0.92, hx + side * rx, hy + 0.05 * ry, 0.2 * rx, 0.22 * ry)
    _paint(img, grid, skin, hx, hy, rx, ry)
    if speaker.style != "bald":
        line = hy - (0.45 if speaker.style == "short" else 0.35) * ry

        def hairline(x, y, alpha):
            top = _soft_step(line[:, None, None] - y, size)
            sides = _soft_step(np.abs(x - hx[:, None, None]) - 0.8 * rx, size)
            return alpha * (np.maximum(top, sides) if speaker.style != "short" else top)

        _paint(img, grid, hair, hx, hy - 0.08 * ry, rx * 1.08, ry * 1.0, hairline)

    eye_y = hy - 0.12 * ry
    for side in (-1, 1):
        ex = hx + side * 0.4 * rx
        _paint(img, grid, hair * 0.7, ex, eye_y - 0.3 * ry, 0.3 * rx, 0.05 * ry)  # brow
        open_ = 1.0 - np.clip(blink, 0, 1)
        white, box = _paint(img, grid, (240, 240, 236), ex, eye_y, 0.24 * rx, 0.13 * ry * open_)
        if white is not None:  # iris, drawn only inside the white of the eye
            _paint(img, grid, EYES[speaker.eyes], ex, eye_y, 0.11 * rx, 0.11 * ry,
                   lambda x, y, a, w=white, b=box: a * _crop(w, b, x, y, size))
        _paint(img, grid, skin * 0.6, ex, eye_y, 0.24 * rx, 0.03 * ry * np.clip(blink, 0, 1))
    _paint(img, grid, skin * 0.85, hx, hy + 0.2 * ry, 0.12 * rx, 0.2 * ry)  # nose

    # Mouth: lips, dark opening, upper teeth.
    op, wd, rd = mouth[:, 0], mouth[:, 1], mouth[:, 2]
    my = hy + 0.55 * ry
    mw = rx * (0.32 + 0.28 * wd) * (1.0 - 0.3 * rd)
    ih = ry * 0.32 * op
    lip = np.array([170, 80, 80], np.float32) * 0.5 + skin * 0.5
    _paint(img, grid, lip, hx, my, mw + 0.03 * ry, ih + (0.07 + 0.03 * rd) * ry)
    _paint(img, grid, lip * 0.6, hx, my, mw, 0.012)  # lip line when closed
    inner, box = _paint(img, grid, (45, 15, 20), hx, my, mw * 0.9, ih)
    if inner is not None:
        _paint(img, grid, (235, 232, 220), hx, my - 0.6 * ih, mw * 0.8, 0.45 * ih,
               lambda x, y, a, w=inner, b=box: a * _crop(w, b, x, y, size))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _crop(alpha, box, x, y, size):
    """`alpha` (over `box`) resampled onto the pixel grid x, y of another shape's box."""
    y0, y1, x0, x1 = box
    xi = np.clip(np.round(x[0, 0] * size - 0.5).astype(int), x0, x1 - 1) - x0
    yi = np.clip(np.round(y[0, :, 0] * size - 0.5).astype(int), y0, y1 - 1) - y0
    inside = ((x[0, 0] * size >= x0) & (x[0, 0] * size < x1))[None, None, :] & \
             ((y[0, :, 0] * size >= y0) & (y[0, :, 0] * size < y1))[None, :, None]
    return alpha[:, yi][:, :, xi] * inside
