"""The train state, its optimizer, and building it sharded from the start.

State is a plain dict of pytrees: step, rng, params, opt_state, ema. Parameters are
kept as a pure dict (nested dicts of arrays) and merged into the model inside the jitted
step, so per-step Python work is one dispatch. The state is never built unsharded:
`jax.eval_shape(init)` gives shapes, the rules give shardings, and `jax.jit(init,
out_shardings=...)` materialises every array directly in its shards.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mirage_jax import sharding
from mirage_jax.amdim.model import AMDIM
from mirage_jax.amdim.sync import SyncJudge
from mirage_jax.model.dit import DiT
from mirage_jax.model.vae import VAE
from mirage_jax.train.checkpoint import _key

MODELS = {"dit": DiT, "vae": VAE, "amdim": AMDIM, "sync": SyncJudge}


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW on float32 moments, warm-up then cosine decay, global-norm clipping."""
    o = cfg.optim

    def adamw(schedule):
        return optax.chain(
            optax.clip_by_global_norm(o.clip_norm),
            optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                        mu_dtype=jnp.float32),
            *([_scale_key_offsets(cfg.model.stitch_offset_lr)] if cfg.model.stitch else []),
        )

    if cfg.train.warmup_new_steps:  # stitching: new parameters first, then all (stitch.py)
        from mirage_jax.train import stitch

        return stitch.warmup_then_all(cfg, adamw)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=o.warmup_steps,
        decay_steps=max(cfg.train.steps, o.warmup_steps + 1),
        end_value=o.lr * o.end_lr_ratio,
    )
    return adamw(schedule), schedule


def _scale_key_offsets(factor: float) -> optax.GradientTransformation:
    """Stitched key offsets (`*_key_offset`) step `factor` times further: they start at
    model.stitch_offset and must climb to ~0 for the old streams to attend the new one."""
    def scale(updates, state, params=None):
        del params
        offset = lambda path: _key(path[-1]).endswith("_key_offset")  # noqa: E731
        return jax.tree_util.tree_map_with_path(
            lambda path, u: u * factor if offset(path) else u, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), scale)


@dataclasses.dataclass
class Setup:
    """What the loop needs about the state: how to rebuild the model, and where arrays live."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: dict  # ShapeDtypeStructs of the state
    shardings: dict  # NamedShardings of the state
    mesh: jax.sharding.Mesh


def _init_fn(cfg, tx):
    def init(key):
        k_model, k_train = jax.random.split(key)
        model = MODELS[cfg.task](cfg, nnx.Rngs(params=k_model))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return dict(
            step=jnp.zeros((), jnp.int32),
            rng=k_train,
            params=params,
            opt_state=tx.init(params),
            ema=jax.tree.map(jnp.copy, params),
        )

    return init


def abstract_model(cfg) -> nnx.Module:
    return nnx.eval_shape(lambda: MODELS[cfg.task](cfg, nnx.Rngs(0)))


def setup(cfg, mesh) -> Setup:
    tx, schedule = make_optimizer(cfg)
    model = abstract_model(cfg)
    graphdef = nnx.graphdef(model)
    key = jax.random.key_data(jax.random.key(cfg.seed))
    abstract = jax.eval_shape(_init_fn(cfg, tx), key)
    shardings = sharding.state_shardings(model, abstract, tx, mesh, cfg.sharding_rules)
    return Setup(graphdef, tx, schedule, abstract, shardings, mesh)


def init_state(cfg, s: Setup) -> dict:
    key = jax.random.key_data(jax.random.key(cfg.seed))
    return jax.jit(_init_fn(cfg, s.tx), out_shardings=s.shardings)(key)


def count_params(cfg) -> int:
    model = abstract_model(cfg)
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
