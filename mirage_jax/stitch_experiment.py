"""The stitching experiment (issue 6): at equal compute, the audio model trained from scratch
against a silent model trained first with the audio stream stitched in.

  mirage-jax stitch-experiment --config configs/latent_demo.py --data_dir DATA \
      --workdir runs/stitch_exp --steps 4000 --every 500 --warmup_new 200

Arms (the same number of optimizer steps; a silent step is slightly cheaper), from `--config`
(an audio DiT config; its silent twin is the same config with `model.audio=False`):
  scratch   the config for S steps
  stitched  the silent twin for S/2 steps, then the config with init_from the silent run,
            model.stitch=('audio',) and train.warmup_new_steps=W, for S/2 steps
So at step S the arms have had equal compute, and the stitched arm at S is the scratch arm at
S/2 plus a silent model's S/2 steps (equal audio-conditioned steps). `--config.*` overrides
apply to every run; a latent config's cache is encoded from DATA (`synthetic_aroll/small`)
with its `vae_checkpoint` first. Every `--every` steps a checkpoint is kept and afterwards
evaluated on whole held-out clips (test split), each generated as `mirage-jax generate`
would (windows, Euler, audio guidance `--cfg_audio`) from its own speech, caption and first
frame, with the checkpoint's raw weights (a short run's EMA still remembers its init):
  mouth_sync        per clip, the correlation over frames of the generated mouth box's
                    darkness with the corpus's true mouth opening (demo.mouth_sync), signed
                    by the real clip's (an open mouth darkens light skin, lightens dark)
  closure_contrast  mouth darkness on open-vowel minus p/b/m frames, in clip std units
  sync_c0           the sync judge's confidence at offset 0 (evaluate.py, SyncNet protocol)
                    with the clip's own speech, beside `shuffled_sync_c0` with the next clip's
The ceilings: the same figures for the real clips and, for latent models, for the real clips
through the VAE. Writes WORKDIR/stitch_experiment.json and stitch_experiment.png.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mirage_jax import config as config_lib
from mirage_jax import demo, flow, sharding
from mirage_jax.data.pipeline import GrainSource
from mirage_jax.model.tokens import batch_to_streams
from mirage_jax.train import loop
from mirage_jax.train.checkpoint import Checkpointer, load_run

REPO = pathlib.Path(__file__).resolve().parent.parent
log = logging.getLogger("mirage_jax")
DEFAULT_CONFIG = REPO / "configs" / "latent_demo.py"
SOURCE = "synthetic_aroll/small"  # the corpus a latent config's cache is encoded from


def held_out_batch(cfg, clips: int) -> dict:
    """`clips` fixed test-split training windows (for the step-0 velocity comparison)."""
    test = config_lib.apply_overrides(cfg, ["data.split=test", f"data.global_batch={clips}",
                                            "data.workers=0"])
    return GrainSource(test).batch(0)


def video_velocity(run_dir, step: int, batch: dict) -> np.ndarray:
    """The video velocity of checkpoint `step` on `batch` noised for audio -> video at t=0.5."""
    run = load_run(run_dir, sharding.data_mesh(jax.devices()[:1]), "params", step)
    cfg, graphdef = run["cfg"], run["graphdef"]
    inputs = {k: jnp.asarray(batch[k]) for k in ("video", "ref", "audio", "text")}
    streams = batch_to_streams(inputs, cfg)
    v = streams["video"]
    eps = jax.random.normal(jax.random.key(1), v.x.shape)
    streams["video"] = v.replace(x=flow.noise(v.x, eps, v.t + 0.5), t=v.t + 0.5)
    fn = jax.jit(lambda p, s: nnx.merge(graphdef, p)(s)["video"])
    return np.asarray(fn(run["params"], streams))


def checkpoint_steps(run_dir) -> list[int]:
    ckpt = Checkpointer(pathlib.Path(run_dir) / "checkpoints", every=1, keep=1, async_save=False)
    try:
        return sorted(ckpt.manager.all_steps())
    finally:
        ckpt.close()


def losses(run_dir, offset: int = 0, smooth: int = 50) -> dict:
    """Training losses from metrics.jsonl, a running mean over the last `smooth` steps. A
    loss of exactly 0 means the batch generated none of that stream (audio is generated in
    a fraction of the examples): missing, not perfect."""
    text = (pathlib.Path(run_dir) / "metrics.jsonl").read_text()
    rows = [json.loads(x) for x in text.split("\n") if x]
    out = {"step": [r["step"] + offset for r in rows]}
    for key in ("loss_video", "loss_audio"):
        v = np.array([r.get(key, np.nan) or np.nan for r in rows], np.float64)
        ok, kernel = ~np.isnan(v), np.ones(smooth)
        mean = (np.convolve(np.where(ok, v, 0.0), kernel)[: len(v)]
                / np.maximum(np.convolve(ok, kernel)[: len(v)], 1))
        out[key] = [float(m) if ok.any() else None for m in mean]
    return out


class Measure:
    """Lip sync of videos of the held-out clips against the corpus's ground truth and under
    the sync judge, each beside its control (the next clip's speech)."""

    def __init__(self, dataset: str, data_dir: str, clips: int, judge=None):
        from mirage_jax import evaluate
        from mirage_jax.amdim import calibrate, metrics

        self.clips = calibrate.load_clips(dataset, data_dir, "test", clips)
        self.mouth, self.speaker = self.clips["mouth_open"], self.clips["speaker_id"]
        self.other = np.roll(self.clips["audio"], -1, axis=0)
        self.judge = metrics.Judge.load(judge or evaluate.SHIPPED_JUDGE)
        # Which way the box's darkness moves when the mouth opens depends on the speaker
        # (on dark skin the open mouth's teeth and lips are lighter): the real clip says.
        self.sign = [np.sign(demo.mouth_sync(v, m, s)) or 1.0
                     for v, m, s in zip(self.clips["video"], self.mouth, self.speaker)]

    def __call__(self, video: np.ndarray) -> dict:
        from mirage_jax import evaluate

        c = self.clips
        sync = [sign * demo.mouth_sync(v, m, s)
                for v, m, s, sign in zip(video, self.mouth, self.speaker, self.sign)]
        closure = [sign * demo.closure_contrast(v, vis, s)
                   for v, vis, s, sign in zip(video, c["viseme"], self.speaker, self.sign)]
        judged = evaluate.judge_clips(self.judge, {"real": c["video"], "generated": video},
                                      c["audio"], self.other)
        return {"mouth_sync": float(np.mean(sync)), "closure_contrast": float(np.mean(closure)),
                "sync_c0": float(judged["generated/sync_c0"].mean()),
                "shuffled_sync_c0": float(judged["shuffled_generated/sync_c0"].mean())}


def arms(config, workdir: pathlib.Path, data_dir, steps, every, warmup_new, overrides) -> dict:
    """The three training runs (scratch, silent, stitched); a latent config's cache first."""
    common = [f"train.ckpt_every={every}", "train.keep=100", *overrides]
    base = config_lib.load(config, common)
    if base.data.video == "latents":
        from mirage_jax.data import latent_dataset
        from mirage_jax.latents import Codec

        enc = latent_dataset.encode(Codec(base.vae_checkpoint), SOURCE, str(data_dir),
                                    str(workdir / "latents"))
        common += [f"data.data_dir={workdir / 'latents'}", f"data.dataset={enc['dataset']}"]
    else:
        common += [f"data.data_dir={data_dir}"]
    half = steps // 2
    return {
        "scratch": config_lib.load(config, common + [f"train.steps={steps}"]),
        "silent": config_lib.load(config, common + [f"train.steps={half}", "model.audio=False"]),
        "stitched": config_lib.load(config, common + [
            f"train.steps={steps - half}", f"init_from={workdir / 'silent'}",
            "model.stitch=('audio',)", f"train.warmup_new_steps={warmup_new}"]),
    }


def run(workdir, data_dir, config=None, steps: int = 4000,
        every: int = 500, warmup_new: int = 200, clips: int = 16, sample_steps: int = 32,
        cfg_audio: float = 4.0, overrides=()) -> dict:
    from mirage_jax import evaluate, generate

    workdir, config = pathlib.Path(workdir), config or DEFAULT_CONFIG
    workdir.mkdir(parents=True, exist_ok=True)
    runs = arms(config, workdir, data_dir, steps, every, warmup_new, overrides)
    for name, cfg in runs.items():  # resumable: a rerun continues where it stopped
        log.info("stitch experiment: training %s (%d steps)", name, cfg.train.steps)
        loop.train(cfg, workdir / name, resume=True)

    # Step 0 at this scale: the stitched run's first checkpoint (step 1, taken at lr 0, so
    # its step-0 weights) against the silent model it was stitched into.
    batch = held_out_batch(runs["scratch"], clips)
    silent_v = video_velocity(workdir / "silent", checkpoint_steps(workdir / "silent")[-1], batch)
    first = checkpoint_steps(workdir / "stitched")[0]
    stitched_v = video_velocity(workdir / "stitched", first, batch)
    step0 = float(np.sqrt(np.mean((stitched_v - silent_v) ** 2) / np.mean(silent_v**2)))
    log.info("stitched step %d vs silent: relative RMS video velocity difference %.3g",
             first, step0)

    pixels = runs["scratch"].data.video == "pixels"
    measure = Measure(runs["scratch"].data.dataset if pixels else SOURCE,
                      str(data_dir), clips)
    settings = generate.Settings(steps=sample_steps, cfg_audio=cfg_audio, seed=0)
    ids = np.arange(clips)
    ceilings = {"real": measure(measure.clips["video"])}
    if not pixels:  # the best a DiT decoding with this VAE can show
        from mirage_jax.latents import Codec

        ceilings["reconstructed"] = measure(evaluate.reconstruct(
            Codec(runs["scratch"].vae_checkpoint), measure.clips["video"], clips))
    curves = {}
    for name, offset in (("scratch", 0), ("stitched", steps // 2)):
        done_file = workdir / name / "eval.json"  # resumable: evaluated steps are kept
        done = json.loads(done_file.read_text()) if done_file.exists() else {}
        points, gen = [], None
        for step in checkpoint_steps(workdir / name):
            if str(step) not in done:
                if gen is None:
                    gen = generate.Generator(workdir / name, step=step, weights="params")
                elif gen.step != step:
                    gen.restore(step, "params")
                video = evaluate.generate_clips(gen, measure.clips, ids, settings, clips, False)
                done[str(step)] = {"step": step + offset, **measure(video)}
                done_file.write_text(json.dumps(done, indent=1))
            points.append(done[str(step)])
            log.info("%s step %d: %s", name, step + offset, points[-1])
        curves[name] = {"eval": points, "train": losses(workdir / name, offset)}
    curves["silent"] = {"train": losses(workdir / "silent")}
    result = {"config": str(config), "steps": steps, "stitch_at": steps // 2,
              "warmup_new_steps": warmup_new, "clips": clips,
              "settings": {"sample_steps": sample_steps, "cfg_audio": cfg_audio},
              "overrides": list(overrides), "step0_relative_rms": step0,
              "ceilings": ceilings, "curves": curves}
    (workdir / "stitch_experiment.json").write_text(json.dumps(result, indent=1))
    plot(result, workdir / "stitch_experiment.png")
    return result


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, ceil = result["curves"], result["ceilings"]
    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    colors = {"scratch": "C0", "stitched": "C1", "silent": "C2"}
    for name in ("scratch", "silent", "stitched"):
        tr = c[name]["train"]
        ax[0].plot(tr["step"], tr["loss_video"], color=colors[name], label=name)
        if name != "silent":
            ax[1].plot(tr["step"], tr["loss_audio"], color=colors[name], label=name)
    for name in ("scratch", "stitched"):
        ev = c[name]["eval"]
        steps = [p["step"] for p in ev]
        ax[2].plot(steps, [p["mouth_sync"] for p in ev], "o-", color=colors[name], label=name)
        ax[3].plot(steps, [p["sync_c0"] for p in ev], "o-", color=colors[name], label=name)
        ax[3].plot(steps, [p["shuffled_sync_c0"] for p in ev], "x:", color=colors[name],
                   label=f"{name}, next clip's speech")
    for key, a in (("mouth_sync", ax[2]), ("sync_c0", ax[3])):
        for ceiling, ls in (("real", ":"), ("reconstructed", "--")):
            if ceiling in ceil:
                a.axhline(ceil[ceiling][key], color="k", ls=ls, lw=0.8, label=f"{ceiling} clips")
    titles = ("video loss (train, running mean)", "audio loss (train, running mean)",
              "mouth sync with the true opening (held out)", "sync judge sync_c0 (held out)")
    for a, title in zip(ax, titles):
        a.axvline(result["stitch_at"], color="gray", lw=0.5)
        a.set_title(title)
        a.set_xlabel("optimizer steps (equal compute)")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
