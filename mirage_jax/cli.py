"""`mirage-jax` command line: one entry point, one subcommand per job.

mirage-jax prepare --dataset synthetic_aroll/small --data_dir DATA
mirage-jax train --config configs/tiny.py --config.model.depth=4 --workdir DIR [--resume]
mirage-jax encode --vae VAE_RUN --dataset synthetic_aroll/small --data_dir DATA
mirage-jax generate --checkpoint DIT_RUN --text "Hello there." --out hello.mp4
mirage-jax export --checkpoint VAE_RUN --out vae_export [--no-ema] [--dtype bfloat16]
mirage-jax import-torch vae_export --out VAE_RUN_AGAIN
mirage-jax bench data --config configs/demo.py
mirage-jax bench train --config configs/demo.py [--steps 5] [--rounds 3] [--out bench.json]
mirage-jax bench attention --config configs/demo.py
mirage-jax probe --checkpoint AMDIM_RUN --data_dir DATA --out probe.json
mirage-jax sync-calibrate --checkpoint SYNC_RUN --data_dir DATA --out calibration.json
mirage-jax evaluate --checkpoint DIT_RUN --judge SYNC_RUN --num_examples 32 --out eval/
mirage-jax plan --config configs/mirage_10b.py --mesh fsdp=64 --chips v5p,h100
mirage-jax demo  [--workdir demo_out]
mirage-jax stitch-experiment --data_dir DATA [--config configs/latent_demo.py] [--steps 4000]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mirage_jax import config as config_lib


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """`--config.a.b=v` (or `--config.a.b v`) go to the config; the rest to argparse."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config.") and "=" not in arg:
            if i + 1 >= len(argv):
                raise config_lib.ConfigError(f"override '{arg}' has no value")
            overrides.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        (overrides if arg.startswith("--config.") else rest).append(arg)
        i += 1
    return rest, overrides


def add_distributed_args(p) -> None:
    """The flags `init_distributed` reads, for every command that runs on several processes."""
    p.add_argument(
        "--distributed", action="store_true", help="jax.distributed from the cluster (TPU, SLURM)"
    )
    p.add_argument("--coordinator", help="host:port of process 0 (explicit multi-process)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--init-timeout", type=int, default=300, help="seconds to wait for peers")


def init_distributed(args) -> None:
    """Joins the multi-process job, or fails: a host that silently trains alone wastes a pod."""
    if not (args.distributed or args.coordinator):
        return
    import jax

    kwargs = {}
    if args.coordinator:
        kwargs = dict(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=args.init_timeout,
        )
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - any failure here must stop the job
        raise SystemExit(f"mirage-jax: error: jax.distributed.initialize failed: {e}") from e
    logging.getLogger("mirage_jax").info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _train(args, overrides):
    from mirage_jax.train import loop

    init_distributed(args)

    cfg = config_lib.load(args.config, overrides)
    try:
        summary = loop.train(cfg, args.workdir, resume=args.resume)
    except (loop.TrainingStopped, loop.CheckpointSaveError) as e:  # said why: no traceback
        print(f"mirage-jax: error: training stopped: {e}", file=sys.stderr)
        return 1
    if summary["stopped"]:  # a signal or a preemption: saved, resumable
        print(f"stopped by {summary['stopped']} after step {summary['last_step']}; "
              f"continue with --resume")
        return 130 if summary["stopped"] == "SIGINT" else 143
    losses = summary["losses"]
    if losses:
        print(
            f"trained steps {summary['start']}..{summary['steps']}: "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; checkpoints in {args.workdir}/checkpoints"
        )
    return 0


def _prepare(args, overrides):
    name, _, variant = args.dataset.partition("/")
    if name == "synthetic_aroll":
        from mirage_jax.data import synthetic_aroll

        builder = synthetic_aroll.prepare(
            variant or "small", args.data_dir, args.num_clips,
            size=args.size, frames=args.frames, workers=args.workers,
        )
        print(f"prepared {builder.info.full_name} in {args.data_dir}: "
              + ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items()))
    elif name == "aroll_folder":
        from mirage_jax.data import aroll_folder

        if not args.manual_dir:
            raise config_lib.ConfigError("aroll_folder needs --manual_dir (a folder of videos)")
        summary = aroll_folder.prepare(
            args.manual_dir, args.data_dir, size=args.size or 64, clip_frames=args.frames or 50
        )
        print(f"prepared aroll_folder/{summary.get('name', '')} in {args.data_dir}: "
              f"{summary.get('clips')} clips from {summary.get('files_used')} files; "
              f"skipped {len(summary.get('skipped', []))}")
        for item in summary.get("skipped", []):
            print(f"  skipped {item}")
    else:
        raise config_lib.ConfigError(
            f"unknown dataset '{args.dataset}' (synthetic_aroll/<config> or aroll_folder)"
        )
    return 0


def _encode(args, overrides):
    """Caches a dataset's VAE latents (and audio features) as a new ArrayRecord dataset."""
    from mirage_jax.data import latent_dataset
    from mirage_jax.latents import Codec

    codec = Codec(args.vae)
    summary = latent_dataset.encode(
        codec, args.dataset, args.data_dir, args.out or args.data_dir,
        audio_features=args.audio_features, batch=args.batch,
    )
    rep = codec.report
    print(f"encoded {args.dataset} with the VAE at {args.vae} (step {codec.step}; held-out PSNR "
          f"{rep['psnr_test']:.2f} dB, mouth {rep['psnr_mouth_test']:.2f} dB): "
          f"{summary['dataset']} in {summary['data_dir']}, "
          + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()))
    print(f"train on it with --config.data.video=latents --config.data.dataset={summary['dataset']}"
          f" --config.data.data_dir={summary['data_dir']}")
    return 0


def _generate(args, overrides):
    """Speech (a file, or text through espeak-ng) -> mp4 of the speaker, with the speech."""
    from mirage_jax import generate

    settings = generate.Settings(
        steps=args.steps, cfg_audio=args.cfg_audio, cfg_text=args.cfg_text, cfg_ref=args.cfg_ref,
        cosine=args.cosine, sampler=args.sampler, seed=args.seed, overlap=args.overlap,
        max_seconds=args.max_seconds,
    )
    if args.batch:
        jobs = generate.read_list(args.batch)
    elif args.out:
        jobs = [dict(out=args.out, audio=args.audio, text=args.text, voice=args.voice,
                     prompt=args.prompt, ref=args.ref)]
    else:
        raise config_lib.ConfigError("give --out OUT.mp4 (or --batch LIST.txt)")
    gen = generate.Generator(args.checkpoint)
    for path in generate.generate_files(gen, jobs, settings):
        print(f"wrote {path}")
    return 0


def _export(args, overrides):
    from mirage_jax import export

    path = export.save(args.checkpoint, args.out, args.ema, args.dtype, args.max_shard_mb)
    files = sorted(path.glob("*.safetensors"))
    print(f"wrote {path}: config.json and {len(files)} safetensors file(s), "
          f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB")
    return 0


def _import_torch(args, overrides):
    from mirage_jax import export

    print(f"wrote {export.import_torch(args.directory, args.out)}")
    return 0


def _bench(args, overrides):
    from mirage_jax import bench

    cfg = config_lib.load(args.config, overrides)
    if args.what == "data":
        r = bench.bench_data_vs_step(cfg, seconds=args.seconds)
        print(f"pipeline {r['pipeline_examples_per_s']:.1f} examples/s ({r['workers']} workers) vs "
              f"train step {r['train_step_examples_per_s']:.1f} examples/s: "
              f"ratio {r['ratio']:.2f}")
    elif args.what == "attention":
        r = bench.bench_attention(cfg, reps=args.steps, rounds=args.rounds, use_torch=args.torch)
        print(bench.report_attention(r))
    else:
        r = bench.bench_train(cfg, steps=args.steps, rounds=args.rounds, use_torch=args.torch,
                              compile_backend="inductor" if args.compile else None)
        print(bench.report_train(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "overrides": overrides, **r}, f, indent=1)
    return 0


def _probe(args, overrides):
    """Linear probes (viseme, speaker) on a trained AMDIM's frozen features (amdim/probe.py)."""
    from mirage_jax.amdim import probe

    result = probe.run(args.checkpoint, args.dataset, args.data_dir, args.train_stride,
                       args.test_stride, args.max_clips, step=args.step,
                       supervised_steps=args.supervised_steps)
    probe.write(result, args.out)
    print(f"probe accuracy on {result['test_frames']} held-out frames -> {args.out}")
    for label, row in result["accuracy"].items():
        print(f"  {label:8s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return 0


def _sync_calibrate(args, overrides):
    """The sync judge on held-out real clips: Sync-C/D for true, shifted and other audio,
    offset accuracy, Frechet and viseme-probe references (amdim/calibrate.py)."""
    from mirage_jax.amdim import calibrate

    shifts = tuple(int(s) for s in args.shifts.split(",") if s.strip())
    result = calibrate.calibrate(args.checkpoint, args.dataset, args.data_dir, args.split,
                                 shifts, args.train_clips, args.max_clips)
    calibrate.write(result, args.out)
    print(f"calibration of {result['clips']} {args.split} clips -> {args.out}")
    return 0


def _evaluate(args, overrides):
    """Generated vs real vs shuffled-audio clips under the sync judge, sharded over processes
    and devices: metrics.json and plots (mirage_jax/evaluate.py)."""
    from mirage_jax import evaluate, generate

    init_distributed(args)
    settings = generate.Settings(steps=args.steps, cfg_audio=args.cfg_audio,
                                 cfg_text=args.cfg_text, cfg_ref=args.cfg_ref, seed=args.seed)
    r = evaluate.run(args.checkpoint, args.out, args.num_examples, args.judge, args.dataset,
                     args.data_dir, args.split, args.batch, settings, args.probe_clips)
    if r is not None:
        print(evaluate.report(r))
        print(f"evaluate: {args.out}/metrics.json, " + ", ".join(r["plots"]))
    return 0


def _plan(args, overrides):
    """The train step AOT-compiled on simulated devices: memory and time per chip (plan.py)."""
    from mirage_jax import plan

    sizes = plan.parse_mesh(args.mesh)
    chips = [c.strip().lower() for c in args.chips.split(",") if c.strip()]
    unknown = sorted(set(chips) - set(plan.CHIPS))
    if unknown:
        raise ValueError(f"unknown chips {unknown}; known: {', '.join(plan.CHIPS)}")
    cfg = config_lib.load(args.config, [*overrides, *(f"mesh.{a}={n}" for a, n in sizes.items())])
    r = plan.plan(cfg, chips, args.step_time)
    print(plan.report(r, args.step_time))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


def _demo(args, overrides):
    """The main job: corpus -> VAE -> cached latents -> DiT -> generated mp4 (mirage_jax/demo.py)."""
    from mirage_jax import demo

    report = demo.run(args.workdir, overrides, args.data_dir, args.vae)
    print(json.dumps(report, indent=1))
    print(f"demo: {args.workdir}/demo.mp4, ground_truth.mp4, strip.png, summary.json")
    return 0


def _stitch_experiment(args, overrides):
    """Audio model from scratch vs stitched into a silent model (mirage_jax/stitch_experiment.py)."""
    from mirage_jax import stitch_experiment

    result = stitch_experiment.run(args.workdir, args.data_dir, args.config, args.steps,
                                   args.every, args.warmup_new, args.clips, args.sample_steps,
                                   args.cfg_audio, overrides)
    last = {k: result["curves"][k]["eval"][-1] for k in ("scratch", "stitched")}
    print(json.dumps({"ceilings": result["ceilings"], "last": last}, indent=1))
    print(f"stitch-experiment: {args.workdir}/stitch_experiment.png, stitch_experiment.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="mirage-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model from a config file")
    p.add_argument("--config", required=True, help="configs/*.py with get_config()")
    p.add_argument("--workdir", required=True)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    add_distributed_args(p)
    p.set_defaults(run=_train)
    p = sub.add_parser("prepare", help="build a dataset as ArrayRecord shards")
    p.add_argument("--dataset", required=True, help="synthetic_aroll/<tiny|small|large> or aroll_folder")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", required=True)
    p.add_argument("--manual_dir", "--manual-dir", dest="manual_dir", help="videos for aroll_folder")
    p.add_argument("--num_clips", "--num-clips", dest="num_clips", type=int)
    p.add_argument("--size", type=int, help="frame side in pixels")
    p.add_argument("--frames", type=int, help="clip length in frames (25 fps)")
    p.add_argument("--workers", type=int, help="generator processes (synthetic_aroll)")
    p.set_defaults(run=_prepare)
    p = sub.add_parser("encode", help="cache a dataset's VAE latents for the DiT")
    p.add_argument("--vae", required=True, help="workdir (or checkpoints dir) of a VAE run")
    p.add_argument("--dataset", required=True, help="pixel dataset, e.g. synthetic_aroll/small")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", required=True)
    p.add_argument("--out", help="data_dir for the latents (default: --data_dir)")
    p.add_argument("--audio-features", type=int, default=32, help="log-mel bins per frame")
    p.add_argument("--batch", type=int, default=8, help="clips encoded at once")
    p.set_defaults(run=_encode)
    p = sub.add_parser("generate", help="video of a speaker from speech (a file or text)")
    p.add_argument("--checkpoint", required=True, help="workdir (or checkpoints dir) of a DiT run")
    p.add_argument("--audio", help="speech file (wav, mp3, m4a, flac, ...; any rate)")
    p.add_argument("--text", help="text to speak with espeak-ng instead of --audio")
    p.add_argument("--voice", default="en-us", help="espeak voice for --text (woman, man, ...)")
    p.add_argument("--prompt", default="", help="caption of the speaker and scene")
    p.add_argument("--ref", help="reference image of the speaker")
    p.add_argument("--steps", type=int, default=64, help="sampling steps per window")
    p.add_argument("--cfg-audio", type=float, default=2.0, help="audio guidance scale")
    p.add_argument("--cfg-text", type=float, default=1.0, help="text guidance scale")
    p.add_argument("--cfg-ref", type=float, default=1.0, help="reference-image guidance scale")
    p.add_argument("--cosine", action="store_true", help="cosine-anneal the guidance scales")
    p.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    p.add_argument("--overlap", type=int, default=-1, help="frames (latent frames on latents) carried between windows; -1: a quarter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="refuse longer speech before sampling (0: no limit)")
    p.add_argument("--out", help="output .mp4")
    p.add_argument("--batch", help="many jobs, one per line: OUT.mp4<TAB>AUDIO or text:...")
    p.set_defaults(run=_generate)
    p = sub.add_parser("export", help="a run's weights (PyTorch layout, safetensors) and config")
    p.add_argument("--checkpoint", required=True, help="workdir (or checkpoints dir) of a run")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="EMA weights (default) or, with --no-ema, the raw parameters")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-shard-mb", type=float, default=4096.0,
                   help="split into several files with an index above this size")
    p.set_defaults(run=_export)
    p = sub.add_parser("import-torch", help="an exported directory back into an Orbax run")
    p.add_argument("directory", help="written by `mirage-jax export`")
    p.add_argument("--out", required=True, help="workdir of the new run")
    p.set_defaults(run=_import_torch)
    p = sub.add_parser("bench", help="throughput as ratios measured in one run")
    p.add_argument("what", choices=["data", "attention", "train"])
    p.add_argument("--config", required=True)
    p.add_argument("--seconds", type=float, default=10.0, help="data: seconds of the pipeline")
    p.add_argument("--steps", type=int, default=5, help="train: timed steps per round")
    p.add_argument("--rounds", type=int, default=3,
                   help="train: rounds, each variant taking its turn in every round")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                   help="train: the same step in PyTorch (skipped if torch is not installed)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="train: also the torch.compile'd step")
    p.add_argument("--out", help="also write the figures to this JSON file")
    p.set_defaults(run=_bench)
    p = sub.add_parser("probe", help="linear probes on a trained AMDIM encoder's features")
    p.add_argument("--checkpoint", required=True, help="workdir (or checkpoints dir) of a run")
    p.add_argument("--dataset", help="default: the run's data.dataset")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", help="default: the run's")
    p.add_argument("--train-stride", type=int, default=5, help="every n-th frame of train clips")
    p.add_argument("--test-stride", type=int, default=1, help="every n-th frame of test clips")
    p.add_argument("--max-clips", type=int, default=0, help="clips per split (0: all)")
    p.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    p.add_argument("--supervised-steps", type=int, default=0,
                   help="also probe the encoder trained this many steps on the visemes")
    p.add_argument("--out", required=True, help="the JSON report")
    p.set_defaults(run=_probe)
    p = sub.add_parser("sync-calibrate", help="the sync judge's metrics on held-out real clips")
    p.add_argument("--checkpoint", required=True, help="workdir (or checkpoints dir) of a run")
    p.add_argument("--dataset", help="default: the run's data.dataset")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", help="default: the run's")
    p.add_argument("--split", default="test", help="the held-out clips")
    p.add_argument("--shifts", default="-10,-7,-5,5,7,10", help="audio shifts in frames")
    p.add_argument("--train-clips", type=int, default=160, help="train clips for references")
    p.add_argument("--max-clips", type=int, default=0, help="held-out clips (0: all)")
    p.add_argument("--out", required=True, help="the JSON report")
    p.set_defaults(run=_sync_calibrate)
    p = sub.add_parser("evaluate", help="a DiT's clips vs real and shuffled under the sync judge")
    p.add_argument("--checkpoint", required=True, help="workdir (or checkpoints dir) of a DiT run")
    p.add_argument("--judge", default=None, help="sync judge run or export (default: the "
                   "shipped demo_assets/sync_judge)")
    p.add_argument("--dataset", help="pixel corpus (default: the judge's data.dataset)")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", help="default: the judge's")
    p.add_argument("--split", default="test", help="the held-out clips")
    p.add_argument("--num_examples", "--num-examples", dest="num_examples", type=int,
                   required=True, help="the first N clips of the split")
    p.add_argument("--out", required=True, help="directory for metrics.json and the plots")
    p.add_argument("--batch", type=int, default=16, help="clips per sampling run, per process")
    p.add_argument("--steps", type=int, default=64, help="sampling steps per window")
    p.add_argument("--cfg-audio", type=float, default=4.0, help="audio guidance (the demo's)")
    p.add_argument("--cfg-text", type=float, default=1.0)
    p.add_argument("--cfg-ref", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-clips", type=int, default=160,
                   help="train clips for the viseme probe and the Frechet reference")
    add_distributed_args(p)
    p.set_defaults(run=_evaluate)
    p = sub.add_parser("plan", help="per-device memory and step time of a config on a mesh")
    p.add_argument("--config", required=True)
    p.add_argument("--mesh", required=True, help="data=A,fsdp=B,tensor=C,sequence=D (unnamed: 1)")
    p.add_argument("--chips", default="v5e,v5p,v6e,h100,h200", help="comma-separated")
    p.add_argument("--step-time", type=float, default=0.0, help="seconds: print the MFU it needs")
    p.add_argument("--json", help="also write the figures to this file")
    p.set_defaults(run=_plan)
    p = sub.add_parser("demo", help="the README's main job on the built-in data")
    p.add_argument("--workdir", default="demo_out")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", help="default: WORKDIR/data")
    p.add_argument("--vae", help="VAE run or export (default: the shipped demo weights)")
    p.set_defaults(run=_demo)
    p = sub.add_parser("stitch-experiment",
                       help="audio model from scratch vs stitched into a silent model")
    p.add_argument("--workdir", default="stitch_out")
    p.add_argument("--config", help="the audio DiT config (default configs/latent_demo.py; "
                   "its silent twin: model.audio=False)")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default="data_dir",
                   help="the pixel corpus (a latent config's cache is encoded from it)")
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps per arm")
    p.add_argument("--every", type=int, default=500, help="checkpoint and evaluate every N")
    p.add_argument("--warmup_new", type=int, default=200, help="train.warmup_new_steps")
    p.add_argument("--clips", type=int, default=16, help="held-out clips evaluated")
    p.add_argument("--sample_steps", type=int, default=32, help="Euler steps per video")
    p.add_argument("--cfg_audio", type=float, default=4.0, help="audio guidance scale")
    p.set_defaults(run=_stitch_experiment)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        rest, overrides = _split_overrides(argv)
        args = parser.parse_args(rest)
        return args.run(args, overrides)
    except (config_lib.ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"mirage-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
