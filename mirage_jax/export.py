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

SEP = "/"


def _flatten(tree, prefix=""):
    """Nested dicts -> {'blocks/video/q/kernel': leaf}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{SEP}{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def save(run_dir, out, weights: str = "ema") -> pathlib.Path:
    """Writes `weights` of the latest checkpoint in `run_dir` (plus config and statistics)."""
    from mirage_jax import sharding
    from mirage_jax.train.checkpoint import load_run

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1})
    run = load_run(run_dir, mesh, weights)
    meta = {"config": run["cfg"].to_json(), "step": str(run["step"]), "weights": weights,
            "format": "mirage_jax/1"}
    if run["latent_stats"] is not None:
        meta["latent_stats"] = json.dumps(run["latent_stats"])
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    arrays = {k: np.asarray(jax.device_get(v)) for k, v in _flatten(run["params"]).items()}
    save_file(arrays, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def load(path, mesh) -> dict:
    """What `checkpoint.load_run` returns, from a file written by `save`; every array is
    checked against the model the stored config builds, then placed in its shards."""
    from mirage_jax import config as config_lib
    from mirage_jax.train import state as state_lib
    from mirage_jax.train.checkpoint import CheckpointMismatch, _key

    path = pathlib.Path(path)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "mirage_jax/1":
        raise ValueError(f"{path}: not a mirage_jax weights file (no 'format' in its header)")
    cfg = config_lib.from_dict(json.loads(meta["config"]), str(path))
    setup = state_lib.setup(cfg, mesh)
    flat = load_file(str(path))
    wanted = _flatten(setup.abstract["params"])
    shards = _flatten(setup.shardings["params"])
    problems = [f"  missing: {k}" for k in wanted.keys() - flat.keys()]
    problems += [f"  not in model: {k}" for k in flat.keys() - wanted.keys()]
    problems += [f"  shape differs: {k} file {flat[k].shape} vs model {wanted[k].shape}"
                 for k in wanted.keys() & flat.keys() if flat[k].shape != wanted[k].shape]
    if problems:
        raise CheckpointMismatch(f"{path} does not fit its config:\n" + "\n".join(sorted(problems)))
    placed = {k: jax.device_put(flat[k].astype(wanted[k].dtype), shards[k]) for k in wanted}
    params = jax.tree_util.tree_map_with_path(
        lambda p, _: placed[SEP.join(_key(e) for e in p)], setup.abstract["params"])
    stats = json.loads(meta["latent_stats"]) if "latent_stats" in meta else None
    return {"cfg": cfg, "graphdef": setup.graphdef, "params": params,
            "step": int(meta.get("step", 0)), "where": str(path), "latent_stats": stats}

