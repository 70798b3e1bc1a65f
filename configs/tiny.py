"""Tiny model for tests: seconds to compile and train on CPU."""

from mirage_jax.config import base_config


def get_config():
    c = base_config()
    c.train.steps = 20
    c.train.log_every = 5
    c.train.ckpt_every = 5
    c.optim.warmup_steps = 2
    return c
