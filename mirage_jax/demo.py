"""`mirage-jax demo`: the whole pipeline on the synthetic corpus, end to end.

  prepare synthetic_aroll/small (64x64) -> the VAE (the shipped demo weights, or trained
  with configs/vae_demo.py) -> cache latents -> train the DiT on them (configs/latent_demo.py)
  -> generate from a sentence that is not in the corpus -> demo_out/: the mp4, the
  ground-truth render of the same speech, a PNG strip of both, and summary.json
  -> `mirage-jax evaluate` on held-out clips with the sync judge -> demo_out/evaluation/

The ground truth exists because the corpus is drawn: the same speaker saying the same
espeak-ng sentence, mouth driven by its visemes. `summary.json` holds a mouth-opening sync
figure: the correlation over frames between the darkness of the generated mouth box and the
true mouth opening, next to the same figure for the generation from shuffled audio (another
sentence's speech) as the control. Its `sync_judge` part is the evaluation's (evaluate.py):
Sync-C, sync_c0, offset accuracy, Fréchet distance and viseme accuracy of clips generated
from held-out speech under the audio-visual sync judge (the shipped export in
demo_assets/sync_judge, trained with configs/sync_demo.py), beside the same figures for the
real clips, the real clips through the VAE and shuffled audio.
"""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np

from mirage_jax import config as config_lib
from mirage_jax.data import face, synthetic_aroll, tts, visemes

log = logging.getLogger("mirage_jax")
REPO = pathlib.Path(__file__).resolve().parent.parent
SHIPPED_VAE = REPO / "demo_assets" / "vae_demo"
SENTENCE = "Bob made a purple map for Pam, and Mom bought a lemon pie."
CONTROL = "Grace is calling the teacher about her lovely garden today."
SPEAKER = 3
EVAL_CLIPS = 16  # held-out clips judged by the sync judge (a minute or two on 2 cores)


def render_speech(text: str, speaker_id: int = SPEAKER, size: int = 64, seed: int = 0) -> dict:
    """A corpus speaker saying `text`: audio, frames, mouth opening, visemes, caption."""
    spk = face.Speaker.sample(speaker_id)
    rng = np.random.default_rng([seed, 99, speaker_id])
    audio, events = tts.speak(text, spk.voice, spk.rate, spk.pitch)
    frames = max(1, -(-len(audio) // synthetic_aroll.SAMPLES_PER_FRAME))
    audio = np.pad(audio, (0, frames * synthetic_aroll.SAMPLES_PER_FRAME - len(audio)))
    viseme, mouth = visemes.viseme_track(events, frames, synthetic_aroll.FPS,
                                         synthetic_aroll.SAMPLE_RATE)
    video = face.render_clip(
        spk, mouth, face.blink_track(frames, rng, synthetic_aroll.FPS),
        face.head_motion(audio, frames, rng, synthetic_aroll.SAMPLES_PER_FRAME,
                         synthetic_aroll.FPS), size)
    return {"audio": audio, "video": video, "mouth_open": mouth[:, 0], "viseme": viseme,
            "caption": spk.caption(), "speaker_id": speaker_id}


def mouth_sync(frames: np.ndarray, mouth_open: np.ndarray, speaker_id: int) -> float:
    """Correlation over frames of the mouth box's darkness with the true mouth opening."""
    dark = mouth_darkness(frames, speaker_id)
    n = min(len(dark), len(mouth_open))
    if n < 3 or dark[:n].std() < 1e-6 or np.std(mouth_open[:n]) < 1e-6:
        return 0.0
    return float(np.corrcoef(dark[:n], mouth_open[:n])[0, 1])


def mouth_darkness(frames: np.ndarray, speaker_id: int) -> np.ndarray:
    """[T] mean darkness of the mouth box: an open mouth shows its dark inside."""
    from mirage_jax.latents import mouth_box

    y0, y1, x0, x1 = mouth_box({"speaker_id": speaker_id}, frames.shape[1])
    # float64: float32 means of identical frames can differ in the last bit.
    return -frames[:, y0:y1, x0:x1].astype(np.float64).mean((1, 2, 3))


def closure_contrast(frames: np.ndarray, viseme: np.ndarray, speaker_id: int) -> float:
    """How much darker the mouth is on open-vowel frames than on p/b/m (closed) frames, in
    units of the darkness's std over the clip: > 0 when the lips shut on bilabials."""
    dark = mouth_darkness(frames, speaker_id)
    n = min(len(dark), len(viseme))
    dark, viseme = dark[:n], viseme[:n]
    closed = viseme == visemes.VISEME_NAMES.index("closed")
    opened = viseme == visemes.VISEME_NAMES.index("open")
    if not closed.any() or not opened.any() or dark.std() < 1e-6:
        return 0.0
    return float((dark[opened].mean() - dark[closed].mean()) / dark.std())


def strip(rows: list[np.ndarray], every: int = 2, count: int = 16) -> np.ndarray:
    """Frames side by side, one row per video (every `every`-th frame, `count` of them)."""
    picked = [np.concatenate(list(r[: every * count : every]), axis=1) for r in rows]
    width = max(p.shape[1] for p in picked)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in picked])


def sync_summary(r: dict) -> dict:
    """The figures of an evaluation (evaluate.run's result) that summary.json keeps: per
    group the mean Sync-C and sync_c0 and the offset accuracy; Fréchet; viseme accuracy."""
    groups = r["groups"]
    return {"clips": r["num_examples"], "judge": r["judge"],
            **{k: {g: s[k]["mean"] for g, s in groups.items()} for k in ("sync_c", "sync_c0")},
            "offset_accuracy": {g: s["offset_accuracy"] for g, s in groups.items()},
            "frechet": r["frechet"],
            "viseme_accuracy": {k: v for k, v in r["viseme_accuracy"].items() if k != "probe"}}


def judge_checkpoint(workdir: pathlib.Path, data_dir: pathlib.Path) -> pathlib.Path:
    """The shipped sync judge, or one trained with configs/sync_demo.py if it is missing."""
    from mirage_jax import evaluate
    from mirage_jax.train import loop

    if evaluate.SHIPPED_JUDGE.exists():
        return evaluate.SHIPPED_JUDGE
    log.info("no shipped sync judge at %s: training configs/sync_demo.py (about 12 minutes "
             "on 2 cores)", evaluate.SHIPPED_JUDGE)
    cfg = config_lib.load(REPO / "configs" / "sync_demo.py", [f"data.data_dir={data_dir}"])
    loop.train(cfg, workdir / "sync", resume=True)
    return workdir / "sync"


def run(workdir, overrides=(), data_dir: str | None = None, vae=None) -> dict:
    from PIL import Image

    from mirage_jax import evaluate, generate, media
    from mirage_jax.data import latent_dataset
    from mirage_jax.latents import Codec
    from mirage_jax.train import loop

    workdir = pathlib.Path(workdir)
    data_dir = pathlib.Path(data_dir or workdir / "data")
    if config_lib.load(REPO / "configs" / "latent_demo.py", list(overrides)).model.attention \
            == "flash_cpu":  # build the CPU attention kernel now: no compiler fails here
        from mirage_jax.model import flash_cpu

        flash_cpu.library_path()
    synthetic_aroll.prepare("small", str(data_dir))
    sentences = set(tfds_sentences(data_dir))
    if SENTENCE in sentences or CONTROL in sentences:
        raise RuntimeError("the demo sentence is in the training corpus; pick another")

    vae = pathlib.Path(vae) if vae else SHIPPED_VAE
    if not vae.exists():
        log.info("no shipped VAE weights at %s: training configs/vae_demo.py (about an hour "
                 "on 2 cores)", vae)
        vae_cfg = config_lib.load(REPO / "configs" / "vae_demo.py", [f"data.data_dir={data_dir}"])
        loop.train(vae_cfg, workdir / "vae", resume=True)
        vae = workdir / "vae"
    codec = Codec(vae)
    latents_dir = workdir / "latents"
    enc = latent_dataset.encode(codec, "synthetic_aroll/small", str(data_dir), str(latents_dir))
    cfg = config_lib.load(REPO / "configs" / "latent_demo.py", [
        f"data.data_dir={latents_dir}", f"data.dataset={enc['dataset']}",
        f"vae_checkpoint={vae}", *overrides])
    summary = loop.train(cfg, workdir / "dit", resume=True)

    gen = generate.Generator(workdir / "dit")
    truth, control = render_speech(SENTENCE), render_speech(CONTROL)
    settings = generate.Settings(steps=64, cfg_audio=4.0, seed=0)  # sync 0.38 vs 0.28 at 2
    video, shuffled = gen.many([truth["audio"], control["audio"]], [truth["caption"]] * 2,
                               [truth["video"][0]] * 2, settings)
    media.write_mp4(workdir / "demo.mp4", video, truth["audio"])
    media.write_mp4(workdir / "ground_truth.mp4", truth["video"], truth["audio"])
    Image.fromarray(strip([video, truth["video"]])).resize(
        (16 * 64 * 2, 2 * 64 * 2), Image.NEAREST).save(workdir / "strip.png")
    report = {
        "sentence": SENTENCE,
        "vae": str(vae),
        "vae_psnr_test": codec.report["psnr_test"],
        "vae_psnr_mouth_test": codec.report["psnr_mouth_test"],
        "dit_steps": summary["steps"],
        "dit_loss_first_last": [summary["losses"][0], summary["losses"][-1]]
        if summary["losses"] else None,
        "mouth_sync": mouth_sync(video, truth["mouth_open"], SPEAKER),
        "mouth_sync_shuffled_audio": mouth_sync(shuffled, truth["mouth_open"], SPEAKER),
        "mouth_sync_ground_truth_render": mouth_sync(truth["video"], truth["mouth_open"], SPEAKER),
        "closure_contrast": closure_contrast(video, truth["viseme"], SPEAKER),
        "closure_contrast_shuffled_audio": closure_contrast(shuffled, truth["viseme"], SPEAKER),
        "closure_contrast_ground_truth_render": closure_contrast(truth["video"], truth["viseme"],
                                                                 SPEAKER),
    }
    judged = evaluate.run(workdir / "dit", workdir / "evaluation", EVAL_CLIPS,
                          judge_checkpoint(workdir, data_dir), "synthetic_aroll/small",
                          str(data_dir), settings=settings)
    log.info("the sync judge on %d held-out clips:\n%s", EVAL_CLIPS, evaluate.report(judged))
    report["sync_judge"] = sync_summary(judged)
    (workdir / "summary.json").write_text(json.dumps(report, indent=1))
    return report


def tfds_sentences(data_dir) -> list[str]:
    import tensorflow_datasets as tfds

    src = tfds.data_source("synthetic_aroll/small", data_dir=str(data_dir))
    return [r["sentence"].decode() if isinstance(r["sentence"], bytes) else r["sentence"]
            for split in src for r in src[split]]
