"""Benchmarks as ratios taken in one run (this machine is shared and noisy; absolute
seconds are not comparable between runs, ratios measured side by side are).

  mirage-jax bench data --config C   pipeline examples/s next to what the train step consumes
"""
from __future__ import annotations

import time

import jax

from mirage_jax import sharding
from mirage_jax.data.pipeline import GrainSource, bench_data
from mirage_jax.train import state as state_lib
from mirage_jax.train.loop import global_batch
from mirage_jax.train.step import MODEL_KEYS, compile_step


def train_step_rate(cfg, steps: int = 10) -> dict:
    """Examples/s of the compiled train step on this machine's devices (data already there)."""
    mesh = sharding.make_mesh(cfg.mesh)
    setup = state_lib.setup(cfg, mesh)
    state = state_lib.init_state(cfg, setup)
    local = GrainSource(cfg).batch(0)
    abstract = {
        k: jax.ShapeDtypeStruct((cfg.data.global_batch,) + local[k].shape[1:], local[k].dtype)
        for k in MODEL_KEYS
    }
    step_fn = compile_step(cfg, setup, abstract)
    batch = global_batch(local, sharding.batch_sharding(mesh, cfg.sharding_rules))
    with jax.set_mesh(mesh):
        state, out = step_fn(state, batch)  # warm-up
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, out = step_fn(state, batch)
        jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    return {"examples_per_s": steps * cfg.data.global_batch / dt, "steps": steps, "seconds": dt}


def bench_data_vs_step(cfg, seconds: float = 10.0, steps: int = 10) -> dict:
    step = train_step_rate(cfg, steps)
    data = bench_data(cfg, seconds)
    data_rate = data["examples_per_s"] * jax.process_count()
    return {
        "pipeline_examples_per_s": data_rate,
        "train_step_examples_per_s": step["examples_per_s"],
        "ratio": data_rate / step["examples_per_s"],
        "workers": data["workers"],
    }
