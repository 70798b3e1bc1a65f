"""A plain PyTorch Mirage: the DiT, the VAE and the sampler, reading `mirage-jax export`
directories. State-dict names equal the exported tensor names, so loading is strict.

  from mirage_jax.torch import load_pretrained
  dit, cfg = load_pretrained("dit_export")       # eval mode, float32
  vae, vae_cfg = load_pretrained("vae_export")   # vae.latent_stats: the latent statistics

torch is imported only when a model is built (`pip install -e '.[torch]'`).
"""

from __future__ import annotations

import pathlib


def build(cfg):
    """The PyTorch module for a model config (`cfg.task`), randomly initialised."""
    if cfg.task == "dit":
        from mirage_jax.torch.dit import DiT

        return DiT(cfg)
    if cfg.task == "vae":
        from mirage_jax.torch.vae import VAE

        return VAE(cfg)
    raise ValueError(f"no PyTorch model for task '{cfg.task}'")


def load_state(model, path) -> None:
    """Loads an export's safetensors into `model`; missing, extra or misshapen tensors fail
    with their names before anything is copied."""
    from safetensors.torch import load_file

    from mirage_jax.export import weight_files
    from mirage_jax.train.checkpoint import CheckpointMismatch, shape_problems

    state = {}
    for fname in sorted(set(weight_files(path).values())):
        state.update(load_file(str(fname)))
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = shape_problems({k: tuple(v.shape) for k, v in state.items()}, wanted, "export")
    if problems:
        raise CheckpointMismatch(f"{path} does not fit its config:\n" + "\n".join(problems))
    model.load_state_dict(state, strict=True)


def load_pretrained(path):
    """(model in eval mode, its config) from an exported directory."""
    from mirage_jax.config import from_dict
    from mirage_jax.export import read_config

    meta = read_config(path)
    cfg = from_dict(meta["config"], str(path))
    model = build(cfg)
    load_state(model, pathlib.Path(path))
    model.latent_stats = meta.get("latent_stats")
    return model.eval(), cfg
