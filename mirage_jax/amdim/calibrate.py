"""Calibration of the sync judge on held-out real clips (issue 7, must 5).

    mirage-jax sync-calibrate --checkpoint SYNC_RUN [--data_dir DATA] --out calibration.json

On every clip of the test split (other sentences than training, the same speakers), the
judge scores the clip's video against
  - its own audio (true),
  - its own audio delayed or advanced by `shifts` frames (5+), and
  - another clip's audio (the next clip of the split),
with SyncNet's protocol (metrics.py). Reported: Sync-C, Sync-D and sync_c0 per condition,
how often true audio beats the others clip by clip, and the offset accuracy (found offset =
0 for true audio, = the shift for shifted audio, exactly and within one frame).

Also the references of the other metrics on real data, so a generated clip's numbers
have something to stand against: the Fréchet distance (judge video features) from train
clips to test clips, to test clips with a frozen mouth (every frame the clip's first) and
to test clips with their frames shuffled in time; and the viseme probe (fit on train
frames) on test frames against their own visemes and against another clip's.
"""

from __future__ import annotations

import json
import time

import numpy as np

from mirage_jax.amdim import metrics
from mirage_jax.amdim.augment import resize
from mirage_jax.data.visemes import NUM_VISEMES


def load_clips(dataset: str, data_dir: str, split: str, max_clips: int = 0,
               indices=None) -> dict:
    """Whole clips of a synthetic_aroll split (the first `max_clips`, all, or those at
    `indices`): video uint8 [N, T, H, W, 3], audio waveforms [N, S], visemes [N, T], true
    mouth opening [N, T], speaker ids [N], captions [N]."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(dataset, data_dir=data_dir)[split]
    if indices is None:
        indices = range(len(source) if not max_clips else min(max_clips, len(source)))
    recs = [source[int(i)] for i in indices]
    text = lambda x: x.decode() if isinstance(x, bytes) else str(x)
    return {"video": np.stack([r["video"] for r in recs]),
            "audio": np.stack([np.asarray(r["audio"], np.float32) for r in recs]),
            "viseme": np.stack([np.asarray(r["viseme"], np.int32) for r in recs]),
            "mouth_open": np.stack([np.asarray(r["mouth_open"], np.float64) for r in recs]),
            "speaker_id": np.array([int(r["speaker_id"]) for r in recs], np.int32),
            "caption": [text(r["caption"]) for r in recs]}


def summarize(rows: list[dict], expected_offset=None) -> dict:
    out = {}
    for key in ("sync_c", "sync_d", "sync_c0"):
        v = np.array([r[key] for r in rows])
        out[key] = {"mean": float(v.mean()), "median": float(np.median(v)),
                    "std": float(v.std())}
    found = np.array([r["offset"] for r in rows])
    out["offsets_found"] = found.tolist()
    if expected_offset is not None:
        out["offset_accuracy"] = metrics.offset_accuracy(found, expected_offset)
        out["offset_accuracy_pm1"] = metrics.offset_accuracy(found, expected_offset, tol=1)
    return out


def versus(true_rows, rows, key: str) -> dict:
    """Paired comparison of `key` (true audio minus the other condition) over clips."""
    d = np.array([a[key] - b[key] for a, b in zip(true_rows, rows)])
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("inf")
    return {"mean_diff": float(d.mean()), "true_wins": float(np.mean(d > 0)),
            "clearly_higher": bool(d.mean() > 3 * se and np.mean(d > 0) >= 0.8)}


def calibrate(checkpoint: str, dataset: str | None = None, data_dir: str | None = None,
              split: str = "test", shifts=(-10, -7, -5, 5, 7, 10), train_clips: int = 160,
              max_clips: int = 0, seed: int = 0, log=print) -> dict:
    t0 = time.perf_counter()
    judge = metrics.Judge.load(checkpoint)
    cfg = judge.cfg
    dataset, data_dir = dataset or cfg.data.dataset, data_dir or cfg.data.data_dir
    clips = load_clips(dataset, data_dir, split, max_clips)
    n, t = clips["video"].shape[:2]
    feats = lambda waves: np.stack([metrics.audio_features(w, t, judge.n_mels) for w in waves])
    v_emb = np.concatenate([judge.video_embeddings(clips["video"][i:i + 8])
                            for i in range(0, n, 8)])
    score = lambda audio: metrics.sync_scores_batch(judge, None, audio, video_emb=v_emb)
    true = score(feats(clips["audio"]))
    other_of = (np.arange(n) + 1) % n
    other = score(feats(clips["audio"][other_of]))
    shifted = {s: score(feats([metrics.delay_audio(w, s) for w in clips["audio"]]))
               for s in shifts}
    all_shifted = [r for s in shifts for r in shifted[s]]
    true_rep = true * len(shifts)
    result = {
        "checkpoint": str(checkpoint), "step": judge.step, "dataset": dataset, "split": split,
        "clips": n, "frames": t, "max_offset": judge.max_offset, "shifts": list(shifts),
        "true": summarize(true, 0),
        "shifted": {**summarize(all_shifted), "offset_accuracy": metrics.offset_accuracy(
            [r["offset"] for r in all_shifted], np.repeat(shifts, n)),
            "offset_accuracy_pm1": metrics.offset_accuracy(
            [r["offset"] for r in all_shifted], np.repeat(shifts, n), tol=1)},
        "shifted_by": {str(s): summarize(shifted[s], s) for s in shifts},
        "other_clip": summarize(other),
        "true_vs_shifted": {k: versus(true_rep, all_shifted, k) for k in ("sync_c", "sync_c0")},
        "true_vs_other_clip": {k: versus(true, other, k) for k in ("sync_c", "sync_c0")},
        "curves": {"true_mean": np.mean([r["dists"] for r in true], 0).tolist(),
                   "other_clip_mean": np.mean([r["dists"] for r in other], 0).tolist(),
                   **{f"shifted_{s}_mean": np.mean([r["dists"] for r in shifted[s]], 0).tolist()
                      for s in shifts}},
    }
    log(f"sync scores of {n} clips x {2 + len(shifts)} audios: {time.perf_counter() - t0:.0f}s")

    # References for the realism metrics (Fréchet distance, viseme probe) on real clips.
    train = load_clips(dataset, data_dir, "train", train_clips)
    rng = np.random.default_rng(seed)
    frozen = np.repeat(clips["video"][:, :1], t, axis=1)
    shuffled = np.stack([v[rng.permutation(t)] for v in clips["video"]])
    f_train = metrics.video_features(judge, train["video"])
    result["frechet"] = {name: metrics.frechet_distance(f_train, metrics.video_features(judge, v))
                         for name, v in (("test", clips["video"]), ("test_frozen_mouth", frozen),
                                         ("test_shuffled_frames", shuffled))}
    box, size = cfg.sync.crop, cfg.sync.crop_size
    pixels = lambda v: np.asarray(resize(
        np.asarray(v, np.float32).reshape(-1, *v.shape[2:]) / 127.5 - 1.0, size, box)
    ).reshape(v.shape[0], v.shape[1], -1)
    probes = {}
    train_ids = np.arange(len(train["video"]))
    for name, fn in (("judge_frame_features", judge.frame_features), ("mouth_pixels", pixels)):
        p = metrics.VisemeProbe(fn, NUM_VISEMES)
        row = p.fit(train["video"], train["viseme"], train_ids)
        probes[name] = {**row, "test_own_visemes": p.accuracy(clips["video"], clips["viseme"]),
                        "test_other_clip_visemes": p.accuracy(clips["video"],
                                                              clips["viseme"][other_of]),
                        "test_frozen_mouth": p.accuracy(frozen, clips["viseme"])}
    chance = np.bincount(clips["viseme"].ravel()).max() / clips["viseme"].size
    result["viseme_probe"] = {"chance": float(chance), "train_clips": len(train["video"]),
                              **probes}
    result["seconds"] = time.perf_counter() - t0
    log(report(result))
    return result


def report(r: dict) -> str:
    """A few lines for the console."""
    def f(s):
        return (f"Sync-C {s['sync_c']['mean']:.3f}  sync_c0 {s['sync_c0']['mean']:.3f}  "
                f"Sync-D {s['sync_d']['mean']:.3f}")

    true, shifted = r["true"], r["shifted"]
    lines = [f"{r['clips']} {r['split']} clips of {r['dataset']}, judge step {r['step']}",
             (f"  true audio      {f(true)}  offset acc {true['offset_accuracy']:.2f}"
              f" (+-1: {true['offset_accuracy_pm1']:.2f})"),
             (f"  shifted {r['shifts']}  {f(shifted)}  offset = shift "
              f"{shifted['offset_accuracy']:.2f} (+-1: {shifted['offset_accuracy_pm1']:.2f})"),
             f"  other clip      {f(r['other_clip'])}"]
    for name in ("true_vs_shifted", "true_vs_other_clip"):
        v = r[name]
        lines.append(f"  {name}: Sync-C wins {v['sync_c']['true_wins']:.2f} (clearly: "
                     f"{v['sync_c']['clearly_higher']}), sync_c0 wins "
                     f"{v['sync_c0']['true_wins']:.2f} (clearly: {v['sync_c0']['clearly_higher']})")
    if "frechet" in r:
        lines.append("  Frechet to train clips: " + ", ".join(
            f"{k} {v:.2f}" for k, v in r["frechet"].items()))
        vp = r["viseme_probe"]
        for k in ("judge_frame_features", "mouth_pixels"):
            lines.append(f"  viseme probe {k}: own {vp[k]['test_own_visemes']:.3f}, other clip's "
                         f"{vp[k]['test_other_clip_visemes']:.3f}, frozen mouth "
                         f"{vp[k]['test_frozen_mouth']:.3f} (chance {vp['chance']:.3f})")
    return "\n".join(lines)


def write(result: dict, out) -> None:
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
