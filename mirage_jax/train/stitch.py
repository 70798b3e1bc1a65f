"""Stitching a new condition into a trained model, and the warm-up that follows.

The paper's central claim: one recipe trains the audio model from scratch or from a silent
(text/image-to-video) model. The new parameters enter so that the network first computes
what the old one did, train alone for a while, then everything trains together.

  new parameters  those of the groups in `model.stitch`: for 'audio' its stream (layers,
                  input, output head) and its key offsets; for 'ref', which runs on the video
                  stream's weights, only its key offsets (`is_new`)
  step 0          adaLN-Zero gates and the output head start at zero, so the new stream writes
                  nothing into its own tokens' outputs; the old streams see its tokens only as
                  keys of the joint attention, and those carry a learned per-head logit offset
                  starting at `model.stitch_offset` (-10: softmax weight ~5e-5 per key), stepping
                  `model.stitch_offset_lr` times the learning rate
  init_from       every parameter whose path and shape match is read from the checkpoint,
                  straight into the target shardings; the rest keep their fresh init
  warm-up         `train.warmup_new_steps` steps of AdamW on the new parameters only (optax
                  partition; frozen ones get `set_to_zero` and no moments), then AdamW on all
                  with its own fresh lr warm-up. The phase is the optimizer's update count,
                  saved in its state, so it survives resume.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from mirage_jax.model.tokens import STREAM_OF
from mirage_jax.train.checkpoint import (
    Checkpointer,
    CheckpointMismatch,
    _key,
    find_checkpoints,
    flat_paths,
)

log = logging.getLogger("mirage_jax")


def is_new(path: str, cfg) -> bool:
    """Whether parameter `path` ('blocks/audio/q/kernel') belongs to a stitched group."""
    parts = set(path.split("/"))
    for g in cfg.model.stitch:
        own = STREAM_OF[g] == g and bool({g, f"{g}_in", f"{g}_out"} & parts)
        if own or f"{g}_key_offset" in parts:
            return True
    return False


def labels(cfg):
    """params -> the same tree of 'new' / 'frozen' (an optax partition's labels)."""
    def label(path, _):
        return "new" if is_new("/".join(_key(e) for e in path), cfg) else "frozen"

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


class WarmupState(NamedTuple):
    count: jax.Array  # updates so far; below train.warmup_new_steps: the warm-up phase
    new: optax.OptState  # the warm-up optimizer: moments of the new parameters only
    all: optax.OptState  # the optimizer of every parameter, from the end of the warm-up


def warmup_then_all(cfg, adamw):
    """(transformation, schedule of the step) for the two phases; `adamw(schedule)` builds
    the clipped AdamW of `state.make_optimizer`."""
    o, n = cfg.optim, cfg.train.warmup_new_steps
    warm_lr = optax.linear_schedule(0.0, o.lr, max(min(o.warmup_steps, n), 1))
    full_lr = optax.warmup_cosine_decay_schedule(
        0.0, o.lr, o.warmup_steps, max(cfg.train.steps - n, o.warmup_steps + 1),
        o.lr * o.end_lr_ratio)
    warm = optax.partition({"new": adamw(warm_lr), "frozen": optax.set_to_zero()}, labels(cfg))
    full = adamw(full_lr)

    def init(params):
        return WarmupState(jnp.zeros((), jnp.int32), warm.init(params), full.init(params))

    def update(grads, state, params=None):
        def warm_phase():
            updates, new = warm.update(grads, state.new, params)
            return updates, new, state.all

        def full_phase():
            updates, all_ = full.update(grads, state.all, params)
            return updates, state.new, all_

        updates, new, all_ = jax.lax.cond(state.count < n, warm_phase, full_phase)
        return updates, WarmupState(state.count + 1, new, all_)

    def schedule(step):
        return jnp.where(step < n, warm_lr(step), full_lr(jnp.maximum(step - n, 0)))

    return optax.GradientTransformation(init, update), schedule


def _subset(tree, keep, prefix=""):
    """The nested dict `tree` with only the leaves whose path is in `keep`."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            sub = _subset(v, keep, path + "/")
            if sub:
                out[k] = sub
        elif path in keep:
            out[k] = v
    return out


def _overlay(base, top):
    """`base` with the leaves of `top` (a subset of its nested dicts) put in."""
    return {k: (_overlay(v, top[k]) if isinstance(v, dict) else top[k]) if k in top else v
            for k, v in base.items()}


def init_from(cfg, setup, state: dict, workdir=None) -> tuple[dict, dict]:
    """`state` (freshly initialised) with every parameter of `cfg.init_from`'s latest
    checkpoint whose path and shape match, read sharded into `setup.shardings` (no full copy
    on one host); EMA restarts from the result, the optimizer stays fresh. Returns the state
    and the report (restored / new / ignored paths), also written to WORKDIR/init_from.json."""
    directory = find_checkpoints(cfg.init_from)
    ckpt = Checkpointer(directory, every=1, keep=1, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"init_from: no checkpoint steps in {directory}")
        meta = flat_paths(ckpt.manager.item_metadata(step)["state"])
    finally:
        ckpt.close()
    stored = {k[len("params/"):]: tuple(v.shape) for k, v in meta.items()
              if k.startswith("params/")}
    wanted = {k: tuple(v.shape) for k, v in flat_paths(setup.abstract["params"]).items()}
    differ = [f"  {k}: checkpoint {stored[k]} vs model {wanted[k]}"
              for k in sorted(wanted.keys() & stored.keys()) if stored[k] != wanted[k]]
    where = directory / str(step)
    if differ:
        raise CheckpointMismatch(f"init_from {where}: parameter shapes differ:\n" + "\n".join(differ))
    report = {"from": str(where), "restored": sorted(wanted.keys() & stored.keys()),
              "new": sorted(wanted.keys() - stored.keys()),
              "ignored": sorted(stored.keys() - wanted.keys())}
    if cfg.train.warmup_new_steps:  # a fresh parameter outside model.stitch would stay frozen
        frozen_fresh = [k for k in report["new"] if not is_new(k, cfg)]
        if frozen_fresh:
            raise CheckpointMismatch(
                f"init_from {where}: not in the checkpoint and not in model.stitch="
                f"{cfg.model.stitch}, so the warm-up would freeze them at random init: "
                + ", ".join(frozen_fresh))

    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          setup.abstract["params"], setup.shardings["params"])
    target = _subset(target, set(report["restored"]))
    restored = ocp.PyTreeCheckpointer().restore(
        where / "state",
        args=ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)},
            partial_restore=True,
        ),
    )["params"]
    params = _overlay(state["params"], restored)
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=setup.shardings["ema"])
    state = dict(state, params=params, ema=copy(params))

    log.info("init_from %s: %d parameters restored, %d new, %d ignored", where,
             len(report["restored"]), len(report["new"]), len(report["ignored"]))
    for kind in ("new", "ignored", "restored"):
        if report[kind]:
            log.info("  %s: %s", kind, ", ".join(report[kind]))
    if workdir is not None and jax.process_index() == 0:
        pathlib.Path(workdir, "init_from.json").write_text(json.dumps(report, indent=1))
    return state, report
