"""One sharded train step: rectified-flow loss, gradient accumulation, AdamW, EMA.

A pure function of (state, batch); `compile_step` jits it with explicit in/out shardings
and the state donated, and compiles it once ahead of time so its memory and FLOPs can be
logged (the same lowering is what a pod planner needs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mirage_jax import flow, sharding
from mirage_jax.amdim.loss import amdim_loss
from mirage_jax.amdim.sync import sync_loss
from mirage_jax.model.tokens import batch_to_streams, token_motion
from mirage_jax.model.vae import vae_loss

MODEL_KEYS = ("video", "audio", "text", "ref")


def batch_loss(model, batch: dict, key, cfg):
    """Loss of one batch for `cfg.task`; returns (loss, named parts)."""
    if cfg.task == "vae":
        return vae_loss(model, batch, key, cfg)
    if cfg.task == "amdim":
        return amdim_loss(model, batch, key, cfg)
    if cfg.task == "sync":
        return sync_loss(model, batch, key, cfg)
    # Rectified flow: tokens, task/time/noise draw, velocity error.
    noised, targets, weights = dit_flow_inputs(batch, key, cfg)
    return flow.loss_fn(model(noised), targets, weights)


def dit_flow_inputs(batch: dict, key, cfg):
    """The DiT's (noised streams, velocity targets, loss weights) for one micro-batch."""
    noised, targets, weights = flow.training_inputs(key, batch_to_streams(batch, cfg), cfg)
    if cfg.flow.motion_weight:  # lip sync lives in the few tokens that move
        motion = token_motion(batch["video"].astype(jnp.float32), cfg.model.patch)
        weights["video"] = weights["video"] * (1.0 + cfg.flow.motion_weight * motion)
    return noised, targets, weights


def make_train_step(cfg, s):
    accum = cfg.train.grad_accum
    rules = cfg.sharding_rules

    def loss_of(params, batch, key):
        return batch_loss(nnx.merge(s.graphdef, params), batch, key, cfg)

    def train_step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params = state["params"]
        # Micro-batches on a leading axis, still split over the data axes.
        micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
        micro = jax.tree.map(
            lambda x: sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2), rules), micro
        )

        def accumulate(carry, inputs):
            i, mb = inputs
            (loss, parts), grads = jax.value_and_grad(loss_of, has_aux=True)(
                params, mb, jax.random.fold_in(key, i)
            )
            if carry is None:
                return (grads, loss, parts), None
            return jax.tree.map(jnp.add, carry, (grads, loss, parts)), None

        first = jax.tree.map(lambda x: x[0], micro)
        if accum == 1:
            # No loop: XLA:CPU runs convolutions inside a while loop ~25x slower (measured on
            # the VAE step), and one micro-batch needs no carry.
            (grads, loss, parts), _ = accumulate(None, (0, first))
        else:
            parts_shape = jax.eval_shape(loss_of, params, first, key)[1]
            zeros = (
                jax.tree.map(jnp.zeros_like, params),
                jnp.zeros(()),
                jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), parts_shape),
            )
            (grads, loss, parts), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), micro))
            grads, loss, parts = jax.tree.map(lambda x: x / accum, (grads, loss, parts))

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = s.tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        decay = cfg.optim.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        # A non-finite loss or gradient skips the whole update here, on the device (no host
        # sync); `step` still advances with the data, and the loop counts `skipped`.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state, ema = jax.tree.map(
            lambda n, o: jnp.where(ok, n, o), (params, opt_state, ema),
            (state["params"], state["opt_state"], state["ema"]),
        )
        new = dict(
            step=state["step"] + 1, rng=state["rng"], params=params, opt_state=opt_state, ema=ema
        )
        metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "lr": s.schedule(state["step"]),
                   "skipped": (~ok).astype(jnp.float32)}
        return new, metrics

    return train_step


def compile_step(cfg, s, batch_abstract: dict, traced=None):
    """AOT-compiled step: jit with explicit shardings, donated state. `traced`: the step as
    `trace_step` traced it, when the caller has it (its jaxpr also gives the FLOP count)."""
    with jax.set_mesh(s.mesh):
        return (traced or trace_step(cfg, s, batch_abstract)).lower().compile()


def trace_step(cfg, s, batch_abstract: dict):
    """The jitted step traced on abstract inputs (`jax.stages.Traced`: `.jaxpr`, `.lower()`)."""
    shard = sharding.batch_sharding(s.mesh, cfg.sharding_rules)
    batch_sh = {k: shard for k in batch_abstract}
    jitted = jax.jit(
        make_train_step(cfg, s),
        in_shardings=(s.shardings, batch_sh),
        out_shardings=(s.shardings, None),
        donate_argnums=0,
    )
    with jax.set_mesh(s.mesh):
        abstract_batch = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard)
            for k, v in batch_abstract.items()
        }
        return jitted.trace(s.abstract, abstract_batch)
