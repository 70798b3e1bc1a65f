"""Demo size: minutes of training on a 2-core CPU (pixel-space DiT on 32x32 clips).

Data: `mirage-jax prepare --dataset synthetic_aroll/small --size 32 --data_dir data_dir`
(the `demo` subcommand does this itself).
"""

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
    # XLA:CPU: the fused attention kernel, unrolled layers (4 of them: compile time is small)
    # and flat projections, each measured faster (README, Benchmarks); on an accelerator
    # pick its backend.
    c.model.attention = "flash_cpu"
    c.model.scan_layers = False
    c.model.flat_projections = True
    c.data.dataset = "synthetic_aroll/small_32px_50f"
    c.data.data_dir = "data_dir"
    c.data.workers = 1
    c.data.frames = 8
    c.data.height = 32
    c.data.width = 32
    c.data.audio_features = 32
    c.data.text_len = 48
    c.data.global_batch = 8
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.train.steps = 300
    c.train.log_every = 25
    c.train.ckpt_every = 100
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
