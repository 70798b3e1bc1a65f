"""Cached VAE latents as a TFDS dataset: `mirage-jax encode` writes one, grain reads it.

Encoding once and training many times on the result is how a latent DiT is trained at
scale: the VAE's forward pass is paid per clip, not per step. Each record of the source
dataset becomes
  latents        [1 + k, h, w, C]  the clip's first 1 + k*r frames, normalised with the
                                   VAE's statistics (what the DiT's video stream sees)
  frame_latents  [T, h, w, C]      every frame coded as a still (reference images)
  audio_features [T, M]            log-mel, one row per video frame (pipeline.log_mel)
  caption, clip_id, and per-frame mouth_open / viseme and speaker_id when the source has them.
`mirage_latents.json` next to the shards names the VAE and its factors, so a config that
does not fit the cached latents is refused before training starts.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mirage_jax.data.pipeline import log_mel

META = "mirage_latents.json"


@dataclasses.dataclass
class LatentsConfig(tfds.core.BuilderConfig):
    source: str = ""  # TFDS name of the pixel dataset
    source_dir: str = ""
    height: int = 64
    width: int = 64
    latent_shape: tuple = (8, 8, 16)  # h, w, C
    temporal_factor: int = 4
    audio_features: int = 32


class MirageLatents(tfds.core.GeneratorBasedBuilder):
    """VAE latents of another dataset (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [LatentsConfig(name="default")]

    def __init__(self, *, codec=None, batch: int = 8, **kwargs):
        self._codec, self._batch = codec, batch
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        c, tensor = self.builder_config, tfds.features.Tensor
        h, w, ch = c.latent_shape
        features = {
            "latents": tensor(shape=(None, h, w, ch), dtype=np.float32, encoding="bytes"),
            "frame_latents": tensor(shape=(None, h, w, ch), dtype=np.float32, encoding="bytes"),
            "audio_features": tensor(shape=(None, c.audio_features), dtype=np.float32),
            "caption": tfds.features.Text(),
            "clip_id": tfds.features.Text(),
            "mouth_open": tensor(shape=(None,), dtype=np.float32),
            "viseme": tensor(shape=(None,), dtype=np.int32),
            "speaker_id": tensor(shape=(), dtype=np.int32),
        }
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features), description=__doc__)

    def _split_generators(self, dl_manager):
        src = tfds.data_source(self.builder_config.source, data_dir=self.builder_config.source_dir)
        return {split: self._generate_examples(src[split]) for split in src}

    def _generate_examples(self, source):
        c, codec = self.builder_config, self._codec
        for i0 in range(0, len(source), self._batch):
            records = [source[i] for i in range(i0, min(len(source), i0 + self._batch))]
            n = len(records[0]["video"])
            if any(len(r["video"]) != n for r in records):
                records = records[:1]  # clips of different lengths: one at a time
            t = 1 + (n - 1) // c.temporal_factor * c.temporal_factor
            video = np.stack([r["video"] for r in records])
            latents = np.asarray(codec.encode(video[:, :t]))
            stills = np.asarray(codec.encode(video.reshape(-1, 1, *video.shape[2:])))
            stills = stills.reshape(len(records), n, *stills.shape[2:])
            for j, r in enumerate(records):
                if "audio_features" in r:
                    audio = np.asarray(r["audio_features"], np.float32)
                else:
                    audio = log_mel(r["audio"], 0, n, c.audio_features)
                ex = {
                    "latents": latents[j],
                    "frame_latents": stills[j],
                    "audio_features": audio,
                    "caption": _text(r.get("caption", b"")),
                    "clip_id": _text(r.get("clip_id", f"{i0 + j}")),
                    "mouth_open": np.asarray(r.get("mouth_open", np.zeros(n)), np.float32),
                    "viseme": np.asarray(r.get("viseme", np.zeros(n)), np.int32),
                    "speaker_id": np.int32(r.get("speaker_id", -1)),
                }
                yield ex["clip_id"], ex


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def dataset_name(source: str) -> str:
    return "mirage_latents/" + source.replace("/", "_")


def encode(codec, source: str, source_dir: str, out_dir: str, audio_features: int = 32,
           batch: int = 8) -> dict:
    """Writes the latents of every split of `source` under `out_dir`; returns a summary with
    the dataset name to put in a config's `data.dataset`."""
    src = tfds.data_source(source, data_dir=source_dir)
    first = next(iter(src.values()))[0]
    height, width = first["video"].shape[1:3]
    if height % codec.s or width % codec.s:
        raise ValueError(f"{source}: frames of {height}x{width} do not divide by the VAE's "
                         f"spatial factor {codec.s}")
    name = dataset_name(source)
    config = LatentsConfig(
        name=name.split("/", 1)[1], source=source, source_dir=str(source_dir), height=height,
        width=width, latent_shape=(height // codec.s, width // codec.s,
                                   codec.cfg.vae.latent_channels),
        temporal_factor=codec.r, audio_features=audio_features,
        description=f"VAE latents of {source}")
    builder = MirageLatents(config=config, data_dir=out_dir, file_format="array_record",
                            codec=codec, batch=batch)
    builder.download_and_prepare()
    meta = {
        "source": source, "vae": str(codec.run_dir), "vae_step": codec.step,
        "temporal_factor": codec.r, "spatial_factor": codec.s,
        "latent_channels": codec.cfg.vae.latent_channels, "height": height, "width": width,
        "audio_features": audio_features, "latent_mean": codec.report["mean"],
        "latent_std": codec.report["std"],
    }
    (pathlib.Path(builder.data_dir) / META).write_text(json.dumps(meta, indent=1))
    return {"dataset": name, "data_dir": str(out_dir),
            "splits": {k: v.num_examples for k, v in builder.info.splits.items()}, **meta}


def check_fits(cfg, data_dir: str) -> None:
    """A config training on cached latents must match how they were made."""
    path = pathlib.Path(data_dir) / META
    if not path.is_file():
        raise ValueError(f"{data_dir} has no {META}: not written by `mirage-jax encode`")
    meta = json.loads(path.read_text())
    d, v = cfg.data, cfg.vae
    wanted = {"temporal_factor": v.temporal_factor, "spatial_factor": v.spatial_factor,
              "latent_channels": v.latent_channels, "height": d.height, "width": d.width,
              "audio_features": d.audio_features}
    bad = [f"{k}: latents have {meta[k]}, config has {w}" for k, w in wanted.items()
           if meta[k] != w]
    if bad:
        raise ValueError(f"dataset '{d.dataset}' (encoded by {meta['vae']}) does not fit the "
                         f"config: " + "; ".join(bad))
