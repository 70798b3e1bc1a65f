"""Phoneme -> viseme table and per-frame mouth tracks with coarticulation.

Why: the synthetic face needs a mouth that moves like a speaker's, and the corpus needs
exact lip-sync ground truth. Targets are blended with a short raised-cosine kernel (real
mouths anticipate and lag phonemes), but on frames where a bilabial (p, b, m) is active
the lips are forced shut: that closure is the strongest visual cue of sync.

Phonemes are espeak-ng mnemonics (stress marks ' and , are ignored).

  id  name          phonemes                                   opening width roundness
  0   rest          pauses (_ _: _!), silence before speech       0.05  0.50  0.20
  1   closed        p b m                                         0.00  0.50  0.20
  2   lip_teeth     f v                                           0.10  0.55  0.00
  3   tongue_teeth  T D (th)                                      0.25  0.55  0.10
  4   sibilant      s z                                           0.12  0.75  0.00
  5   postalveolar  S Z tS dZ (sh, zh, ch, j)                     0.22  0.35  0.80
  6   tongue        t d n l k g N h j and other consonants        0.30  0.55  0.20
  7   rounded       w r; o/u vowels (oU u: U O: OI)               0.45  0.25  1.00
  8   spread        i/e vowels (i i: I E eI e@ i@)                0.35  0.90  0.00
  9   open          a vowels (a A: aI aU a# 0)                    0.90  0.60  0.30
  10  mid           schwa-like (@ @L @2 3 3: V)                   0.55  0.55  0.30
"""
from __future__ import annotations

import numpy as np

VISEME_NAMES = ("rest", "closed", "lip_teeth", "tongue_teeth", "sibilant", "postalveolar",
                "tongue", "rounded", "spread", "open", "mid")
NUM_VISEMES = len(VISEME_NAMES)
# Per-viseme mouth targets: (opening, width, roundness), all in [0, 1].
MOUTH_TARGETS = np.array([
    [0.05, 0.50, 0.20], [0.00, 0.50, 0.20], [0.10, 0.55, 0.00], [0.25, 0.55, 0.10],
    [0.12, 0.75, 0.00], [0.22, 0.35, 0.80], [0.30, 0.55, 0.20], [0.45, 0.25, 1.00],
    [0.35, 0.90, 0.00], [0.90, 0.60, 0.30], [0.55, 0.55, 0.30]], np.float32)

_CONSONANTS = {"p": 1, "b": 1, "m": 1, "f": 2, "v": 2, "T": 3, "D": 3, "s": 4, "z": 4,
               "S": 5, "Z": 5, "tS": 5, "dZ": 5, "w": 7, "r": 7, "W": 7}
BILABIALS = frozenset({"p", "b", "m"})
CLOSURE_LEAD_S = 0.02  # lips shut slightly before espeak marks a stop's release


def _base(symbol: str) -> str:
    return symbol.lstrip("',").rstrip("-#/")


def is_bilabial(symbol: str) -> bool:
    return _base(symbol) in BILABIALS


def phoneme_to_viseme(symbol: str) -> int:
    """Viseme id of one espeak phoneme mnemonic (see the module table)."""
    s = _base(symbol)
    if not s or s.startswith("_"):
        return 0
    if s in _CONSONANTS:
        return _CONSONANTS[s]
    head = s[0]
    if head in "iIeE":
        return 8
    if head in "aA0":
        return 9
    if head in "oOuU":
        return 7
    if head in "@3V":
        return 10
    return 6


def _intervals(events, n_samples):
    """(start, end, viseme, bilabial) per event; an event lasts until the next one starts."""
    starts = np.array([int(s) for _, s in events], np.int64)
    if np.any(np.diff(starts) < 0):
        raise ValueError("viseme_track(): phoneme events must be in increasing sample order")
    ends = np.append(starts[1:], max(n_samples, starts[-1]) if len(starts) else n_samples)
    vis = np.array([phoneme_to_viseme(p) for p, _ in events], np.int64)
    bil = np.array([is_bilabial(p) for p, _ in events], bool)
    return starts, ends, vis, bil


def closure_frames(events, n_frames: int, fps: int = 25, sample_rate: int = 16000):
    """bool [T]: frames overlapping a bilabial phoneme (extended by CLOSURE_LEAD_S)."""
    spf = sample_rate / fps
    n_samples = int(round(n_frames * spf))
    closed = np.zeros(n_frames, bool)
    if not events:
        return closed
    starts, ends, _, bil = _intervals(events, n_samples)
    lead = CLOSURE_LEAD_S * sample_rate
    for s, e in zip(starts[bil], ends[bil]):
        f0 = int(np.floor(max(s - lead, 0) / spf))
        f1 = int(np.ceil(max(e, s + 1) / spf))  # exclusive; zero-length events still count
        closed[max(f0, 0):min(f1, n_frames)] = True
    return closed


def viseme_track(events, n_frames: int, fps: int = 25, sample_rate: int = 16000,
                 smooth_s: float = 0.07, substeps: int = 4):
    """Per-frame viseme ids int32 [T] and mouth params float32 [T, 3] (open, width, round).

    `events` are [(phoneme, start_sample)] in the clip's audio; silence before the first
    event is rest. `mouth[:, 0]` is the `mouth_open` track; it is exactly 0 on frames that
    overlap a p/b/m phoneme.
    """
    if n_frames <= 0:
        raise ValueError(f"viseme_track(): n_frames must be positive, got {n_frames}")
    spf = sample_rate / fps
    n_sub = n_frames * substeps
    t = (np.arange(n_sub) + 0.5) * spf / substeps  # sub-step centres in samples
    vis_sub = np.zeros(n_sub, np.int64)
    if events:
        starts, ends, vis, _ = _intervals(events, int(round(n_frames * spf)))
        idx = np.searchsorted(starts, t, side="right") - 1
        vis_sub = np.where(idx >= 0, vis[np.clip(idx, 0, None)], 0)
    target = MOUTH_TARGETS[vis_sub]  # [n_sub, 3]
    # Coarticulation: raised-cosine blend over `smooth_s` seconds, edges held.
    width = max(int(round(smooth_s * fps * substeps)), 1)
    kernel = np.hanning(width + 2)[1:-1]
    kernel /= kernel.sum()
    pad = len(kernel) // 2
    padded = np.pad(target, ((pad, len(kernel) - 1 - pad), (0, 0)), mode="edge")
    smooth = np.stack([np.convolve(padded[:, k], kernel, "valid") for k in range(3)], -1)
    mouth = smooth.reshape(n_frames, substeps, 3).mean(1)
    counts = np.zeros((n_frames, NUM_VISEMES), np.int64)
    np.add.at(counts, (np.repeat(np.arange(n_frames), substeps), vis_sub), 1)
    viseme = counts.argmax(1)
    closed = closure_frames(events, n_frames, fps, sample_rate)
    mouth[closed, 0] = 0.0
    viseme[closed] = 1
    return viseme.astype(np.int32), np.clip(mouth, 0.0, 1.0).astype(np.float32)
