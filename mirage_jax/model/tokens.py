"""From a batch to token streams, and back.

A batch (what the data pipeline yields) holds, per example:
  video  [T, H, W, C] float: pixels in [-1, 1], or normalised VAE latents (`video_shape`)
  audio  [T, F]       audio features, feature frame k aligned with video frame k (with
                      latents, latent frame m with audio frames m*r .. m*r + r - 1)
  text   [L] int32    byte tokens (0 = pad)  -- or text_emb [L, D] precomputed
  ref    [H, W, C]    reference image (a frame from outside the target window)

Each becomes a `Stream`: tokens x [B, N, D], per-token diffusion time t [B, N],
positions [B, N, 3] as (t, h, w) in frames and patches, and a validity mask [B, N].
Audio tokens sit on the video's time axis (h = w = 0), so synchrony is a relative
position the attention sees. Text has no rotary position (its order comes from a
learned embedding in the text stream); the reference image sits at `model.ref_time`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# The joint sequence, in order. 'ref' is run by the video stream's weights.
GROUPS = ("ref", "text", "audio", "video")
STREAM_OF = {"ref": "video", "text": "text", "audio": "audio", "video": "video"}
GENERATED = ("audio", "video")  # groups the model can generate (they get a velocity head)

PAD, BOS, EOS = 0, 1, 2  # byte b is token b + 3


def rope_tables(pos, freqs):
    """cos and sin [B, N, H, D/2] of the rotary angles pos [B, N, 3] . freqs [H, D/2, 3]:
    the one place RoPE's angles are computed (`attention.rope`, the flash_cpu kernel)."""
    angles = jnp.einsum("bnk,hfk->bnhf", pos.astype(jnp.float32), freqs.astype(jnp.float32))
    return jnp.cos(angles), jnp.sin(angles)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Stream:
    x: jax.Array  # [B, N, D] values (int ids [B, N] for byte text)
    t: jax.Array  # [B, N] diffusion time per token (0 = clean data, 1 = noise)
    pos: jax.Array  # [B, N, 3] (time, row, column)
    mask: jax.Array  # [B, N] bool, False for padding / dropped conditions

    def replace(self, **kw) -> "Stream":
        return dataclasses.replace(self, **kw)


def encode_text(texts: list[str], length: int) -> np.ndarray:
    """UTF-8 bytes -> [B, length] token ids with BOS/EOS, truncated and 0-padded."""
    out = np.zeros((len(texts), length), np.int32)
    for i, s in enumerate(texts):
        ids = [BOS] + [b + 3 for b in s.encode("utf-8")][: length - 2] + [EOS]
        out[i, : len(ids)] = ids
    return out


def patchify(video: jax.Array, p: int) -> jax.Array:
    """[B, T, H, W, C] -> [B, T*(H/p)*(W/p), p*p*C], time-major then rows."""
    b, t, h, w, c = video.shape
    x = video.reshape(b, t, h // p, p, w // p, p, c)
    return x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, t * (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, t: int, h: int, w: int, p: int) -> jax.Array:
    """Inverse of `patchify`."""
    b, c = x.shape[0], x.shape[-1] // (p * p)
    x = x.reshape(b, t, h // p, w // p, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, h, w, c)


def token_motion(video: jax.Array, p: int) -> jax.Array:
    """[B, N] how much each video token changes from the previous frame (0 on the first),
    relative to the batch mean: the few tokens that move with speech are the mouth's."""
    change = jnp.abs(jnp.diff(video, axis=1, prepend=video[:, :1]))
    per_token = jnp.mean(patchify(change, p), axis=-1)
    return per_token / jnp.maximum(jnp.mean(per_token), 1e-6)


def grid_positions(t, h: int, w: int, t0: float = 0.0) -> np.ndarray:
    """[T*h*w, 3] (time, row, column) in the patchify order; `t` is a frame count or the
    frames' time coordinates."""
    times = np.arange(t) if np.ndim(t) == 0 else np.asarray(t)
    tt, hh, ww = np.meshgrid(times + t0, np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt, hh, ww], -1).reshape(-1, 3).astype(np.float32)


def video_shape(cfg) -> tuple[int, int, int, int]:
    """(T, H, W, C) of one example's video as the DiT's video stream sees it: pixel frames,
    or VAE latents (1 + k latent frames for 1 + k*r video frames, H/s x W/s, latent channels)."""
    d, v = cfg.data, cfg.vae
    if d.video == "pixels":
        return d.frames, d.height, d.width, d.channels
    s = v.spatial_factor
    return 1 + (d.frames - 1) // v.temporal_factor, d.height // s, d.width // s, v.latent_channels


def audio_frames(cfg) -> int:
    """Audio feature frames per example: one per video frame; with latents (1 + k) * r, so
    that each latent frame has r (the first one's r - 1 lie before the clip: silence)."""
    if cfg.data.video == "pixels":
        return cfg.data.frames
    return video_shape(cfg)[0] * cfg.vae.temporal_factor


def video_tokens_per_second(cfg, fps: float = 25.0) -> float:
    """Video tokens per second of video (the sequence cost of a longer generation)."""
    _, h, w, _ = video_shape(cfg)
    r = 1 if cfg.data.video == "pixels" else cfg.vae.temporal_factor
    return (h // cfg.model.patch) * (w // cfg.model.patch) * fps / r


def first_audio_frame(unit: int, r: int) -> int:
    """Audio frame where the audio of video unit `unit` starts: latent j codes the r frames up
    to j*r (latent 0 only frame 0, so its audio starts r - 1 frames before the clip); with
    pixels (r = 1) unit and frame coincide."""
    return (unit - 1) * r + 1


def video_times(cfg, n: int) -> np.ndarray:
    """Time coordinate (in video frames, on the audio's axis) of each of n video frames, or
    of n latent frames: latent m codes frames up to m*r + r - 1 of the audio window."""
    if cfg.data.video == "pixels":
        return np.arange(n, dtype=np.float32)
    r = cfg.vae.temporal_factor
    return (np.arange(n) * r + r - 1).astype(np.float32)

def batch_to_streams(batch: dict, cfg) -> dict[str, Stream]:
    """Clean token streams (t = 0) for every group of a batch."""
    m, p = cfg.model, cfg.model.patch
    video = batch["video"]
    b, nt, h, w, _ = video.shape

    def stream(x, pos, mask=None):
        n = x.shape[1]
        pos = jnp.broadcast_to(jnp.asarray(pos), (b, n, 3))
        mask = jnp.ones((b, n), bool) if mask is None else mask.astype(bool)
        return Stream(x=x, t=jnp.zeros((b, n), jnp.float32), pos=pos, mask=mask)

    streams = {
        "video": stream(patchify(video, p), grid_positions(video_times(cfg, nt), h // p, w // p)),
        "ref": stream(
            patchify(batch["ref"][:, None], p), grid_positions(1, h // p, w // p, t0=m.ref_time)
        ),
        "audio": stream(batch["audio"], grid_positions(batch["audio"].shape[1], 1, 1)),
    }
    text = batch["text_emb"] if m.text_encoder == "precomputed" else batch["text"]
    text_mask = batch["text"] != PAD if "text" in batch else jnp.ones(text.shape[:2], bool)
    streams["text"] = stream(text, np.zeros((text.shape[1], 3), np.float32), text_mask)
    return streams


def streams_to_video(x: jax.Array, cfg, frames: int) -> jax.Array:
    """Video tokens -> [B, frames, H, W, C] (pixels or latents, per `video_shape`)."""
    _, h, w, _ = video_shape(cfg)
    return unpatchify(x, frames, h, w, cfg.model.patch)
