"""The DiT on cached VAE latents: 64x64 video as 8x8x16 latents in 2x2 patches.

  mirage-jax train --config configs/vae_demo.py --workdir runs/vae
  mirage-jax encode --vae runs/vae --dataset synthetic_aroll/small --data_dir data_dir
  mirage-jax train --config configs/latent_demo.py --workdir runs/dit

A window of 17 frames (0.68 s) is 5 latent frames of 16 tokens; its audio is 20 log-mel
frames (4 per latent frame, the first 3 before the clip). For on-the-fly encoding instead of
the cache: --config.data.video=encode --config.data.dataset=synthetic_aroll/small
--config.vae_checkpoint=runs/vae.
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
    c.model.patch = 2
    c.data.video = "latents"
    c.data.dataset = "mirage_latents/synthetic_aroll_small"
    c.data.data_dir = "data_dir"
    c.data.workers = 1
    c.data.frames = 17  # 1 + 4 * 4 video frames -> 5 latent frames
    c.data.height = 64
    c.data.width = 64
    c.data.audio_features = 32
    c.data.text_len = 48
    c.data.global_batch = 8
    c.vae.latent_channels = 16  # must match the VAE (checked against the cached latents)
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.train.steps = 1000
    c.train.log_every = 25
    c.train.ckpt_every = 250
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
