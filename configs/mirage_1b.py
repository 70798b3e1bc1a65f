"""Mirage at 1B parameters: the 10B config (`configs/mirage_10b.py`) at half the widths
(visual 1536 = 12 heads of 128, audio and text 768, time 256) and 20 blocks, on the same
720p latents and the same 97,560-token sequence of 4 s. For ablations before the 10B run.

  mirage-jax plan --config configs/mirage_1b.py --mesh fsdp=8 --chips h100
"""

import pathlib

from mirage_jax.config import load_file


def get_config():
    c = load_file(pathlib.Path(__file__).with_name("mirage_10b.py"))
    m = c.model
    m.depth = 20
    m.num_heads = 12
    m.video_width = 1536
    m.audio_width = 768
    m.text_width = 768
    m.time_dim = 256
    c.optim.lr = 2e-4
    c.optim.ema_decay = 0.9995
    return c
