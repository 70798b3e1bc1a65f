"""Inference weights in the PyTorch layout: a directory with `config.json` and
`model.safetensors` (above `max_shard_mb`: `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json`, the Hugging Face convention). No pickle anywhere.

  mirage-jax export --checkpoint runs/dit --out dit_export [--no-ema] [--dtype bfloat16]
  mirage-jax import-torch dit_export --out runs/dit_again

Tensor names are the state-dict names of `mirage_jax.torch`. The conversion is data: a
rename per leaf name, a transpose per (leaf name, rank), and the stacked (`nnx.vmap`) layer
axis split into one tensor per layer. Export gathers one tensor (one layer) at a time and
streams it to disk, so a model larger than one host's memory still exports; the load path
(`load`, used by `checkpoint.load_run`) inverts every step and checks names and shapes first.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

FORMAT = "mirage_jax/2"
RENAME = {"kernel": "weight", "embedding": "weight", "scale": "weight", "shift": "bias"}
TO_TORCH = {("kernel", 2): (1, 0), ("kernel", 4): (3, 2, 0, 1),  # Linear, Conv2d,
            ("kernel", 5): (4, 3, 0, 1, 2)}  # Conv3d
# Per model: the vmap-stacked subtrees.
STACKED = {"dit": ("blocks",), "vae": (), "amdim": (), "sync": ()}
DTYPES = {"float32": (np.float32, "F32"), "bfloat16": (ml_dtypes.bfloat16, "BF16")}
INDEX = "model.safetensors.index.json"


def tensor_plan(cfg, abstract_params) -> list[tuple[str, int | None, str, tuple]]:
    """(JAX path, layer or None, PyTorch name, PyTorch shape) of every exported tensor."""
    from mirage_jax.train.checkpoint import flat_paths

    plan = []
    for path, leaf in flat_paths(abstract_params).items():
        parts = path.split("/")
        parts[-1] = RENAME.get(parts[-1], parts[-1])
        stacked = parts[0] in STACKED[cfg.task]
        shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
        perm = _perm(path, len(shape))
        shape = tuple(shape[i] for i in perm) if perm else shape
        for layer in range(leaf.shape[0]) if stacked else [None]:
            name = ".".join(parts if layer is None else [parts[0], str(layer), *parts[1:]])
            plan.append((path, layer, name, shape))
    return plan


def _perm(path: str, ndim: int):
    return TO_TORCH.get((path.rsplit("/", 1)[-1], ndim))


def _to_host(x) -> np.ndarray:
    """One array, whole, on this host: its addressable shards, or an all-gather across hosts."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _shards(plan, itemsize: int, max_bytes: int) -> list[list[int]]:
    """Consecutive plan entries packed into files of at most `max_bytes` (a larger tensor
    gets a file of its own)."""
    files, size = [[]], 0
    for i, (*_, shape) in enumerate(plan):
        n = int(np.prod(shape)) * itemsize
        if files[-1] and size + n > max_bytes:
            files.append([])
            size = 0
        files[-1].append(i)
        size += n
    return files


def _write_safetensors(path, names, shapes, code, itemsize, arrays) -> None:
    """The safetensors format (8-byte header size, JSON header, raw little-endian data),
    written as `arrays` yields each tensor: nothing but one tensor is ever held."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in zip(names, shapes):
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape, a in zip(names, shapes, arrays):
            assert a.shape == tuple(shape), (name, a.shape, shape)
            f.write(np.ascontiguousarray(a).tobytes())


def write(out, cfg, params, meta: dict, dtype: str = "float32", max_shard_mb: float = 4096.0):
    """Writes `params` (a sharded pytree on any mesh) under `out`; `meta` goes to config.json
    with the config. Only process 0 writes; every process takes part in the gathers."""
    from mirage_jax.train.checkpoint import flat_paths

    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    np_dtype, code = DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    plan, leaves = tensor_plan(cfg, params), flat_paths(params)
    files = _shards(plan, itemsize, int(max_shard_mb * 2**20))
    writer = jax.process_index() == 0
    tmp = out.with_name(f".{out.name}.tmp")
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def arrays(idx):
        for i in idx:
            path, layer, _, _ = plan[i]
            a = _to_host(leaves[path] if layer is None else leaves[path][layer])
            perm = _perm(path, a.ndim)
            yield (a.transpose(perm) if perm else a).astype(np_dtype)

    names = ["model.safetensors"] if len(files) == 1 else [
        f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
    weight_map = {}
    for fname, idx in zip(names, files):
        tensors = arrays(idx)
        if writer:
            _write_safetensors(tmp / fname, [plan[i][2] for i in idx], [plan[i][3] for i in idx],
                               code, itemsize, tensors)
        else:
            for _ in tensors:
                pass
        weight_map.update({plan[i][2]: fname for i in idx})
    if writer:
        if len(files) > 1:
            total = sum(int(np.prod(p[3])) * itemsize for p in plan)
            (tmp / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        config = {"format": FORMAT, "model": cfg.task, "dtype": dtype, **meta,
                  "config": json.loads(cfg.to_json())}
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if out.exists():
            out.rmdir()
        tmp.replace(out)
    return out


def save(checkpoint, out, ema: bool = True, dtype: str = "float32", max_shard_mb: float = 4096.0):
    """Exports the latest step of a run (its EMA weights, or the raw parameters), restored
    on the run's own mesh: sharded as in training, then gathered one tensor at a time."""
    from mirage_jax.train.checkpoint import load_run

    weights = "ema" if ema else "params"
    run = load_run(checkpoint, None, weights)
    meta = {"step": int(run["step"]), "weights": weights}
    if run["latent_stats"] is not None:
        meta["latent_stats"] = run["latent_stats"]
    return write(out, run["cfg"], run["params"], meta, dtype, max_shard_mb)


def is_export(path) -> bool:
    return (pathlib.Path(path) / "config.json").is_file()


def read_config(path) -> dict:
    meta = json.loads((pathlib.Path(path) / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}/config.json: not a {FORMAT} export (format "
                         f"{meta.get('format')!r})")
    return meta


def weight_files(path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it (from the index when sharded)."""
    path = pathlib.Path(path)
    if (path / INDEX).is_file():
        wm = json.loads((path / INDEX).read_text())["weight_map"]
        return {k: path / v for k, v in wm.items()}
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        return {k: path / "model.safetensors" for k in f.keys()}


def load(path, mesh) -> dict:
    """What `checkpoint.load_run` returns, from an exported directory: names and shapes are
    checked against the model its config builds, then every array is placed in its shards
    on `mesh` (None: the config's mesh)."""
    from mirage_jax import config as config_lib
    from mirage_jax import sharding
    from mirage_jax.train import state as state_lib
    from mirage_jax.train.checkpoint import CheckpointMismatch, flat_paths, shape_problems

    meta = read_config(path)
    cfg = config_lib.from_dict(meta["config"], str(path))
    setup = state_lib.setup(cfg, mesh or sharding.make_mesh(cfg.mesh))
    plan = tensor_plan(cfg, setup.abstract["params"])
    files = weight_files(path)
    stored = {}
    for fname in sorted(set(files.values())):
        with safe_open(str(fname), framework="numpy") as f:
            stored.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    problems = shape_problems(stored, {name: shape for *_, name, shape in plan}, "export")
    if problems:
        raise CheckpointMismatch(f"{path} does not fit its config:\n" + "\n".join(problems))
    wanted, shards = flat_paths(setup.abstract["params"]), flat_paths(setup.shardings["params"])
    names = {}
    for jpath, _, name, _ in plan:
        names.setdefault(jpath, []).append(name)
    placed = []
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="numpy"))
                   for f in set(files.values())}
        for jpath, leaf in wanted.items():
            parts = []
            for name in names[jpath]:
                a = handles[files[name]].get_tensor(name)
                perm = _perm(jpath, a.ndim)
                parts.append(a.transpose(np.argsort(perm)) if perm else a)
            a = np.stack(parts) if jpath.split("/")[0] in STACKED[cfg.task] else parts[0]
            placed.append(jax.device_put(a.astype(leaf.dtype), shards[jpath]))
    params = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(setup.abstract["params"]), placed)
    return {"cfg": cfg, "graphdef": setup.graphdef, "params": params,
            "step": int(meta.get("step", 0)), "where": str(path),
            "latent_stats": meta.get("latent_stats")}


def import_torch(path, workdir) -> pathlib.Path:
    """An exported directory -> an Orbax run in `workdir` at the exported step, the weights as
    both `params` and `ema` and a fresh optimizer state (fine-tuning starts from it)."""
    from mirage_jax import sharding
    from mirage_jax.train import state as state_lib
    from mirage_jax.train.checkpoint import Checkpointer

    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints")
    run = load(path, None)
    cfg, step = run["cfg"], run["step"]
    setup = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh))
    key = jax.random.key_data(jax.random.key(cfg.seed))

    def build(params):
        return dict(step=jax.numpy.asarray(step, jax.numpy.int32), rng=key, params=params,
                    opt_state=setup.tx.init(params), ema=jax.tree.map(jax.numpy.copy, params))

    state = jax.jit(build, out_shardings=setup.shardings)(run["params"])
    ckpt = Checkpointer(ckpt_dir, every=1, keep=1, async_save=False)
    try:
        stats = run["latent_stats"]
        ckpt.save(step, state, cfg, force=True,
                  json_items={"latent_stats": stats} if stats is not None else None)
    finally:
        ckpt.close()
    return ckpt_dir / str(step)
