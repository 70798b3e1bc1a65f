"""Demo size: a few minutes of training on a 2-core CPU, on one device."""

from mirage_jax.config import base_config


def get_config():
    c = base_config()
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.head_dim = 32
    c.model.video_width = 128
    c.model.audio_width = 64
    c.model.text_width = 64
    c.model.time_dim = 128
    c.model.patch = 4
    c.data.frames = 8
    c.data.height = 32
    c.data.width = 32
    c.data.audio_features = 32
    c.data.text_len = 48
    c.data.global_batch = 16
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.train.steps = 600
    c.train.log_every = 25
    c.train.ckpt_every = 200
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
