"""Video latents for the DiT: a trained VAE, its latent statistics, and pixels <-> latents.

    VAE run (task='vae')   every checkpoint also stores `latent_stats`: per-channel mean and
                           std of the posterior means (EMA weights) and held-out PSNR
    Codec(run_dir)         the VAE from its checkpoint: encode pixels to normalised latents
                           (what the DiT sees), decode them back, turn a pixel batch into a
                           latent batch (data.video='encode')
    `mirage-jax encode`    writes a dataset of cached latents (mirage_jax/data/latent_dataset.py)

Normalised means (z - mean) / std per channel: the DiT's rectified flow starts from unit
Gaussian noise, so its data should have unit scale too.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from flax import nnx

from mirage_jax import sharding
from mirage_jax.model.vae import VAE, to_signed

# ----------------------------------------------------------------------------- measuring a VAE


OPEN = 0.1  # synthetic_aroll's mouth_open at or above which a frame's mouth counts as open


def mouth_box(record: dict, size: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) pixels of the lower third of the face, where lip sync lives.

    A synthetic_aroll record knows its speaker, hence the face ellipse (plus the head's
    largest sway); other footage falls back to the lower third of the frame, centre half."""
    if "speaker_id" in record:
        from mirage_jax.data.face import Speaker

        spk = Speaker.sample(int(record["speaker_id"]))
        ry, rx, sway = spk.face_scale, spk.face_scale * spk.face_aspect, 0.03
        y0, y1 = 0.45 + ry / 3 - sway, 0.45 + ry + sway
        x0, x1 = 0.5 - rx - sway, 0.5 + rx + sway
    else:
        y0, y1, x0, x1 = 2 / 3, 1.0, 0.25, 0.75
    clip = lambda v: int(np.clip(round(v * size), 0, size))  # noqa: E731
    return clip(y0), clip(y1), clip(x0), clip(x1)


def heldout_psnr(model: VAE, cfg, max_clips: int = 64, batch: int = 4) -> dict:
    """Reconstruction PSNR (posterior mean, clipped to [-1, 1]) over whole clips of the test
    split (1 + k*r frames each), and over the mouth box alone; one MSE over all pixels.

    The mouth is also split into the first frame (a latent frame of its own) and the rest
    (r frames per latent frame), and the rest by the corpus's mouth opening where a record
    has one: closed (< OPEN) and open. Every synthetic clip starts in silence, mouth closed,
    so the first frame only measures what temporal compression costs the lips against the
    rest's closed frames; the open mouth (teeth, dark interior) is the hard part."""
    d = cfg.data
    source = tfds.data_source(d.dataset, data_dir=d.data_dir)["test"]
    recon = nnx.jit(lambda m, x: jnp.clip(m.decode_tiled(m.encode_tiled(x)[0]), -1.0, 1.0))
    n = min(len(source), max_clips)
    err, count, opened = 0.0, 0, True  # opened: every record has its mouth_open
    mouth = np.zeros((3, 2))  # [first frame, the rest closed, the rest open] x [sq. err, count]
    for i0 in range(0, n, batch):
        records = [source[i] for i in range(i0, min(n, i0 + batch))]
        t = 1 + (len(records[0]["video"]) - 1) // model.r * model.r
        x = to_signed(jnp.asarray(np.stack([r["video"][:t] for r in records])))
        sq = np.square(np.asarray(recon(model, x) - x) / 2.0)  # on the [0, 1] scale
        err, count = err + sq.sum(), count + sq.size
        for j, r in enumerate(records):
            y0, y1, x0, x1 = mouth_box(r, x.shape[2])
            m = sq[j, :, y0:y1, x0:x1]
            opened &= "mouth_open" in r
            opening = np.asarray(r.get("mouth_open", np.zeros(t)))[:t]
            rest_open = opening[1:] >= OPEN
            for k, frames in enumerate((m[:1], m[1:][~rest_open], m[1:][rest_open])):
                mouth[k] += frames.sum(), frames.size
    db = lambda e, c: float(10 * np.log10(1.0 / max(e / max(c, 1), 1e-12)))  # noqa: E731
    out = {"psnr_test": db(err, count), "psnr_mouth_test": db(*mouth.sum(0)),
           "psnr_mouth_first_test": db(*mouth[0]), "psnr_mouth_rest_test": db(*mouth[1:].sum(0)),
           "test_clips": n}
    if opened and mouth[2, 1]:
        out["psnr_mouth_closed_test"], out["psnr_mouth_open_test"] = db(*mouth[1]), db(*mouth[2])
    return out


def vae_report(cfg, model: VAE, batches) -> dict:
    """What a VAE checkpoint stores next to its weights (the `latent_stats` item):
    per-channel mean/std of posterior means over `batches`, and held-out PSNR."""
    encode = nnx.jit(lambda m, x: m.encode(x)[0])
    total, total_sq, count = 0.0, 0.0, 0
    for b in batches:
        z = np.asarray(encode(model, to_signed(jnp.asarray(b["video"]))), np.float64)
        z = z.reshape(-1, z.shape[-1])
        total, total_sq, count = total + z.sum(0), total_sq + np.square(z).sum(0), count + len(z)
    if not count:
        raise ValueError("vae_report needs at least one batch")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    out = {"mean": mean.tolist(), "std": std.tolist(), "latents_measured": int(count)}
    return {**out, **heldout_psnr(model, cfg)}


def report_batches(cfg, n: int = 8):
    """The first `n` batches of the training split, read apart from the training iterator."""
    from mirage_jax.data.pipeline import GrainSource

    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data.workers = 0
    source = GrainSource(cfg)
    return [next(source) for _ in range(n)]


# ----------------------------------------------------------------------------- the codec


class Codec:
    """A trained VAE (EMA weights) with its latent statistics, loaded from its run directory,
    sharded over `mesh` (default: all devices, parameters replicated)."""

    def __init__(self, run_dir, mesh=None, step: int | None = None):
        from mirage_jax.train.checkpoint import load_run

        self.run_dir = pathlib.Path(run_dir).absolute()
        mesh = mesh or sharding.data_mesh()
        run = load_run(run_dir, mesh, "ema", step)
        self.cfg, self.step, where = run["cfg"], run["step"], run["where"]
        if self.cfg.task != "vae":
            raise ValueError(f"{where} is a '{self.cfg.task}' checkpoint, not a VAE")
        stats = run["latent_stats"]
        if stats is None:
            raise ValueError(f"{where} has no latent_stats (saved by VAE training)")
        self.report, self.mesh = stats, mesh
        self.graphdef, self.params = run["graphdef"], run["params"]
        self.mean = jnp.asarray(stats["mean"], jnp.float32)
        self.std = jnp.asarray(stats["std"], jnp.float32)
        self.r, self.s = self.cfg.vae.temporal_factor, self.cfg.vae.spatial_factor
        self._encode = jax.jit(self._encode_fn)
        self._decode = jax.jit(self._decode_fn)

    def _encode_fn(self, params, video):
        m = nnx.merge(self.graphdef, params)
        return (m.encode_tiled(to_signed(video))[0] - self.mean) / self.std

    def _decode_fn(self, params, z):
        m = nnx.merge(self.graphdef, params)
        return jnp.clip(m.decode_tiled(z * self.std + self.mean), -1.0, 1.0)

    def encode(self, video) -> jax.Array:
        """[B, 1 + k*r, H, W, 3] (uint8 or [-1, 1]) -> normalised latents [B, 1 + k, h, w, C]."""
        return self._encode(self.params, video)

    def decode(self, z) -> jax.Array:
        """Normalised latents -> video in [-1, 1] (tiled in time, exact)."""
        return self._decode(self.params, z)

    def check(self, cfg) -> None:
        """The DiT config must describe this VAE (its factors and channels shape the tokens)."""
        for key in ("temporal_factor", "spatial_factor", "latent_channels"):
            if cfg.vae[key] != self.cfg.vae[key]:
                raise ValueError(
                    f"config vae.{key}={cfg.vae[key]} but the VAE at {cfg.vae_checkpoint} "
                    f"has {self.cfg.vae[key]}")

    def latent_batch(self, batch: dict) -> dict:
        """A pixel batch (data.video='encode': video of 1 + k*r frames, audio of (1 + k)*r)
        -> the batch the DiT trains on: video and ref as normalised latents."""
        out = dict(batch)
        out["video"] = self.encode(batch["video"])
        out["ref"] = self.encode(batch["ref"][:, None])[:, 0]
        return out

