"""The work of one JAX train step (mirage_jax/train/step.py) in PyTorch, given the flow's
inputs: forward, the weighted velocity MSE of `mirage_jax.flow.loss_fn`, backward,
global-norm clipping, AdamW, EMA. The noised streams, targets and weights come from JAX
(`mirage_jax.flow.training_inputs`), so both frameworks compute the same thing on the same
numbers and their step times compare (`mirage-jax bench train`)."""

from __future__ import annotations

import torch

from mirage_jax.model.tokens import GENERATED


def flow_loss(velocity: dict, targets: dict, weights: dict):
    """`mirage_jax.flow.loss_fn`: mean squared velocity error over the generated tokens of
    each stream, summed over streams."""
    total = 0.0
    for g in (g for g in GENERATED if g in velocity):
        err = (velocity[g].float() - targets[g]).square().mean(-1)
        total = total + (err * weights[g]).sum() / weights[g].sum().clamp(min=1.0)
    return total


class TrainStep:
    """AdamW (torch's, with optax's hyperparameters and eps) on `model`, an EMA of its
    parameters, and `__call__(streams, targets, weights) -> (loss, grad norm)`. With a
    `backend`, the whole step goes through `torch.compile(backend=...)`: with "inductor"
    (torch.compile's default) the forward and backward graphs and the optimizer's update
    are compiled; "eager" only traces (a fast check of the path). The learning rate is constant
    (`optim.lr`): the warm-up schedule changes no work. JAX's skip of a non-finite update
    (a select per parameter) has no counterpart."""

    def __init__(self, model, cfg, backend: str | None = None):
        o = cfg.optim
        self.model = model.train()
        self.params = list(model.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.b1, o.b2), eps=1e-8,
                                     weight_decay=o.weight_decay)
        self.clip, self.decay = o.clip_norm, o.ema_decay
        self.step = torch.compile(self._step, backend=backend) if backend else self._step

    def _step(self, streams, targets, weights):
        loss = flow_loss(self.model(streams), targets, weights)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - self.decay)
        return loss.detach(), norm.detach()

    def __call__(self, streams, targets, weights):
        return self.step(streams, targets, weights)
