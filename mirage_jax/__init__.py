"""mirage_jax: Mirage (audio-to-video multi-stream diffusion transformer) in JAX/Flax NNX.

Data path, one stage per file:
  configs/*.py -> mirage_jax/config.py -> mirage_jax/data/ -> mirage_jax/model/tokens.py
  -> mirage_jax/model/dit.py -> mirage_jax/flow.py -> mirage_jax/train/step.py
  -> mirage_jax/train/loop.py -> mirage_jax/train/checkpoint.py
"""

from flax import nnx

# Parameters carry logical axis names only; mirage_jax/sharding.py maps them to the mesh.
nnx.use_eager_sharding(False)

__version__ = "0.1.0"
