"""Orbax checkpoints: one step directory holds the whole train state and the config.

Saves are asynchronous (training goes on while arrays are written) and atomic (a step
directory appears only once complete, so a killed run restores the latest complete one).
Restores are sharded: every array is read straight into the shards the target mesh wants.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import orbax.checkpoint as ocp

from mirage_jax.data import pipeline

log = logging.getLogger("mirage_jax")

# Orbax splits every replicated array into one slice per replica, written in parallel. For
# a model's many small parameters each slice is an eager dispatch (compiled the first time
# a shape is seen) that costs more than the write: 3 saves of the tiny test model took 20 s
# on 8 CPU devices, 3 s without. Only arrays whose slices reach SLICE_BYTES are split.
SLICE_BYTES = 4 << 20


def _register_array_handler() -> None:
    # Orbax's defaults otherwise (its public register_type_handler warns on every import).
    from orbax.checkpoint._src.metadata import array_metadata_store
    from orbax.checkpoint._src.serialization import type_handler_registry

    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=SLICE_BYTES,
                                             array_metadata_store=array_metadata_store.Store())
    type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, handler, override=True,
                                                           ignore_warnings=True)


_register_array_handler()


class CheckpointMismatch(ValueError):
    """A checkpoint whose arrays do not fit the model the config builds."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint write failed (disk full, lost mount) and `on_error` says stop."""


def _key(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flat_paths(tree) -> dict:
    """'opt_state/1/0/mu/blocks/video/q/kernel' -> leaf, whatever the container types."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key(e) for e in path): v for path, v in flat}


def shape_problems(stored: dict, wanted: dict, where: str) -> list[str]:
    """Lines naming the arrays (path -> shape) missing from `where` or from the model, and
    those whose shapes differ; empty when `stored` fits `wanted`."""
    problems = [f"  missing in {where}: {k} {wanted[k]}" for k in wanted.keys() - stored.keys()]
    problems += [f"  not in model: {k} {stored[k]}" for k in stored.keys() - wanted.keys()]
    problems += [
        f"  shape differs: {k} {where} {stored[k]} vs model {wanted[k]}"
        for k in wanted.keys() & stored.keys()
        if stored[k] != wanted[k]
    ]
    return sorted(problems)


def _stateful(source) -> bool:
    return source is not None and hasattr(source, "get_state")


class Checkpointer:
    """`on_error`: what a failed write does, 'stop' (raise `CheckpointSaveError`) or
    'continue' (log it; the next due step tries again). Either way the failed step never
    becomes a step directory, so the previous checkpoint stays the latest."""

    def __init__(self, directory, every: int, keep: int, async_save: bool = True,
                 on_error: str = "stop"):
        self.directory = pathlib.Path(directory).absolute()
        self.on_error, self._writing = on_error, None
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=every,
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=async_save,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "data": pipeline.checkpoint_handler(),
                "latent_stats": ocp.JsonCheckpointHandler(),  # a VAE's (mirage_jax/latents.py)
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(
        self, step: int, state: dict, config, source=None, force: bool = False, json_items=None
    ) -> bool:
        """Saves if `step` is due (or `force`); a stateful data source saves its iterator
        position with it (each process its own). `json_items`: more named JSON items (a
        VAE's latent statistics)."""
        if not (force or self.due(step)):
            return False
        self.wait()  # an asynchronous write of an earlier step fails here, not below
        data = {"data": pipeline.checkpoint_args(source)} if _stateful(source) else {}
        data.update({k: ocp.args.JsonSave(v) for k, v in (json_items or {}).items()})
        self._writing = step
        try:
            return self.manager.save(
                step,
                force=force,
                args=ocp.args.Composite(
                    **data,
                    state=ocp.args.StandardSave(state),
                    config=ocp.args.JsonSave(json.loads(config.to_json())),
                ),
            )
        except Exception as e:  # noqa: BLE001 - any write failure: report, then stop or go on
            self._failed(e)
            return False

    def _failed(self, error: Exception) -> None:
        step, self._writing = self._writing, None
        msg = (f"saving checkpoint step {step} in {self.directory} failed: "
               f"{type(error).__name__}: {error}; the latest complete checkpoint is step "
               f"{self.latest_step()}")
        if self.on_error == "stop":
            raise CheckpointSaveError(msg) from error
        log.error("%s; training continues (train.on_save_error=continue)", msg)

    def read_json(self, step: int, item: str) -> dict | None:
        """A JSON item of `step` ('config', 'latent_stats'); None if that step has none."""
        if not (self.directory / str(step) / item).is_dir():
            return None
        out = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return out[item]

    def check_fits(self, step: int, abstract: dict) -> None:
        """Compares stored array shapes with the model's before any restore is attempted."""
        meta = self.manager.item_metadata(step)["state"]
        stored = {k: tuple(v.shape) for k, v in flat_paths(meta).items()}
        wanted = {k: tuple(v.shape) for k, v in flat_paths(abstract).items()}
        problems = shape_problems(stored, wanted, "checkpoint")
        if problems:
            raise CheckpointMismatch(
                f"checkpoint {self.directory / str(step)} does not fit the config:\n"
                + "\n".join(problems)
            )

    def restore(self, step: int, abstract: dict, shardings: dict, source=None) -> dict:
        """Restores `step` into arrays laid out by `shardings` (any mesh), and the data
        iterator's position into `source` when it has one."""
        self.check_fits(step, abstract)
        data = {}
        if _stateful(source):
            if not (self.directory / str(step) / "data").is_dir():
                raise CheckpointMismatch(
                    f"checkpoint {self.directory / str(step)} holds no data iterator state, "
                    f"but data.source={source.__class__.__name__} needs one"
                )
            data = {"data": pipeline.checkpoint_args(source, restore=True)}
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        out = self.manager.restore(
            step, args=ocp.args.Composite(**data, state=ocp.args.StandardRestore(target))
        )
        return out["state"]

    def wait(self) -> None:
        """Waits for the asynchronous write in flight; its failure is handled by `on_error`."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._failed(e)
        self._writing = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def find_checkpoints(run_dir) -> pathlib.Path:
    """A run's workdir or its `checkpoints/` folder -> the checkpoints folder."""
    path = pathlib.Path(run_dir)
    path = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoints at {run_dir}")
    return path


def load_run(run_dir, mesh, weights: str = "ema", step: int | None = None) -> dict:
    """A trained model for inference: its config (as saved), graphdef and `weights`
    ('ema' or 'params'), restored sharded onto `mesh` (None: the run's own `config.mesh`, so
    parameters stay sharded as in training), and the step's JSON items.
    `run_dir` may also be a directory written by `mirage-jax export` (config.json and
    safetensors): it holds the one set of weights it was exported with."""
    from mirage_jax import config as config_lib
    from mirage_jax import export, sharding
    from mirage_jax.train import state as state_lib

    if export.is_export(run_dir):
        return export.load(run_dir, mesh)
    ckpt = Checkpointer(find_checkpoints(run_dir), every=1, keep=1, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint steps in {ckpt.directory}")
        where = str(ckpt.directory / str(step))
        cfg = config_lib.from_dict(ckpt.read_json(step, "config"), where)
        setup = state_lib.setup(cfg, mesh or sharding.make_mesh(cfg.mesh))
        state = ckpt.restore(step, setup.abstract, setup.shardings)
        extra = {"latent_stats": ckpt.read_json(step, "latent_stats")}
    finally:
        ckpt.close()
    return {"cfg": cfg, "graphdef": setup.graphdef, "params": state[weights], "step": step,
            "where": where, **extra}
