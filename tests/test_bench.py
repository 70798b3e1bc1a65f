"""`mirage-jax bench train` and `bench attention`: the figures are there and sane, and the
PyTorch step computes the JAX step's loss and gradient norm on the same inputs. No speed is
asserted."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from mirage_jax import bench, config, plan

pytest.importorskip("torch")


def random_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for k, a in plan.abstract_batch(cfg).items():
        x = rng.integers(0, 259, a.shape) if k == "text" else rng.normal(size=a.shape)
        out[k] = x.astype(a.dtype)
    out["text"][:, 6:] = 0  # padding, as real captions have
    return out


def test_bench_train_tiny():
    cfg = config.load(REPO / "configs" / "tiny.py", ["config.flow.motion_weight=2.0"])
    # torch.compile's "eager" backend: Dynamo traces the step (graph breaks, guards) without
    # inductor's minutes of C++ compilation; the CLI uses inductor.
    r = bench.bench_train(cfg, steps=1, rounds=2, batch=random_batch(cfg),
                          compile_backend="eager", peak_n=512)
    assert r["flops_per_step"] > 1e9 and r["xla_cost_flops"] > 0
    assert r["peak_flops_per_s"] > 0 and r["model_matmul_flops_per_s"] > 0
    assert r["others_cpu_share"] >= 0  # contention seen by the timed steps (Linux)
    for name in ("jax", "torch_eager", "torch_compile"):
        s = r[name]
        assert s["steps_timed"] == 2 and 0 < s["step_s_min"] <= s["step_s"]
        assert 0 < s["mfu"] < 1.5 and s["tokens_per_s"] > 0, (name, s)
    assert r["jax"]["compile_s"] > 0 and r["torch_compile"]["warmup_s"] > 0
    assert r["loss"] > 0.1 and r["grad_norm"] > 0.1  # random weights: a non-trivial step
    for name in ("torch_eager", "torch_compile"):
        assert r[f"{name}_loss_rel"] < 1e-4 and r[f"{name}_grad_norm_rel"] < 1e-4, r
    assert set(r["ratios"]) == {"jax_over_torch_eager", "jax_over_torch_compile"}
    assert all(math.isfinite(v) and v > 0 for v in r["ratios"].values())
    text = bench.report_train(r)
    assert "JAX / torch_compile" in text and "MFU" in text
    assert f"malloc: {r['malloc']}; attention xla, layers scanned" in text
    assert ("note: glibc malloc" in text) == (r["malloc"] == "glibc")
    without = {k: v for k, v in r.items() if not k.startswith("torch")} | {
        "ratios": {}, "torch_skipped": "torch is not installed"}
    assert "PyTorch skipped: torch is not installed" in bench.report_train(without)


def test_bench_attention_tiny():
    """Every CPU backend and torch's SDPA, timed and checked against the reference."""
    cfg = config.load(REPO / "configs" / "tiny.py", [])
    r = bench.bench_attention(cfg, reps=1, rounds=1)
    assert r["shape"] == [cfg.data.global_batch, 340, 4, 16]
    assert set(r["ms"]) == {"xla", "blockwise", "flash_cpu", "torch_sdpa"}
    assert all(e < 1e-4 for e in r["max_abs_err"].values()), r["max_abs_err"]
    assert r["over_xla"]["xla"] == 1 and all(v > 0 for v in r["ms"].values())
    assert "flash_cpu" in bench.report_attention(r)


def test_host_malloc_names_the_preloaded_allocator():
    """The report names the malloc, which moves XLA:CPU's step; tcmalloc.sh finds it."""
    def malloc(env):
        code = "from mirage_jax.bench import host_malloc; print(host_malloc())"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True).stdout.strip()

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert malloc(env) == "glibc"
    lib = subprocess.run([REPO / "launch" / "tcmalloc.sh"], capture_output=True, text=True,
                         check=True).stdout.strip()
    if not lib:
        pytest.skip("no tcmalloc on this machine (apt-get install libtcmalloc-minimal4)")
    assert malloc(env | {"LD_PRELOAD": lib}) == "tcmalloc"


def test_bench_train_needs_one_micro_batch():
    cfg = config.load(REPO / "configs" / "tiny.py", ["config.train.grad_accum=2"])
    with pytest.raises(ValueError, match="grad_accum"):
        bench.bench_train(cfg, batch=random_batch(cfg))
