"""The audio-visual sync judge on the synthetic corpus (issue 7, musts 3-5).

  mirage-jax train --config configs/sync_demo.py --workdir runs/sync --config.data.data_dir=DATA
  mirage-jax sync-calibrate --checkpoint runs/sync --data_dir DATA --out runs/sync/calibration.json

Each step: 8 whole clips (50 frames, 46 windows of 5 frames each) -> the mouth box of every
frame and the log-mel of every audio frame -> the embeddings of all 368 video and audio
windows -> InfoNCE where each window's positive competes with the other 7 clips' 322
windows and its own clip's windows 3..15 frames away (mirage_jax/amdim/sync.py). The video
of 3 in 4 clips is degraded first (sync.degrade_video: blur, 2x down-up sampling, lower
contrast, noise), so the judge also reads the washed-out mouths of VAE-decoded clips.
"""

from mirage_jax.config import base_config


def get_config():
    c = base_config()
    c.task = "sync"
    c.data.dataset = "synthetic_aroll/small"
    c.data.data_dir = "data_dir"
    c.data.frames = 50  # the whole clip: every window of it, and its shifted negatives
    c.data.height = 64
    c.data.width = 64
    c.data.audio_features = 32
    c.data.global_batch = 8
    c.sync.ndf = 16
    c.sync.width = 128
    c.sync.n_rkhs = 128
    # Video-only training degradation (sync.degrade_video), so the judge reads the washed-out
    # mouths of VAE-decoded clips too: 3 of 4 clips blurred (sigma ~ U(0, 2) px; the shipped
    # VAE's decodes match sigma ~1), half of those also 2x down-up sampled, contrast down by
    # up to 20 %, pixel noise up to std 0.08.
    c.sync.degrade = 0.75
    c.sync.degrade_blur = 2.0
    c.sync.degrade_down = (1, 2)
    c.sync.degrade_contrast = 0.2
    c.sync.degrade_noise = 0.08
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.99
    c.train.steps = 600
    c.train.log_every = 20
    c.train.ckpt_every = 200
    return c
