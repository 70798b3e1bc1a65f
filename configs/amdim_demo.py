"""AMDIM on frames of the synthetic corpus: the image-mode judge (issue 7, musts 1-2).

  mirage-jax train --config configs/amdim_demo.py --workdir runs/amdim
  mirage-jax probe --checkpoint runs/amdim --data_dir data_dir --out runs/amdim/probe.json

Each step: 8 clips -> 3 consecutive frames and the clip's reference frame each (32 images)
-> two augmented views of each on the device -> multi-scale InfoNCE. Most negatives of a
frame are then the same speaker at other moments, which identity cannot tell apart: the
encoder has to code the mouth (with one frame per clip, identity alone solved the task
and the viseme probe fell below the random encoder's; README). The heads end in the
reference's batch norm (amdim.head_norm): with a LayerNorm instead the loss stayed at
chance and training erased the mouth from the features. The probe reads the local 5x5
features (amdim.probe_features = 'r5'): the global feature codes the speaker, not the mouth.
"""

from mirage_jax.config import base_config


def get_config():
    c = base_config()
    c.task = "amdim"
    c.data.dataset = "synthetic_aroll/small"
    c.data.data_dir = "data_dir"
    c.data.frames = 3
    c.data.height = 64
    c.data.width = 64
    c.data.global_batch = 8
    c.amdim.ndf = 32
    c.amdim.n_rkhs = 128
    c.amdim.crop_min_scale = 0.5  # the mouth is in both views more often
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.99
    c.train.steps = 500
    c.train.log_every = 20
    c.train.ckpt_every = 250
    return c
