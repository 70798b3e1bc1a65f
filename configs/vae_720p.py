"""The pod-scale video VAE the 1B and 10B DiTs read latents from (`configs/mirage_*b.py`).

Mochi's geometry except time: 8x8 in space, 4x in time (Mochi: 6x), 12 latent channels, so
101 frames of 1280x720 (4 s at 25 fps) are 1 + 25 latent frames of 160x90x12. A 2x2
space-to-depth patchify, then 3 levels of (128, 256, 512) channels with 3 residual blocks
each of full 3x3x3 convolutions: 115M parameters, bf16 compute. Trained on 17-frame windows (1 + 4 * 4); it is causal and fully
convolutional, so it then codes 101-frame 720p clips in exact temporal tiles.

  mirage-jax train --config configs/vae_720p.py --workdir gs://bucket/vae_720p \\
      --config.data.dataset=<720p A-roll dataset> --config.data.data_dir=<its data_dir>
"""

from mirage_jax.config import base_config


def get_config():
    c = base_config()
    c.task = "vae"
    c.data.dataset = "aroll_720p/default"  # set to the prepared 1280x720 A-roll dataset
    c.data.data_dir = "gs://mirage-data/tfds"
    c.data.workers = 8
    c.data.frames = 17  # 1 + 4 * 4
    c.data.height = 720
    c.data.width = 1280
    c.data.global_batch = 64
    c.vae.widths = (128, 256, 512)
    c.vae.res_blocks = 3
    c.vae.factorized = False
    c.vae.latent_channels = 12
    c.vae.temporal_factor = 4
    c.vae.spatial_factor = 8
    c.vae.norm_groups = 32
    c.vae.tile_latents = 4
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 1000
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.999
    c.train.steps = 200_000
    c.train.log_every = 50
    c.train.ckpt_every = 2000
    c.mesh.data = -1
    return c
