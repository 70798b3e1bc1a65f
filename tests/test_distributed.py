"""Two processes joined by jax.distributed (gloo on localhost) train like one process."""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO

ARGS = ["--config", str(REPO / "configs/tiny.py"), "--config.train.steps=4",
        "--config.train.ckpt_every=2"]


def _losses(workdir):
    return np.array([json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")])


def test_two_processes_match_one(tmp_path, corpus_dir):
    args = [*ARGS, f"--config.data.data_dir={corpus_dir}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    one = subprocess.run(
        [sys.executable, "-m", "mirage_jax.cli", "train", "--workdir", str(tmp_path / "one"), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # 2 x 4 = the same 8 devices
    env["BIN"] = f"{sys.executable} -m mirage_jax.cli"
    two = subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2", args[1], str(tmp_path / "two"), *args[2:]],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "process 1 of 2, 4 local / 8 global devices" in two.stderr
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4                      # process 0 alone writes the metrics
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "4").is_dir()


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
