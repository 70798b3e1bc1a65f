"""The demo's DiT without its audio stream: a silent (text/reference-image -> video) model.

  mirage-jax train --config configs/demo_silent.py --workdir runs/silent
  mirage-jax train --config configs/demo.py --workdir runs/stitched \
      --config.init_from=runs/silent --config.model.stitch="('audio',)" \
      --config.train.warmup_new_steps=50

The second command stitches the audio stream into it (mirage_jax/train/stitch.py);
`mirage-jax stitch-experiment` runs both against training the audio model from scratch.
"""

import pathlib

from mirage_jax.config import load_file


def get_config():
    c = load_file(pathlib.Path(__file__).with_name("demo.py"))
    c.model.audio = False  # no audio stream, tokens or head; the task mix is text/ref -> video
    return c
