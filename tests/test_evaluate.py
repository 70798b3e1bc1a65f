"""`mirage-jax evaluate`: a tiny DiT and a small sync judge trained on the tiny corpus,
evaluated in one process (8 devices) and in two (4 devices each, jax.distributed over gloo)
with the same numbers clip by clip."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, xla_flags

from mirage_jax import cli, evaluate

N = 8
GROUPS = ("generated", "real", "shuffled_real", "shuffled_generated")  # a pixel DiT: no VAE


@pytest.fixture(scope="module")
def runs(tiny_dit_run, sync_judge_run, tmp_path_factory):
    """The DiT (3 steps of configs/tiny.py) and the judge (60 steps, on 16x16 clips of 12
    frames) that conftest.py trains once for the session; outputs go to a directory here."""
    return {"dit": tiny_dit_run, "judge": sync_judge_run[1],
            "out": tmp_path_factory.mktemp("evaluate")}


def _args(runs, corpus_dir, out):
    return ["evaluate", "--checkpoint", str(runs["dit"]), "--judge", str(runs["judge"]),
            "--dataset", "synthetic_aroll/tiny", "--data_dir", str(corpus_dir),
            "--num_examples", str(N), "--steps", "2", "--batch", "8", "--probe-clips", "16",
            "--out", str(out)]


@pytest.fixture(scope="module")
def one_process(runs, corpus_dir):
    out = runs["out"] / "one"
    assert cli.main(_args(runs, corpus_dir, out)) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_shard_covers_every_example_once():
    for n, count in ((8, 2), (5, 2), (7, 3), (4, 4)):
        parts = [evaluate.shard(n, i, count) for i in range(count)]
        assert len({len(p) for p in parts}) == 1
        ids = np.concatenate(parts)
        assert sorted(ids[ids >= 0].tolist()) == list(range(n))
    with pytest.raises(ValueError, match="fewer than"):
        evaluate.shard(1, 0, 2)


def test_metrics_json_and_plots(one_process):
    out, r = one_process
    assert r["num_examples"] == N and r["processes"] == 1 and r["devices"] == 8
    assert list(r["groups"]) == list(GROUPS)
    for s in r["groups"].values():
        for key in ("sync_c", "sync_c0", "sync_d"):
            assert all(np.isfinite(v) for v in s[key].values())
        assert 0.0 <= s["offset_accuracy"] <= 1.0 and len(s["offsets_found"]) == N
    assert set(r["frechet"]) == {"generated_vs_real", "real_train_vs_real"}
    assert all(np.isfinite(v) and v >= 0 for v in r["frechet"].values())
    v = r["viseme_accuracy"]
    assert set(v) == {"generated", "real", "generated_vs_other_speech", "chance", "probe"}
    for key in ("generated", "real", "generated_vs_other_speech", "chance"):
        assert 0.0 <= v[key] <= 1.0
    assert [e["index"] for e in r["examples"]] == list(range(N))
    assert r["plots"] == ["sync_c.png", "offsets.png", "examples.png"]
    for name in r["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _numbers(example: dict) -> dict:
    flat = {f"{g}/{k}": example[g][k] for g in GROUPS for k in evaluate.SCORES}
    return {**flat, **{f"viseme/{k}": v for k, v in example["viseme_accuracy"].items()}}


def test_two_processes_match_one(one_process, runs, corpus_dir):
    """Each process generates and judges its half (4 clips on its 4 devices); process 0
    gathers: every clip once, with the numbers of the one-process run."""
    _, ref = one_process
    out = runs["out"] / "two"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(4))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a cache hit on one process only hangs gloo
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mirage_jax.cli", *_args(runs, corpus_dir, out), "--coordinator",
         f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    assert "process 1 of 2, 4 local / 8 global devices" in logs[1]
    r = json.loads((out / "metrics.json").read_text())
    assert r["processes"] == 2 and r["devices"] == 8
    assert [e["index"] for e in r["examples"]] == list(range(N))
    for mine, theirs in zip(r["examples"], ref["examples"]):
        a, b = _numbers(mine), _numbers(theirs)
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], atol=1e-4)
    for key in ("frechet", "viseme_accuracy"):
        for k, v in r[key].items():
            if isinstance(v, float):
                assert v == pytest.approx(ref[key][k], abs=1e-4)


def test_demo_reports_the_evaluation(one_process):
    """The demo's summary.json keeps these figures of its evaluation (demo.sync_summary)."""
    from mirage_jax import demo

    _, r = one_process
    s = demo.sync_summary(r)
    assert s["clips"] == N and set(s["sync_c0"]) == set(GROUPS) == set(s["offset_accuracy"])
    assert s["sync_c"]["real"] == r["groups"]["real"]["sync_c"]["mean"]
    assert "probe" not in s["viseme_accuracy"] and set(s["frechet"]) == set(r["frechet"])
