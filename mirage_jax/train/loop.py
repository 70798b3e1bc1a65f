"""The training loop: sharded state, one compiled step, metrics, checkpoints.

Host side, so the devices never wait for Python: the step donates the state; step k's
metrics start copying to the host when computed and are read only after step k+1 is
dispatched (no implicit transfer anywhere: a test runs the loop under a transfer guard);
batch k+1 is read (grain prefetches in background threads) and sent to the devices while
step k runs; the compiled step is cached on disk (`train.compile_cache`), so a resumed run
skips the compile. SIGTERM/SIGINT (or a TPU preemption) end the run after the current step with its checkpoint saved; a
step whose loss or gradients are not finite changes nothing and is counted.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache as cc

from mirage_jax import sharding
from mirage_jax.data.pipeline import GrainSource
from mirage_jax.latents import Codec, report_batches, vae_report
from mirage_jax.model.dit import DTYPES
from mirage_jax.model.tokens import audio_frames, video_shape, video_tokens_per_second
from mirage_jax.plan import count_flops, model_step_flops
from mirage_jax.train import state as state_lib
from mirage_jax.train.checkpoint import Checkpointer, CheckpointSaveError  # noqa: F401
from mirage_jax.train.step import MODEL_KEYS, compile_step, trace_step

log = logging.getLogger("mirage_jax")


PEAK_REPS = 3  # timed matmuls for the measured peak: ~1.5 s at loop start on a 2-core CPU


def peak_flops(cfg) -> tuple[float, str]:
    """The MFU denominator, FLOP/s of one device, and where it came from: `train.peak_flops`,
    else `bench.matmul_rate` (the `bench train` measurement: fastest of PEAK_REPS
    PEAK_N^3 matmuls in the model's compute dtype on the first device)."""
    if cfg.train.peak_flops:
        return float(cfg.train.peak_flops), "train.peak_flops"
    from mirage_jax.bench import PEAK_N, matmul_rate  # here: bench imports this module

    n = PEAK_N
    rate = matmul_rate(n, n, n, DTYPES[cfg.model.dtype], reps=PEAK_REPS)
    return rate, f"{n}^3 {cfg.model.dtype} matmul, fastest of {PEAK_REPS}"


def step_model_flops(cfg, setup, abstract, traced) -> tuple[float | None, str]:
    """Model FLOPs of one step, all devices, as `mirage-jax bench train` and `plan` count them
    (`plan.model_step_flops`: matmuls and convolutions from the step's jaxpr, scan bodies
    times their length, no recomputation; XLA's `cost_analysis()` counts a scanned layer
    once), from the `traced` step itself unless it recomputes (remat, blockwise attention).
    (None, why) where they cannot be counted: the loop then logs no MFU."""
    try:
        flops = model_step_flops(cfg, setup, abstract, count_flops(traced.jaxpr))
    except Exception as e:  # noqa: BLE001 - a metric only: training goes on without it
        return None, f"{type(e).__name__}: {e}"
    if not flops > 0:
        return None, "the step has no matmul or convolution"
    return flops, ""


def use_compile_cache(cfg) -> str | None:
    """Points JAX's persistent compilation cache at `train.compile_cache` (before the first
    compile of the process; JAX_COMPILATION_CACHE_DIR, if set, wins). Returns the directory.

    Off for multi-process CPU runs: there, a process that loads the step from the cache and
    one that compiles it hang in their first gloo collective (measured with local.sh 2 and a
    resume)."""
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if env or not cfg.train.compile_cache:
        return env or None
    path = os.path.expanduser(cfg.train.compile_cache)
    if jax.config.jax_compilation_cache_dir != path:
        cc.set_cache_dir(path)
        cc.reset_cache()  # the cache is set up at a process's first compile; redo it here
    return path


def make_source(cfg):
    if cfg.data.source == "tfds":
        return GrainSource(cfg)
    raise ValueError(f"unknown data.source '{cfg.data.source}'")


def global_batch(local: dict, shard) -> dict:
    """This process's examples -> one global array per key, split over the data axes."""
    return {k: jax.make_array_from_process_local_data(shard, local[k]) for k in MODEL_KEYS}


def model_batch(local: dict, shard, codec=None) -> dict:
    """A process's batch as global arrays; with a codec (data.video='encode'), pixels are
    encoded to latents on the devices first."""
    batch = global_batch(local, shard)
    if codec is None:
        return batch
    return {k: jax.device_put(v, shard) for k, v in codec.latent_batch(batch).items()}


def tokens_per_example(cfg) -> int:
    """Sequence length of one example (for the VAE: video frames, so tokens/s is frames/s)."""
    d, p = cfg.data, cfg.model.patch
    if cfg.task in ("vae", "sync"):  # the sync judge: one pass per clip's frames
        return d.frames
    if cfg.task == "amdim":  # images per example
        return len(range(0, d.frames, cfg.amdim.frame_stride)) + int(cfg.amdim.use_ref)
    t, h, w, _ = video_shape(cfg)
    per_frame = (h // p) * (w // p)
    return t * per_frame + per_frame + audio_frames(cfg) + d.text_len


def vae_checkpoint_report(cfg, setup, state, batches, log) -> dict:
    """Latent statistics (over `batches`) and held-out PSNR of the EMA weights, saved with a
    VAE checkpoint."""
    t0 = time.perf_counter()
    model = nnx.merge(setup.graphdef, state["ema"])
    report = vae_report(cfg, model, batches)
    split = "".join(f", {k} {report[f'psnr_mouth_{k}_test']:.2f}" for k in ("closed", "open")
                    if f"psnr_mouth_{k}_test" in report)
    log.info(
        "step %d: held-out PSNR %.2f dB, mouth %.2f dB (first frame %.2f, the rest %.2f%s); "
        "latent std %s (%.1fs)", int(state["step"]), report["psnr_test"],
        report["psnr_mouth_test"], report["psnr_mouth_first_test"], report["psnr_mouth_rest_test"],
        split, np.round(report["std"], 3).tolist(), time.perf_counter() - t0,
    )
    return report


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps in a row); the message says where."""


class StopRequest:
    """Asks the loop to save and stop after the current step: SIGTERM or SIGINT in a single
    process; in a multi-process job, the preemption sync point of jax.distributed's
    preemption service, which catches the scheduler's SIGTERM itself and has every process
    stop at the same step (a save is collective: one process stopping alone would hang the
    others). A second signal acts as it would without this."""

    def __init__(self):
        self.signum, self._old = None, {}
        self.sync = jax.process_count() > 1
        if not self.sync and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._old[signum])

    def requested(self, step: int) -> str | None:
        """Why to stop after `step` ('SIGTERM', 'SIGINT', 'preemption'), or None."""
        if self.signum is not None:
            return signal.Signals(self.signum).name
        if self.sync:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return "preemption"
            except RuntimeError:  # jax_enable_preemption_service is off
                self.sync = False
        return None

    def close(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class BadSteps:
    """Counts the updates the step skipped for a non-finite loss or gradient (seen one step
    late, in the metrics); `train.max_bad_steps` in a row stop the run with the step and its
    examples named. `ids`: batch number -> the batch's record indices (this process's)."""

    def __init__(self, cfg, ids: dict):
        self.limit, self.ids = cfg.train.max_bad_steps, ids
        self.where = f"{cfg.data.dataset} split '{cfg.data.split}'"
        self.in_row = self.total = 0

    def check(self, step: int, values: dict) -> None:
        """`step` as in metrics.jsonl: the step that used batch `step - 1`."""
        index = self.ids.pop(step - 1, None)
        if not values.get("skipped"):
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        records = "?" if index is None else np.asarray(index).tolist()
        examples = f"{self.where} records {records}"
        log.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row, %d in this "
                    "run); batch: %s", step, values["loss"], values["grad_norm"], self.in_row,
                    self.total, examples)
        if self.limit and self.in_row >= self.limit:
            raise TrainingStopped(
                f"step {step}: loss or gradients not finite for {self.in_row} steps in a row "
                f"(train.max_bad_steps={self.limit}); the batch of step {step} holds {examples}"
            )


class Metrics:
    """TensorBoard events, a JSON-lines file (one line per step) and a progress bar.

    Written by process 0 only; the values are global (computed under the mesh) anyway.
    """

    def __init__(self, workdir: pathlib.Path, start: int, total: int):
        self.active = jax.process_index() == 0
        if self.active:
            # Imported here: tensorboardX imports torch when it is installed (2.2 s), which
            # the other processes of a multi-host run need not pay.
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tb"))
            self.lines = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
            self.bar = tqdm.tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def step(self, step: int, values: dict, log_now: bool):
        if not self.active:
            return
        values = {k: float(v) for k, v in values.items()}
        self.lines.write(json.dumps({"step": step, **values}) + "\n")
        self.lines.flush()
        self.bar.update(1)
        if log_now:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
            self.bar.set_postfix(
                loss=f"{values['loss']:.4f}", sps=f"{values.get('steps_per_s', 0):.2f}"
            )

    def close(self):
        if not self.active:
            return
        self.tb.close()
        self.lines.close()
        self.bar.close()


def train(cfg, workdir, resume: bool = False, devices=None) -> dict:
    """Trains `cfg` into `workdir`; returns a summary (first/last loss, steps, timings)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cache = use_compile_cache(cfg)
    peak, peak_from = peak_flops(cfg)  # before the data pipeline's threads start
    mesh = sharding.make_mesh(cfg.mesh, devices)
    setup = state_lib.setup(cfg, mesh)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.train.ckpt_every, cfg.train.keep,
                        on_error=cfg.train.on_save_error)
    latest = ckpt.latest_step()
    source = make_source(cfg)
    if resume and latest is not None:
        state = ckpt.restore(latest, setup.abstract, setup.shardings, source)
        log.info("resumed from step %d", latest)
    else:
        if latest is not None:
            raise FileExistsError(f"{ckpt.directory} already holds step {latest}; pass --resume")
        state = state_lib.init_state(cfg, setup)
        if cfg.init_from:  # stitching: restore what matches, keep the rest fresh
            from mirage_jax.train import stitch

            state, _ = stitch.init_from(cfg, setup, state, workdir)
    start = int(state["step"])
    shard = sharding.batch_sharding(mesh, cfg.sharding_rules)
    first = source.batch(start)
    abstract = {
        k: jax.ShapeDtypeStruct((cfg.data.global_batch,) + first[k].shape[1:], first[k].dtype)
        for k in MODEL_KEYS
    }
    if cfg.data.video == "encode":
        t, h, w, c = video_shape(cfg)
        abstract["video"] = jax.ShapeDtypeStruct((cfg.data.global_batch, t, h, w, c), jnp.float32)
        abstract["ref"] = jax.ShapeDtypeStruct((cfg.data.global_batch, h, w, c), jnp.float32)
    t0 = time.perf_counter()
    traced = trace_step(cfg, setup, abstract)
    step_fn = compile_step(cfg, setup, abstract, traced)
    compile_s = time.perf_counter() - t0
    mem = step_fn.memory_analysis()
    xla_flops = float(step_fn.cost_analysis().get("flops", 0.0))  # per device, scan bodies once
    log.info(
        "compiled step in %.1fs (cache %s): temp %.1f MiB, args %.1f MiB per device; "
        "XLA cost analysis %.3g FLOPs/device (a scanned layer counted once: not used for MFU)",
        compile_s, cache or "off", mem.temp_size_in_bytes / 2**20,
        mem.argument_size_in_bytes / 2**20, xla_flops,
    )
    t0 = time.perf_counter()
    flops, why = step_model_flops(cfg, setup, abstract, traced)
    device_flops = None if flops is None else flops / mesh.size  # the MFU numerator, per step
    if flops is None:
        log.warning("no MFU: the step's model FLOPs could not be counted (%s)", why)
    else:
        log.info("model FLOPs %.3g/step, %.3g/device (plan.model_step_flops, as bench train counts "
                 "them; %.1fs); MFU against %.3g FLOP/s/device (%s)", flops, device_flops,
                 time.perf_counter() - t0, peak, peak_from)
    n_params = sum(x.size for x in jax.tree.leaves(setup.abstract["params"]))
    log.info("%s parameters; mesh %s", f"{n_params:,}", dict(mesh.shape))
    if cfg.task == "dit":
        log.info("video stream: %s per example (%s), %.0f tokens per second of video",
                 video_shape(cfg), cfg.data.video, video_tokens_per_second(cfg))

    metrics = Metrics(workdir, start, cfg.train.steps)
    tokens = tokens_per_example(cfg) * cfg.data.global_batch
    pending, losses, stats_batches = None, [], None
    window = {"steps": 0, "t0": time.perf_counter()}
    codec = None
    if cfg.data.video == "encode":  # pixels from the pipeline, latents into the step
        codec = Codec(cfg.vae_checkpoint, mesh)
        codec.check(cfg)
    batch = model_batch(first, shard, codec)
    ids = {start: first.get("index")}
    bad, stop, stopped, step = BadSteps(cfg, ids), StopRequest(), None, start - 1

    def emit(pending):
        values = _emit(metrics, pending, cfg, device_flops, peak, tokens, window)
        losses.append(float(values["loss"]))
        bad.check(pending[0] + 1, values)

    try:
        with jax.set_mesh(mesh):
            for step in range(start, cfg.train.steps):
                state, out = step_fn(state, batch)
                for x in jax.tree.leaves(out):  # to the host as soon as computed, no waiting
                    x.copy_to_host_async()
                stopped = stop.requested(step + 1)
                last = step + 1 == cfg.train.steps or stopped is not None
                extra = None
                if cfg.task == "vae" and (last or ckpt.due(step + 1)):
                    stats_batches = stats_batches or report_batches(cfg)  # read once, when due
                    extra = {"latent_stats": vae_checkpoint_report(cfg, setup, state,
                                                                   stats_batches, log)}
                ckpt.save(step + 1, state, cfg, source, force=last, json_items=extra)
                if not last:
                    local = source.batch(step + 1)
                    ids[step + 1] = local.get("index")
                    batch = model_batch(local, shard, codec)  # overlaps the step
                if pending is not None:  # the previous step's metrics: one step late, no sync
                    emit(pending)
                pending = (step, out)
                if stopped:
                    break
            if pending is not None:
                jax.block_until_ready(pending[1])
                emit(pending)
    finally:
        stop.close()
        metrics.close()
        ckpt.close()
    if stopped:
        log.warning("%s: stopped after step %d; the latest checkpoint is step %s in %s; "
                    "continue with --resume", stopped, step + 1, ckpt.latest_step(),
                    ckpt.directory)
    return {
        "stopped": stopped,
        "last_step": step + 1,
        "steps": cfg.train.steps,
        "start": start,
        "losses": losses,
        "params": n_params,
        "flops_per_step": flops,  # model FLOPs, all devices (None: not countable, no MFU)
        "flops_per_device": device_flops,
        "xla_cost_flops": xla_flops,  # per device, XLA's count (scan bodies once)
        "peak_flops": peak,  # per device
        "state": state,
    }


def _emit(metrics, pending, cfg, flops, peak, tokens, window):
    """Logs one step's metrics; speed is averaged over the steps since the last log line.
    MFU: `flops` (model FLOPs per device and step; None: no MFU) * steps/s / `peak`."""
    step, out = pending
    values = jax.device_get(out)
    window["steps"] += 1
    dt = max(time.perf_counter() - window["t0"], 1e-9) / window["steps"]
    values.update(steps_per_s=1.0 / dt, tokens_per_s=tokens / dt)
    if flops is not None:
        values["mfu"] = flops / dt / peak
    log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
    metrics.step(step + 1, values, log_now)
    if log_now:
        window.update(steps=0, t0=time.perf_counter())
    return values
