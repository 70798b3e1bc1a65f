"""Reliability: signals, kill -9 during saves, non-finite steps, mesh changes, failed saves,
bad inputs to generate/prepare, and no pickle in the package.

The subprocess runs (signals, kill -9) are forked from one warm "zygote" process that has
imported the package once, with 1 CPU device: a restart then costs a restore and a cached
compile instead of importing jax, orbax, grain and TFDS again. Each child is a real
process running `mirage-jax train`, and is really killed.
"""

import ast
import errno
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time
import typing

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import soundfile as sf
from conftest import REPO, xla_flags

from mirage_jax import cli, config, sharding
from mirage_jax.data.pipeline import GrainSource
from mirage_jax.train import checkpoint as ckpt_lib
from mirage_jax.train import loop
from mirage_jax.train import state as state_lib

TINY = REPO / "configs" / "tiny.py"
STEPS = 20  # the subprocess runs: tiny model, batch 2, one device; ten kills take about 10 steps
# The training runs here test the loop, not the streams: they train the tiny config as a
# silent video model without reference tokens, whose step compiles in 4.7 s instead of 11 s.
RUN = [f"train.steps={STEPS}", "data.global_batch=2", "train.peak_flops=1e12",
       "model.audio=False", "model.ref=False"]

ZYGOTE = r"""
import json, logging, os, sys
import mirage_jax.cli as cli
import mirage_jax.train.loop  # noqa: F401  (the slow imports, once)
import tensorboardX  # noqa: F401  (imported by the loop's Metrics only when it starts)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd[0] == "wait":
        _, status = os.waitpid(cmd[1], 0)
        print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        fd = os.open(cmd[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        logging.basicConfig(force=True, level=logging.INFO, format="%(levelname)s %(message)s")
        code = 1
        try:
            code = cli.main(cmd[2:])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps(pid), flush=True)
"""


class Zygote:
    """Starts `mirage-jax train` children and reaps them (they are its children, not ours).
    The children share the persistent compilation cache `cache`, set by the config
    (`train.compile_cache`), not by the suite's JAX_COMPILATION_CACHE_DIR."""

    def __init__(self, data_dir, cache):
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env["XLA_FLAGS"] = xla_flags(1)
        self.cache = cache
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.args = ["train", "--config", str(TINY), *(f"--config.{a}" for a in RUN),
                     f"--config.data.data_dir={data_dir}", f"--config.train.compile_cache={cache}"]

    def _ask(self, cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, workdir, *extra) -> int:
        workdir.mkdir(parents=True, exist_ok=True)
        return self._ask(["run", str(workdir / "log.txt"), *self.args, "--workdir", str(workdir),
                          *extra])

    def wait(self, pid) -> int:
        return self._ask(["wait", pid])

    def run(self, workdir, *extra) -> int:
        return self.wait(self.start(workdir, *extra))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote(corpus_dir, tmp_path_factory):
    z = Zygote(corpus_dir, tmp_path_factory.mktemp("xla_cache"))
    yield z
    z.close()


def steps_logged(workdir) -> list[tuple[int, float]]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def wait_for_steps(workdir, n, timeout=300):
    deadline = time.time() + timeout
    while len(steps_logged(workdir)) < n:
        assert time.time() < deadline, f"no step {n} in {workdir}"
        time.sleep(0.02)


def complete_steps(workdir) -> list[int]:
    """Orbax renames a step's directory to its number only once everything is written."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def restore_latest(workdir, cfg, devices):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    setup = state_lib.setup(cfg, mesh)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", 1, 1, async_save=False)
    try:
        step = ckpt.latest_step()
        return step, jax.device_get(ckpt.restore(step, setup.abstract, setup.shardings))
    finally:
        ckpt.close()


def assert_same_tree(a, b):
    flat_a, flat_b = ckpt_lib.flat_paths(a), ckpt_lib.flat_paths(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)


@pytest.fixture(scope="module")
def straight(zygote, tmp_path_factory):
    """The uninterrupted run: its loss per step and its final state."""
    workdir = tmp_path_factory.mktemp("straight")
    assert zygote.run(workdir, f"--config.train.ckpt_every={STEPS}") == 0
    losses = dict(steps_logged(workdir))
    assert sorted(losses) == list(range(1, STEPS + 1))
    return workdir, losses


def small_cfg(corpus_dir, *extra):
    return config.load(TINY, [f"data.data_dir={corpus_dir}", *RUN, *extra])


# 1. SIGTERM / SIGINT -----------------------------------------------------------------------

def test_sigterm_and_sigint_save_and_the_resumed_run_continues_the_losses(
        zygote, straight, tmp_path):
    """Each signal saves the step it stopped after; the resumed runs continue the losses
    bitwise. The compiled step comes from the persistent cache (`train.compile_cache`): the
    first run (`straight`, the zygote's first child) wrote it, and this new run and its two
    resumes add nothing."""
    cached = sorted(p.name for p in zygote.cache.iterdir())
    assert cached and f"(cache {zygote.cache})" in (straight[0] / "log.txt").read_text()
    workdir = tmp_path / "run"
    args = ["--config.train.ckpt_every=100"]  # no regular save: the signal's save is the one
    stops = []
    for sig, code, extra in ((signal.SIGTERM, 143, ()), (signal.SIGINT, 130, ("--resume",))):
        before = len(steps_logged(workdir))
        pid = zygote.start(workdir, *args, *extra)
        wait_for_steps(workdir, before + 2)
        os.kill(pid, sig)
        assert zygote.wait(pid) == code
        stopped_at = steps_logged(workdir)[-1][0]
        assert stopped_at < STEPS, "the run ended before the signal"
        log = (workdir / "log.txt").read_text()
        assert f"{sig.name}: stopped after step {stopped_at}; the latest checkpoint is step " \
               f"{stopped_at}" in log
        assert f"stopped by {sig.name} after step {stopped_at}; continue with --resume" in log
        assert stopped_at in complete_steps(workdir)
        stops.append(stopped_at)
    assert zygote.run(workdir, *args, "--resume") == 0
    logged = steps_logged(workdir)
    # Every step exactly once (the stop saved the step it stopped after), bitwise the losses
    # of the uninterrupted run.
    assert [s for s, _ in logged] == list(range(1, STEPS + 1)), stops
    assert dict(logged) == straight[1]
    assert (workdir / "log.txt").read_text().count(f"(cache {zygote.cache})") == 3
    assert sorted(p.name for p in zygote.cache.iterdir()) == cached


def test_preemption_sync_point_stops_multi_process_runs(monkeypatch):
    """With several processes the preemption service decides (it owns SIGTERM): the loop asks
    its sync point every step, and installs no signal handler of its own."""
    from jax.experimental import multihost_utils

    asked = []

    def sync_point(step):
        asked.append(step)
        return step == 3

    monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", sync_point)
    handler = signal.getsignal(signal.SIGTERM)
    stop = loop.StopRequest()
    assert signal.getsignal(signal.SIGTERM) is handler
    assert [stop.requested(k) for k in (1, 2, 3)] == [None, None, "preemption"]
    assert asked == [1, 2, 3]

    def service_off(step):
        raise RuntimeError("Preemption sync manager has not been initialized.")

    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", service_off)
    stop = loop.StopRequest()
    assert stop.requested(1) is None and stop.sync is False  # asked once, then never again
    stop.close()


# 2. kill -9, ten times, during asynchronous saves ------------------------------------------

def test_ten_kill9_during_async_saves_end_with_the_uninterrupted_params(
        zygote, straight, tmp_path, corpus_dir):
    workdir = tmp_path / "run"
    args = ["--config.train.ckpt_every=1", "--config.train.keep=2"]  # a save always in flight
    rng = random.Random(0)
    in_flight, resumed = 0, []
    pid = zygote.start(workdir, *args)
    for kill in range(10):
        wait_for_steps(workdir, len(steps_logged(workdir)) + 1)  # this run is training
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        assert zygote.wait(pid) == -signal.SIGKILL, f"kill {kill} came after the last step"
        in_flight += any("tmp" in p.name for p in (workdir / "checkpoints").iterdir())
        resumed.append(complete_steps(workdir)[-1])  # what the restart must restore
        pid = zygote.start(workdir, *args, "--resume")
    assert zygote.wait(pid) == 0
    log = (workdir / "log.txt").read_text()
    assert [int(s) for s in re.findall(r"resumed from step (\d+)", log)] == resumed
    assert in_flight >= 5, f"only {in_flight} of 10 kills hit a save in flight"
    # Every logged loss (steps run twice included) is the uninterrupted run's.
    for step, loss in steps_logged(workdir):
        assert loss == straight[1][step], step
    cfg = small_cfg(corpus_dir)
    one = jax.devices()[:1]
    (step_a, a), (step_b, b) = restore_latest(workdir, cfg, one), restore_latest(straight[0], cfg,
                                                                                 one)
    assert step_a == step_b == STEPS
    assert_same_tree(a, b)
    # A finished workdir is not silently trained again from scratch.
    assert zygote.run(workdir, *args) == 2
    assert "pass --resume" in (workdir / "log.txt").read_text().splitlines()[-1]


# 3. non-finite loss or gradients ------------------------------------------------------------

class NaNSource(GrainSource):
    """The real pipeline, with NaN pixels in the batches of chosen steps."""

    bad: frozenset = frozenset()
    seen: typing.ClassVar[dict] = {}

    def batch(self, step):
        out = super().batch(step)
        NaNSource.seen[step + 1] = out["index"].tolist()  # metrics count steps from 1
        if step + 1 in self.bad:
            out["video"] = np.full_like(out["video"], np.nan)
        return out


def test_non_finite_steps_are_skipped_counted_and_k_in_a_row_stop(
        corpus_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(loop, "make_source", lambda cfg: NaNSource(cfg))
    cfg = small_cfg(corpus_dir, "train.steps=6", "train.ckpt_every=2", "train.max_bad_steps=3")
    one = jax.devices()[:1]
    NaNSource.bad = frozenset({3, 4})  # two in a row: skipped, training goes on
    out = loop.train(cfg, tmp_path / "a", devices=one)
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert [r["skipped"] for r in logged] == [0, 0, 1, 1, 0, 0]
    assert np.isnan(logged[2]["loss"]) and np.isfinite(logged[-1]["loss"])
    assert "step 4: loss nan, gradient norm nan: update skipped (2 in a row, 2 in this run)" \
        in caplog.text
    # The skipped steps changed nothing: the state after step 4 is the one after step 2.
    ckpt = ckpt_lib.Checkpointer(tmp_path / "a" / "checkpoints", 1, 3, async_save=False)
    setup = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh, one))
    s2, s4 = (jax.device_get(ckpt.restore(k, setup.abstract, setup.shardings)) for k in (2, 4))
    ckpt.close()
    assert int(s4["step"]) == 4
    for item in ("params", "opt_state", "ema"):
        assert_same_tree(s2[item], s4[item])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(out["state"])))

    NaNSource.bad = frozenset({2, 3, 4, 5})  # three in a row: stop, naming step 4 and its examples
    with pytest.raises(loop.TrainingStopped) as e:
        loop.train(cfg, tmp_path / "b", devices=one)
    assert str(e.value) == (
        f"step 4: loss or gradients not finite for 3 steps in a row (train.max_bad_steps=3); "
        f"the batch of step 4 holds synthetic_aroll/tiny split 'train' records "
        f"{NaNSource.seen[4]}")


# 4, 5. another mesh; a checkpoint that does not fit ----------------------------------------

@pytest.fixture(scope="module")
def fsdp_run(corpus_dir, tmp_path_factory):
    """A state built on 8 devices with fsdp=8, saved like a training run saves it."""
    workdir = tmp_path_factory.mktemp("fsdp")
    cfg = config.load(TINY, [f"data.data_dir={corpus_dir}", "mesh.data=1", "mesh.fsdp=8"])
    setup = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh))
    state = state_lib.init_state(cfg, setup)
    state["ema"] = jax.tree.map(lambda x: x * 0.5 + 1.0, state["ema"])  # differs from params
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", 1, 1)
    ckpt.save(1, state, cfg, force=True)
    ckpt.close()
    return workdir, cfg, jax.device_get(state)


@pytest.mark.parametrize("axes,n", [((2, 2), 4), ((1, 1), 1)])
def test_restore_onto_another_mesh_gives_identical_state(fsdp_run, axes, n):
    workdir, cfg, saved = fsdp_run
    kernel = saved["params"]["blocks"]["video"]["fc1"]["kernel"]
    cfg = config.apply_overrides(cfg, [f"mesh.data={axes[0]}", f"mesh.fsdp={axes[1]}"])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n])
    setup = state_lib.setup(cfg, mesh)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", 1, 1)
    state = ckpt.restore(1, setup.abstract, setup.shardings)
    ckpt.close()
    restored = state["params"]["blocks"]["video"]["fc1"]["kernel"]
    assert restored.sharding.mesh.size == n
    assert restored.addressable_shards[0].data.shape[1] == kernel.shape[1] // axes[1]
    assert_same_tree(jax.device_get(state), saved)


def test_checkpoint_that_does_not_fit_fails_before_training(fsdp_run, capsys):
    workdir = fsdp_run[0]
    rc = cli.main(["train", "--config", str(TINY), "--workdir", str(workdir), "--resume",
                   f"--config.data.data_dir={fsdp_run[1].data.data_dir}",
                   "--config.model.video_width=48", "--config.model.depth=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit the config" in err
    assert "shape differs: params/blocks/video/fc1/kernel checkpoint (2, 64, 256) vs model " \
           "(3, 48, 192)" in err
    assert "shape differs: opt_state/1/0/mu/video_in/kernel" in err  # optimizer state too
    assert not (workdir / "metrics.jsonl").exists()  # nothing trained


# 6. a failing write during a save ------------------------------------------------------------

def failing_json_writes(monkeypatch, step):
    """The config item of `step` fails to write, in the background thread, as a full disk."""
    write = ocp.JsonCheckpointHandler._save_fn

    async def save_fn(self, item, directory):
        if pathlib.Path(directory).parent.name.startswith(f"{step}.orbax-checkpoint-tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await write(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save_fn)


def test_failed_save_stops_or_continues_and_the_previous_checkpoint_restores(
        corpus_dir, tmp_path, monkeypatch, caplog):
    one = jax.devices()[:1]
    failing_json_writes(monkeypatch, 4)
    cfg = small_cfg(corpus_dir, "train.steps=6", "train.ckpt_every=2")
    with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
        loop.train(cfg, tmp_path / "stop", devices=one)
    assert "saving checkpoint step 4 in" in str(e.value)
    assert "No space left on device" in str(e.value)
    assert "the latest complete checkpoint is step 2" in str(e.value)
    assert complete_steps(tmp_path / "stop")[-1] == 2
    assert len(steps_logged(tmp_path / "stop")) < 6

    cont = config.apply_overrides(cfg, ["train.on_save_error=continue"])
    out = loop.train(cont, tmp_path / "go", devices=one)
    assert len(out["losses"]) == 6 and complete_steps(tmp_path / "go")[-1] == 6
    assert 4 not in complete_steps(tmp_path / "go")
    assert "training continues (train.on_save_error=continue)" in caplog.text
    # The checkpoint before the failure restores, and equals the stopped run's.
    monkeypatch.undo()
    ckpt = ckpt_lib.Checkpointer(tmp_path / "go" / "checkpoints", 1, 3, async_save=False)
    setup = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh, one))
    a = jax.device_get(ckpt.restore(2, setup.abstract, setup.shardings))
    ckpt.close()
    step, b = restore_latest(tmp_path / "stop", cfg, one)
    assert step == 2
    assert_same_tree(a, b)


@pytest.mark.parametrize("error", [loop.TrainingStopped, ckpt_lib.CheckpointSaveError])
def test_cli_reports_a_stopped_run_with_exit_1_and_no_traceback(error, monkeypatch, capsys):
    def train(*args, **kwargs):
        raise error("step 4: the reason")

    monkeypatch.setattr(loop, "train", train)
    assert cli.main(["train", "--config", str(TINY), "--workdir", "unused"]) == 1
    assert capsys.readouterr().err == "mirage-jax: error: training stopped: step 4: the reason\n"


# 7. bad inputs to generate and prepare ------------------------------------------------------

def wav(path, seconds, rate=16000, channels=1, value=None):
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    if value is not None:
        x[len(x) // 2] = value
    sf.write(path, np.stack([x] * channels, 1).astype(np.float32), rate, subtype="FLOAT")
    return path


GENERATE_ERRORS = {
    "nan": ("in.wav", "in.wav: audio contains NaN or Inf samples"),
    "ten_minutes": ("in.wav", "in.wav: 600.0 s of speech is over the 300 s limit"),
    "truncated_mp4": ("in.mp4", "in.mp4: not a readable audio file"),
    "text_as_wav": ("in.wav", "in.wav: not a readable audio file"),
    "empty": ("in.wav", "in.wav: audio is empty"),
}


@pytest.mark.parametrize("case", GENERATE_ERRORS)
def test_generate_bad_audio_is_named_with_exit_2_and_no_file(case, fsdp_run, tmp_path, capsys):
    from test_media import make_av, squares, tone

    name, msg = GENERATE_ERRORS[case]
    audio, out = tmp_path / name, tmp_path / "out.mp4"
    if case == "nan":
        wav(audio, 1.0, value=np.nan)
    elif case == "ten_minutes":
        wav(audio, 600.0)
    elif case == "truncated_mp4":
        make_av(tmp_path / "full.mp4", squares(50), tone(440, 2.0, 48000, channels=2))
        data = (tmp_path / "full.mp4").read_bytes()
        audio.write_bytes(data[: len(data) // 2])
    elif case == "text_as_wav":
        audio.write_text("just some text\n" * 50)
    elif case == "empty":
        sf.write(audio, np.zeros((0, 2), np.float32), 48000)
    rc = cli.main(["generate", "--checkpoint", str(fsdp_run[0]), "--audio", str(audio),
                   "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert msg in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))) == []


def test_generate_short_and_48k_stereo_give_the_right_lengths(fsdp_run, tmp_path):
    from mirage_jax import media

    wav(tmp_path / "short.wav", 0.1)  # 2.5 frames of speech
    wav(tmp_path / "stereo.wav", 0.7, rate=48000, channels=2)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"{tmp_path / 'short.mp4'}\t{tmp_path / 'short.wav'}\n"
                    f"{tmp_path / 'stereo.mp4'}\t{tmp_path / 'stereo.wav'}\n")
    rc = cli.main(["generate", "--checkpoint", str(fsdp_run[0]), "--batch", str(jobs),
                   "--steps", "1"])
    assert rc == 0
    for name, seconds in (("short", 0.1), ("stereo", 0.7)):
        frames, audio = media.read_video(tmp_path / f"{name}.mp4")
        assert len(frames) == round(seconds * 25), name
        assert abs(len(audio) - seconds * 16000) <= 640, name


def test_prepare_folder_of_bad_files_skips_counts_and_names_them(tmp_path, capsys):
    from test_aroll_folder import make_av, scene

    src = tmp_path / "videos"
    src.mkdir()
    make_av(src / "good.mp4", scene(30, (200, 30, 30)))  # 48 kHz stereo sound
    make_av(src / "mute.mp4", scene(30, (90, 90, 90)), audio=False)
    data = (src / "good.mp4").read_bytes()
    (src / "cut.mp4").write_bytes(data[: len(data) // 2])
    (src / "text.mp4").write_text("a text file renamed .mp4\n")
    rc = cli.main(["prepare", "--dataset", "aroll_folder", "--manual_dir", str(src),
                   "--data_dir", str(tmp_path / "data"), "--size", "16", "--frames", "12"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 clips from 1 files; skipped 3" in out
    for name, why in (("mute.mp4", "no audio stream"), ("cut.mp4", "cut.mp4"),
                      ("text.mp4", "text.mp4")):
        assert any(name in line and why in line for line in out.splitlines() if "skipped" in line)
    # Nothing usable at all: exit 2, the files named, and no dataset left behind.
    (src / "good.mp4").unlink()
    rc = cli.main(["prepare", "--dataset", "aroll_folder", "--manual_dir", str(src),
                   "--data_dir", str(tmp_path / "data2"), "--size", "16", "--frames", "12"])
    err = capsys.readouterr().err
    assert rc == 2 and "skipped: cut.mp4, mute.mp4, text.mp4" in err and "Traceback" not in err
    assert not list((tmp_path / "data2").rglob("dataset_info.json"))


# 8. no pickle in any load path --------------------------------------------------------------

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal"}


def pickle_uses(source: str) -> list[str]:
    """Lines that import a pickle-based module or call a loader that may unpickle."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            if any((n or "").split(".")[0] in PICKLE_MODULES for n in names):
                found.append(f"{node.lineno}: import {names}")
        elif isinstance(node, ast.Call):
            kw = {k.arg: k.value for k in node.keywords}
            true = lambda k: isinstance(kw.get(k), ast.Constant) and kw[k].value is True  # noqa
            name = ast.unparse(node.func)
            if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant)
                                             and kw["allow_pickle"].value is False):
                found.append(f"{node.lineno}: {name}(allow_pickle=...)")
            torch_like = name.endswith("torch.load") or name == "load" and "weights_only" in kw
            if torch_like and not true("weights_only"):
                found.append(f"{node.lineno}: {name} without weights_only=True")
            if name.endswith(("read_pickle", "to_pickle")):
                found.append(f"{node.lineno}: {name}")
    return found


def test_no_pickle_in_the_package():
    # The scanner itself catches what it should.
    assert len(pickle_uses("import pickle\nfrom dill import loads\n"
                           "np.load(f, allow_pickle=True)\ntorch.load(f)\n"
                           "torch.load(f, weights_only=False)\n")) == 5
    assert pickle_uses("np.load(f)\nnp.load(f, allow_pickle=False)\n"
                       "torch.load(f, weights_only=True)\n") == []
    files = sorted((REPO / "mirage_jax").rglob("*.py"))
    assert len(files) > 20
    problems = {str(f.relative_to(REPO)): p for f in files if (p := pickle_uses(f.read_text()))}
    assert problems == {}
