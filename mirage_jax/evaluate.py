"""Sharded evaluation of a DiT with the sync judge (issue 7, must 6).

  mirage-jax evaluate --checkpoint DIT_RUN --judge SYNC_RUN --dataset synthetic_aroll/small \
      --data_dir DATA --num_examples 32 --out eval/  [--coordinator HOST:PORT ...]

The first N clips of the held-out split are split over the processes (contiguous blocks).
Each process generates its clips, each from its own speech, caption and first frame
(generate.py: batched and jitted over the process's devices; clip i's noise comes from
(seed, i) alone, so the numbers do not depend on how the clips were split), and judges them
with SyncNet's protocol (amdim/metrics.py) in these groups:

  generated            the generated video with the speech that conditioned it
  reconstructed        (latent DiTs) the real clip through the DiT's VAE, with its audio:
                       the best a model that decodes with this VAE can show the judge
  real                 the real clip with its own audio
  shuffled_real        the real clip with the next clip's audio (i + 1 mod N): no sync
  shuffled_generated   the generated video with the next clip's audio

The per-clip scores and judge features are gathered across processes; process 0 adds the
Fréchet distance to the real clips in the judge's video-embedding space and the viseme
accuracy of the frames under a probe fit on real train frames (against the visemes of the
conditioning speech), and writes metrics.json, sync_c.png, offsets.png and examples.png.
The controls stand beside every generated figure so that it can be read: near real (or
reconstructed) is lip sync, near shuffled is none.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import numpy as np

from mirage_jax.amdim import calibrate, metrics

SHIPPED_JUDGE = pathlib.Path(__file__).resolve().parent.parent / "demo_assets" / "sync_judge"
# group -> (frames, audio): which video is judged against which speech.
GROUPS = {"generated": ("generated", "own"), "reconstructed": ("reconstructed", "own"),
          "real": ("real", "own"), "shuffled_real": ("real", "other"),
          "shuffled_generated": ("generated", "other")}
SCORES = ("sync_c", "sync_c0", "sync_d", "offset")
VIDEOS = ("generated", "reconstructed", "real")


def shard(n: int, index: int, count: int) -> np.ndarray:
    """Example ids of process `index` of `count` (contiguous blocks, sizes within one of each
    other), padded with -1 to ceil(n / count) so every process gathers arrays of one shape."""
    if n < count:
        raise ValueError(f"--num_examples {n} is fewer than the {count} processes")
    ids = np.array_split(np.arange(n), count)[index]
    return np.pad(ids, (0, -(-n // count) - len(ids)), constant_values=-1).astype(np.int32)


def _uint8(x) -> np.ndarray:
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def generate_clips(gen, clips: dict, ids, settings, batch: int, progress: bool) -> np.ndarray:
    """uint8 [n, T, H, W, 3]: each clip from its own audio, caption and first frame,
    `batch` clips per sampling run."""
    out = []
    for i in range(0, len(ids), batch):
        s = slice(i, i + batch)
        out += gen.many(list(clips["audio"][s]), clips["caption"][s], list(clips["video"][s, 0]),
                        settings, progress, ids=ids[s])
    return np.stack(out)


def reconstruct(codec, video, batch: int) -> np.ndarray:
    """Real clips encoded and decoded by the VAE (the last frame held to fill 1 + k*r)."""
    t, r = video.shape[1], codec.r
    hold = -(-(t - 1) // r) * r + 1 - t
    out = []
    for i in range(0, len(video), batch):
        x = video[i:i + batch]
        x = np.concatenate([x, np.repeat(x[:, -1:], hold, 1)], 1)
        out.append(_uint8(codec.decode(codec.encode(x)))[:, :t])
    return np.concatenate(out)


def judge_clips(judge, videos: dict, own, other) -> dict:
    """Per-clip arrays: SyncNet's scores of every group whose frames are in `videos`, the
    judge's window embeddings (for the Fréchet distance) and per-frame features (for the
    viseme probe)."""
    t = videos["real"].shape[1]
    feats = lambda waves: np.stack([metrics.audio_features(w, t, judge.n_mels) for w in waves])
    audio = {"own": feats(own), "other": feats(other)}
    out = {f"embedding/{k}": judge.video_embeddings(v) for k, v in videos.items()}
    for group, (video, speech) in GROUPS.items():
        if video in videos:
            rows = metrics.sync_scores_batch(judge, None, audio[speech],
                                             video_emb=out[f"embedding/{video}"])
            for key in SCORES:
                out[f"{group}/{key}"] = np.array([r[key] for r in rows],
                                                 np.int32 if key == "offset" else np.float32)
    out.update({f"frame_features/{k}": judge.frame_features(v) for k, v in videos.items()})
    return out


def gather(part: dict, ids) -> dict:
    """Every process's per-clip arrays (`part`: this process's valid rows), in example order."""
    from jax.experimental import multihost_utils

    pad = lambda x: np.concatenate([x, np.zeros((len(ids) - len(x), *x.shape[1:]), x.dtype)])
    part = {**{k: pad(np.asarray(v)) for k, v in part.items()}, "index": ids}
    stacked = multihost_utils.process_allgather(part)  # [processes, rows, ...]
    flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in stacked.items()}
    order = np.argsort(flat["index"], kind="stable")
    order = order[flat["index"][order] >= 0]
    return {k: v[order] for k, v in flat.items()}


def groups_in(g: dict) -> list[str]:
    return [group for group in GROUPS if f"{group}/sync_c" in g]


def viseme_probe(judge, g: dict, train: dict) -> tuple[dict, dict]:
    """A linear probe from the judge's per-frame features to visemes, fit on real train
    frames, applied to the test frames of every video kind (summary, per-clip accuracy)."""
    from mirage_jax.data.visemes import NUM_VISEMES

    probe = metrics.VisemeProbe(lambda x: x, NUM_VISEMES)  # the features are precomputed
    fit = probe.fit(judge.frame_features(train["video"]), train["viseme"],
                    np.arange(len(train["video"])))
    own, other = g["viseme/own"], g["viseme/other"]
    kinds = [k for k in VIDEOS if f"frame_features/{k}" in g]
    hits = {k: probe.predict(g[f"frame_features/{k}"]) == own for k in kinds}
    per_clip = {k: v.mean(1) for k, v in hits.items()}
    hits["generated_vs_other_speech"] = probe.predict(g["frame_features/generated"]) == other
    summary = {k: float(v.mean()) for k, v in hits.items()}
    summary["chance"] = float(np.bincount(own.ravel()).max() / own.size)
    summary["probe"] = {**fit, "train_clips": len(train["video"])}
    return summary, per_clip


def summarize(g: dict, judge, train: dict) -> dict:
    """metrics.json's figures from the gathered per-clip arrays (process 0)."""
    rows = {group: [{k: g[f"{group}/{k}"][i].item() for k in SCORES}
                    for i in range(len(g["index"]))] for group in groups_in(g)}
    flat = lambda k: g[f"embedding/{k}"].reshape(-1, g[f"embedding/{k}"].shape[-1])
    kinds = [k for k in VIDEOS[:-1] if f"embedding/{k}" in g]
    frechet = {f"{k}_vs_real": metrics.frechet_distance(flat(k), flat("real")) for k in kinds}
    train_emb = judge.video_embeddings(train["video"])
    frechet["real_train_vs_real"] = metrics.frechet_distance(
        train_emb.reshape(-1, train_emb.shape[-1]), flat("real"))
    visemes, per_clip = viseme_probe(judge, g, train)
    paired = {f"{a}_vs_{b}": {k: calibrate.versus(rows[a], rows[b], k)
                              for k in ("sync_c", "sync_c0")}
              for a, b in (("generated", "shuffled_generated"), ("real", "shuffled_real"))}
    examples = [{"index": int(i), **{group: r[n] for group, r in rows.items()},
                 "viseme_accuracy": {k: float(v[n]) for k, v in per_clip.items()}}
                for n, i in enumerate(g["index"])]
    return {"groups": {group: calibrate.summarize(r, 0) for group, r in rows.items()},
            "paired": paired, "frechet": frechet, "viseme_accuracy": visemes,
            "examples": examples}


def plot(g: dict, videos: dict, out: pathlib.Path, max_offset: int) -> list[str]:
    """sync_c.png (Sync-C and sync_c0 per group), offsets.png (the offsets found per group)
    and examples.png (this process's first clips: every kind of video, one row each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from mirage_jax.demo import strip

    groups = groups_in(g)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, name in ((axes[0], "sync_c", "Sync-C (offset searched)"),
                          (axes[1], "sync_c0", "sync_c0 (at offset 0)")):
        values = np.concatenate([g[f"{group}/{key}"] for group in groups])
        bins = np.linspace(values.min(), values.max() + 1e-6, 25)
        for group in groups:
            ax.hist(g[f"{group}/{key}"], bins, histtype="step", lw=2, label=group)
        ax.set(xlabel=name, ylabel="clips")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "sync_c.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.arange(-max_offset, max_offset + 2) - 0.5
    for group in groups:
        ax.hist(g[f"{group}/offset"], bins, histtype="step", lw=2, label=group)
    ax.set(xlabel="offset found (frames; > 0: audio lags)", ylabel="clips")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "offsets.png", dpi=100)
    plt.close(fig)
    rows = [v[i] for i in range(min(3, len(videos["real"]))) for v in videos.values()]
    Image.fromarray(strip(rows, every=3, count=16)).save(out / "examples.png")
    return ["sync_c.png", "offsets.png", "examples.png"]


def run(checkpoint, out, num_examples: int, judge=None, dataset: str | None = None,
        data_dir: str | None = None, split: str = "test", batch: int = 16, settings=None,
        probe_clips: int = 160) -> dict | None:
    """The evaluation of this process's share; process 0 returns (and writes) the report,
    the others None. `judge`: a sync run or export (default: the shipped judge); `dataset`,
    `data_dir`: a pixel corpus (default: the judge's)."""
    from mirage_jax import config as config_lib
    from mirage_jax import generate, sharding
    from mirage_jax.train.loop import use_compile_cache

    t0 = time.perf_counter()
    use_compile_cache(config_lib.base_config())  # off for multi-process CPU (gloo hangs)
    settings = settings or generate.Settings(cfg_audio=4.0)
    judge = judge or SHIPPED_JUDGE
    judge_ = metrics.Judge.load(judge)
    dataset, data_dir = dataset or judge_.cfg.data.dataset, data_dir or judge_.cfg.data.data_dir
    gen = generate.Generator(checkpoint, sharding.data_mesh(jax.local_devices()))
    ids = shard(num_examples, jax.process_index(), jax.process_count())
    mine = ids[ids >= 0]
    clips = calibrate.load_clips(dataset, data_dir, split, indices=mine)
    others = calibrate.load_clips(dataset, data_dir, split, indices=(mine + 1) % num_examples)
    first = jax.process_index() == 0
    t1 = time.perf_counter()
    videos = {"generated": generate_clips(gen, clips, mine, settings, batch, first)}
    t_gen = time.perf_counter() - t1
    if videos["generated"].shape != clips["video"].shape:
        raise ValueError(f"the DiT makes clips of {videos['generated'].shape[1:]} from this "
                         f"speech, the real ones are {clips['video'].shape[1:]}: evaluate on "
                         f"a corpus of the DiT's frame size")
    if gen.codec is not None:
        videos["reconstructed"] = reconstruct(gen.codec, clips["video"], batch)
    videos["real"] = clips["video"]
    part = judge_clips(judge_, videos, clips["audio"], others["audio"])
    part.update({"viseme/own": clips["viseme"], "viseme/other": others["viseme"]})
    g = gather(part, ids)
    if not first:
        return None
    train = calibrate.load_clips(dataset, data_dir, "train", probe_clips)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(checkpoint), "judge": str(judge), "judge_step": judge_.step,
              "dataset": dataset, "split": split, "num_examples": num_examples,
              "frames": int(clips["video"].shape[1]), "processes": jax.process_count(),
              "devices": jax.device_count(), "settings": dataclasses.asdict(settings),
              **summarize(g, judge_, train)}
    result["plots"] = plot(g, videos, out, judge_.max_offset)
    result["seconds"] = {"generate": t_gen, "total": time.perf_counter() - t0}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    return result


def report(r: dict) -> str:
    """A few lines for the console: every group side by side."""
    lines = [(f"{r['num_examples']} {r['split']} clips of {r['dataset']} on {r['processes']} "
              f"process(es), {r['devices']} device(s)")]
    for group, s in r["groups"].items():
        lines.append(f"  {group:19s} Sync-C {s['sync_c']['mean']:.3f}  sync_c0 "
                     f"{s['sync_c0']['mean']:.3f}  Sync-D {s['sync_d']['mean']:.3f}  offset 0 "
                     f"{s['offset_accuracy']:.2f}")
    lines.append("  Frechet to real test clips (judge video features): " + ", ".join(
        f"{k.removesuffix('_vs_real')} {v:.2f}" for k, v in r["frechet"].items()))
    v = r["viseme_accuracy"]
    lines.append("  viseme probe accuracy: " + ", ".join(
        f"{k} {x:.3f}" for k, x in v.items() if k != "probe"))
    return "\n".join(lines)
