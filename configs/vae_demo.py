"""The demo's video VAE: 64x64 clips at 25 fps -> 8x8x64 latents, 4x in time (17 -> 5 frames).

  mirage-jax prepare --dataset synthetic_aroll/small --data_dir data_dir
  mirage-jax train --config configs/vae_demo.py --workdir runs/vae
  mirage-jax encode --vae runs/vae --dataset synthetic_aroll/small --data_dir data_dir

Every checkpoint stores the latent statistics and the held-out PSNR (whole frame and the
mouth box); the training log prints them. The lower face counts 5x in the reconstruction
loss (vae.mouth_weight = 4): the open mouth is where the error was (README). The shipped
demo_assets/vae_demo/ is an earlier run of this file with 16 channels and no mouth weight.
"""

from mirage_jax.config import base_config


def get_config():
    c = base_config()
    c.task = "vae"
    c.data.dataset = "synthetic_aroll/small"
    c.data.data_dir = "data_dir"
    c.data.workers = 1
    c.data.frames = 17  # 1 + 4 * 4
    c.data.height = 64
    c.data.width = 64
    c.data.global_batch = 8
    c.vae.latent_channels = 64
    c.vae.mouth_weight = 4.0
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.99
    c.train.steps = 3000
    c.train.log_every = 50
    c.train.ckpt_every = 250
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
