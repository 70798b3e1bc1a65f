"""Inference weights as one safetensors file: the EMA parameters, the config and (for a VAE)
its latent statistics in the header. No pickle anywhere; small enough to ship a demo model.

  mirage-jax export --run runs/vae --out vae.safetensors
  Codec('vae.safetensors') / Generator('dit.safetensors') load it like a run directory.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

def save(run_dir, out, weights: str = "ema") -> pathlib.Path:
    """Writes `weights` of the latest checkpoint in `run_dir` (plus config and statistics)."""
    from mirage_jax import sharding
    from mirage_jax.train.checkpoint import flat_paths, load_run

    run = load_run(run_dir, sharding.data_mesh(), weights)
    meta = {"config": run["cfg"].to_json(), "step": str(run["step"]), "weights": weights,
            "format": "mirage_jax/1"}
    if run["latent_stats"] is not None:
        meta["latent_stats"] = json.dumps(run["latent_stats"])
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    arrays = {k: np.asarray(jax.device_get(v)) for k, v in flat_paths(run["params"]).items()}
    save_file(arrays, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def load(path, mesh) -> dict:
    """What `checkpoint.load_run` returns, from a file written by `save`; every array is
    checked against the model the stored config builds, then placed in its shards."""
    from mirage_jax import config as config_lib
    from mirage_jax.train import state as state_lib
    from mirage_jax.train.checkpoint import CheckpointMismatch, flat_paths, shape_problems

    path = pathlib.Path(path)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "mirage_jax/1":
        raise ValueError(f"{path}: not a mirage_jax weights file (no 'format' in its header)")
    cfg = config_lib.from_dict(json.loads(meta["config"]), str(path))
    setup = state_lib.setup(cfg, mesh)
    flat = load_file(str(path))
    wanted = flat_paths(setup.abstract["params"])
    problems = shape_problems({k: v.shape for k, v in flat.items()},
                              {k: tuple(v.shape) for k, v in wanted.items()}, "file")
    if problems:
        raise CheckpointMismatch(f"{path} does not fit its config:\n" + "\n".join(problems))
    shards = flat_paths(setup.shardings["params"])
    placed = [jax.device_put(flat[k].astype(wanted[k].dtype), shards[k]) for k in wanted]
    params = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(setup.abstract["params"]), placed)
    stats = json.loads(meta["latent_stats"]) if "latent_stats" in meta else None
    return {"cfg": cfg, "graphdef": setup.graphdef, "params": params,
            "step": int(meta.get("step", 0)), "where": str(path), "latent_stats": stats}

