"""The rectified-flow sampler (mirage_jax/flow.py) in PyTorch: t = 1 is noise, t = 0 data,
Euler or Heun over a schedule (`mirage_jax.flow.linear_quadratic_schedule`, numpy), and
classifier-free guidance over an ordered list of conditions. The noise is an argument, so
the same noise gives the same video as the JAX sampler."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def annealed_scale(scale: float, t: float, cosine: bool) -> float:
    """Guidance scale at time t; cosine annealing goes from `scale` at t=1 to 1 at t=0."""
    return 1.0 + (scale - 1.0) * 0.5 * (1.0 - np.cos(np.pi * t)) if cosine else scale


def guided(model, conditions: Sequence[tuple[str, float]], cosine: bool = False):
    """v = v(none) + sum_i s_i (v(c_1..c_i) - v(c_1..c_{i-1})), all passes as one batch; a
    dropped condition has its keys masked out, as in training."""
    names = [c for c, _ in conditions]

    def velocity(streams, t):
        variants = [{g: s.replace(mask=s.mask & False) if g in names[k:] else s
                     for g, s in streams.items()} for k in range(len(names) + 1)]
        batched = {g: streams[g].replace(**{f: torch.cat([getattr(v[g], f) for v in variants])
                                            for f in ("x", "t", "pos", "mask")})
                   for g in streams}
        out, b = model(batched), streams["video"].x.shape[0]
        result = {}
        for g, v in out.items():
            vs = v.split(b)
            acc = vs[0]
            for i, (_, scale) in enumerate(conditions):
                acc = acc + annealed_scale(scale, t, cosine) * (vs[i + 1] - vs[i])
            result[g] = acc
        return result

    return velocity


@torch.no_grad()
def sample(velocity_fn, streams: dict, generate: dict, noise: dict, schedule,
           method: str = "euler") -> dict:
    """Integrates from t=1 to t=0 the tokens marked in `generate[g]` [B, N], starting from
    `noise[g]`; other tokens keep their clean values at t = 0. Returns the final streams."""
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown sampler '{method}' (euler | heun)")
    clean = {g: streams[g].x for g in generate}
    x = {g: torch.where(generate[g][..., None], noise[g], clean[g]) for g in generate}

    def with_time(x, t):
        s = dict(streams)
        for g in generate:
            s[g] = streams[g].replace(x=x[g], t=torch.where(
                generate[g], torch.tensor(t, dtype=torch.float32), torch.tensor(0.0)))
        return s

    sched = np.asarray(schedule, np.float32)
    for t, t_next in zip(sched[:-1].tolist(), sched[1:].tolist()):
        v = velocity_fn(with_time(x, t), t)
        dt = t_next - t
        pred = {g: x[g] + dt * v[g] for g in generate}
        if method == "heun":
            v2 = velocity_fn(with_time(pred, t_next), t_next)
            pred = {g: x[g] + dt * 0.5 * (v[g] + v2[g]) for g in generate}
        x = {g: torch.where(generate[g][..., None], pred[g], clean[g]) for g in generate}
    return with_time(x, 0.0)
