"""The multi-stream DiT (mirage_jax/model/dit.py) in PyTorch, module for module, so the
state-dict names are the exported tensor names. Inputs are token streams as in
mirage_jax/model/tokens.py: x [B, N, D] (byte ids [B, N] for text), per-token time t [B, N],
positions (t, h, w) [B, N, 3], key mask [B, N]."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from mirage_jax.model.tokens import GROUPS, STREAM_OF, video_shape


@dataclasses.dataclass
class Stream:
    x: torch.Tensor
    t: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor

    def replace(self, **kw) -> "Stream":
        return dataclasses.replace(self, **kw)


def widths(cfg) -> dict[str, int]:
    m = cfg.model
    return {"video": m.video_width, "audio": m.audio_width, "text": m.text_width}


def _modulate(x, shift, scale):
    """Parameter-free LayerNorm (float32, eps 1e-6), then the adaLN scale and shift."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=1e-6).to(x.dtype) * (1 + scale) + shift


def rope(x, pos, freqs):
    """Rotates channel pairs (first half, second half) of x [B,N,H,D] by pos . freqs."""
    angles = torch.einsum("bnk,hfk->bnhf", pos.float(), freqs.float())
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


class StreamLayer(nn.Module):
    def __init__(self, cfg, width: int):
        super().__init__()
        m = cfg.model
        inner, hidden = m.num_heads * m.head_dim, int(width * m.mlp_ratio)
        self.mod = nn.Linear(m.time_dim, 6 * width)
        self.q, self.k, self.v = (nn.Linear(width, inner) for _ in range(3))
        self.q_norm = nn.RMSNorm(m.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(m.head_dim, eps=1e-6)
        self.o = nn.Linear(inner, width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def qkv(self, h, heads):
        split = lambda y: y.unflatten(-1, (heads, -1))  # noqa: E731
        q = self.q_norm(split(self.q(h)).float()).to(h.dtype)
        k = self.k_norm(split(self.k(h)).float()).to(h.dtype)
        return q, k, split(self.v(h))

    def mlp(self, h):
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class Block(nn.Module):
    """Per-stream projections around one joint self-attention over [ref, text, audio, video]."""

    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        self.heads = m.num_heads
        for name, width in widths(cfg).items():
            setattr(self, name, StreamLayer(cfg, width))
        self.rope_freqs = nn.Parameter(torch.zeros(m.num_heads, m.head_dim // 2, 3))

    def forward(self, xs: dict, cond: dict, pos: dict, key_mask):
        qs, ks, vs, mods = [], [], [], {}
        for g in GROUPS:
            layer = getattr(self, STREAM_OF[g])
            mods[g] = layer.mod(cond[g]).chunk(6, dim=-1)
            q, k, v = layer.qkv(_modulate(xs[g], mods[g][0], mods[g][1]), self.heads)
            qs.append(rope(q, pos[g], self.rope_freqs))
            ks.append(rope(k, pos[g], self.rope_freqs))
            vs.append(v)
        q, k, v = (torch.cat(a, dim=1).transpose(1, 2) for a in (qs, ks, vs))  # [B, H, N, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        out = out.transpose(1, 2).flatten(2)
        new = {}
        for g, o in zip(GROUPS, out.split([xs[g].shape[1] for g in GROUPS], dim=1)):
            layer = getattr(self, STREAM_OF[g])
            _, _, gate1, shift2, scale2, gate2 = mods[g]
            x = xs[g] + gate1 * layer.o(o)
            new[g] = x + gate2 * layer.mlp(_modulate(x, shift2, scale2))
        return new


class TimeEmbedding(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.model.time_dim
        self.dim = d
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
        args = (1000.0 * t.float())[..., None] * freqs
        emb = torch.cat([args.cos(), args.sin()], -1)
        return F.silu(self.fc2(F.silu(self.fc1(emb))))


class OutputHead(nn.Module):
    def __init__(self, cfg, width, dout):
        super().__init__()
        self.mod = nn.Linear(cfg.model.time_dim, 2 * width)
        self.proj = nn.Linear(width, dout)

    def forward(self, x, cond):
        shift, scale = self.mod(cond).chunk(2, dim=-1)
        return self.proj(_modulate(x, shift, scale)).float()


class DiT(nn.Module):
    """Streams in, velocities of the generated streams (audio, video) out."""

    def __init__(self, cfg):
        super().__init__()
        m, d = cfg.model, cfg.data
        self.cfg = cfg
        w = widths(cfg)
        patch_dim = m.patch * m.patch * video_shape(cfg)[3]
        self.video_in = nn.Linear(patch_dim, w["video"])
        self.audio_in = nn.Linear(d.audio_features, w["audio"])
        if m.text_encoder == "bytes":
            self.text_in = nn.Embedding(m.text_vocab, w["text"])
            self.text_pos = nn.Parameter(torch.zeros(d.text_len, w["text"]))
        else:
            self.text_in = nn.Linear(m.text_embed_dim, w["text"])
        self.time = TimeEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(m.depth))
        self.video_out = OutputHead(cfg, w["video"], patch_dim)
        self.audio_out = OutputHead(cfg, w["audio"], d.audio_features)

    def embed(self, streams: dict[str, Stream]) -> dict:
        text = self.text_in(streams["text"].x)
        if self.cfg.model.text_encoder == "bytes":
            text = text + self.text_pos[: text.shape[1]]
        return {"video": self.video_in(streams["video"].x), "ref": self.video_in(streams["ref"].x),
                "audio": self.audio_in(streams["audio"].x), "text": text}

    def forward(self, streams: dict[str, Stream]) -> dict[str, torch.Tensor]:
        cond = {g: self.time(s.t) for g, s in streams.items()}
        pos = {g: s.pos for g, s in streams.items()}
        key_mask = torch.cat([streams[g].mask.bool() for g in GROUPS], dim=1)
        xs = self.embed(streams)
        for block in self.blocks:
            xs = block(xs, cond, pos, key_mask)
        return {"video": self.video_out(xs["video"], cond["video"]),
                "audio": self.audio_out(xs["audio"], cond["audio"])}


def patchify(video, p: int):
    """[B, T, H, W, C] -> [B, T*(H/p)*(W/p), p*p*C], as mirage_jax.model.tokens.patchify."""
    b, t, h, w, c = video.shape
    x = video.reshape(b, t, h // p, p, w // p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t * (h // p) * (w // p), p * p * c)


def unpatchify(x, t: int, h: int, w: int, p: int):
    """Inverse of `patchify`: video tokens back to [B, t, h, w, C]."""
    b, c = x.shape[0], x.shape[-1] // (p * p)
    x = x.reshape(b, t, h // p, w // p, p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, h, w, c)
