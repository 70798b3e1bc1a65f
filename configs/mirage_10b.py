"""Mirage at paper scale: 10B parameters, 48 blocks, Mochi's widths (visual 3072, 24 heads
of 128, MLP 4x; audio and text streams 1536), on cached latents of `configs/vae_720p.py`.

Sequence, for one 4 s window of 720p at 25 fps: 101 frames -> 1 + 25 latent frames of
90x160 (VAE 4x in time, 8x8 in space) -> 2x2 patches of 45x80 = 3,600 tokens per latent
frame, 93,600 video tokens (Mochi's 6x time factor would give 1 + 17 latent frames: 64,800;
the issue's 72,000 is 20 latent frames), + 3,600 reference-image tokens + 104 audio frames
(4 per latent frame) + 256 text tokens = 97,560 tokens per example. The [N, N] logits of
`model.attention=xla` would be 0.9 TB per layer and example, so attention is blockwise
(any backend; `splash` on TPU, `cudnn` on GPU) and every block is rematerialised.

Text: 256 byte tokens through the learned text stream (T5-XXL embeddings, as in the paper,
need `model.text_encoder=precomputed` and a dataset that stores them). Time embedding 512
wide: it feeds every stream's adaLN (6 x width outputs each), which at 3072 would add 4.6B.

  mirage-jax encode --vae gs://bucket/vae_720p --dataset <720p A-roll dataset> \\
      --data_dir <its data_dir> --audio-features 80
  mirage-jax plan --config configs/mirage_10b.py --mesh fsdp=128 --chips v5p,h100
"""

import pathlib

from mirage_jax.config import load_file


def get_config():
    c = load_file(pathlib.Path(__file__).with_name("vae_720p.py"))  # data and VAE geometry
    c.task = "dit"
    m = c.model
    m.depth = 48
    m.num_heads = 24
    m.head_dim = 128
    m.mlp_ratio = 4.0
    m.video_width = 3072
    m.audio_width = 1536
    m.text_width = 1536
    m.time_dim = 512
    m.patch = 2
    m.rope_theta = 10_000.0
    m.dtype = "bfloat16"
    m.remat = "full"
    m.attention = "blockwise"
    m.attention_block = 512
    c.data.video = "latents"
    c.data.dataset = "mirage_latents/aroll_720p"  # written by `mirage-jax encode`
    c.data.frames = 101  # 4 s at 25 fps: 1 + 25 * 4
    c.data.audio_features = 80
    c.data.text_len = 256
    c.data.global_batch = 256
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.1
    c.optim.ema_decay = 0.9999
    c.train.steps = 500_000
    c.train.log_every = 20
    c.train.ckpt_every = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
