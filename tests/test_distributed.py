"""Two processes joined by jax.distributed (gloo on localhost) train like one process."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from mirage_jax import config
from mirage_jax.data.pipeline import GrainSource
from mirage_jax.train.step import MODEL_KEYS
from conftest import REPO, xla_flags
from test_train import losses_for

# A silent video model without reference tokens: what is tested is the processes, and its
# step compiles in half the time of the full tiny model's.
ARGS = ["--config", str(REPO / "configs/tiny.py"), "--config.train.steps=4",
        "--config.train.ckpt_every=2", "--config.model.audio=False", "--config.model.ref=False"]


def _losses(workdir):
    return np.array([json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")])


def test_two_processes_match_one_through_a_resume(tmp_path, tiny_cfg, corpus_dir):
    """`launch/local.sh 2`: each process reads its own shard of the corpus, checkpoints, and
    resumes; the reference trains in this one process on 8 devices on the same global
    batches (host 0's rows, then host 1's). The resume starts from the step-2 checkpoint
    (the step-4 one is removed, as if the job had died before writing it): both processes
    restore their own data-iterator state, and steps 3 and 4 give the same losses again."""
    import shutil

    cfg = config.apply_overrides(tiny_cfg, ARGS[2:])
    hosts = [GrainSource(cfg, process_index=i, process_count=2) for i in range(2)]
    batches = []
    for step in range(4):
        parts = [h.batch(step) for h in hosts]
        batches.append({k: np.concatenate([p[k] for p in parts]) for k in MODEL_KEYS})
    reference, _ = losses_for(cfg, batches, jax.devices())

    args = [*ARGS, f"--config.data.data_dir={corpus_dir}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags(4)  # 2 x 4 = the same 8 devices
    env["BIN"] = f"{sys.executable} -m mirage_jax.cli"
    run = tmp_path / "two"

    def local_sh(*extra):
        proc = subprocess.run(["bash", "launch/local.sh", "2", args[1], str(run), *args[2:], *extra],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    assert "process 1 of 2, 4 local / 8 global devices" in local_sh()
    losses = _losses(run)
    assert len(losses) == 4                           # process 0 alone writes the metrics
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    assert (run / "checkpoints" / "4").is_dir()

    shutil.rmtree(run / "checkpoints" / "4")
    log = local_sh("--resume")
    assert "[0] " in log and "[1] " in log and log.count("resumed from step 2") == 2
    losses = _losses(run)
    assert len(losses) == 6                           # steps 3 and 4 ran twice
    np.testing.assert_allclose(losses[4:], reference[2:], rtol=1e-5)
    np.testing.assert_array_equal(losses[4:], losses[2:4])  # same processes: bitwise
    assert (run / "checkpoints" / "4").is_dir()


def test_failed_distributed_init_is_fatal(tmp_path):
    """A process that cannot reach its coordinator stops with an error, never trains alone."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "mirage_jax.cli", "train", "--coordinator", "localhost:1",
         "--num-processes", "2", "--process-id", "1", "--init-timeout", "5", "--workdir", str(tmp_path), *ARGS],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # Either our message (a Python error) or XLA's own abort of the process.
    assert ("jax.distributed.initialize failed" in proc.stderr
            or "Terminating process because the JAX distributed service" in proc.stderr)
    assert "compiled step" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
