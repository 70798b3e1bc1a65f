"""The causal 3D VAE (mirage_jax/model/vae.py) in PyTorch, layer for layer (the same layer
indices, so the state-dict names are the exported tensor names). Videos and latents are
channels-last as in JAX, [B, T, H, W, C]; inside, activations are [B, C, T, H, W]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mirage_jax.model.vae import _kernels, geometry


class CausalConv3d(nn.Module):
    """Past-side padding in time by repeating the first frame; 'same'-style in space."""

    def __init__(self, cin, cout, kernel, stride=(1, 1, 1)):
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel), tuple(stride)
        self.weight = nn.Parameter(torch.zeros(cout, cin, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        kt, kh, kw = self.kernel_size
        _, sh, sw = self.stride
        if kt > 1:
            x = torch.cat([x[:, :, :1].expand(-1, -1, kt - 1, -1, -1), x], dim=2)
        ph, pw = max(kh - sh, 0), max(kw - sw, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv3d(x, self.weight, self.bias, self.stride)


class FrameNorm(nn.Module):
    """GroupNorm of each frame on its own (eps 1e-6)."""

    def __init__(self, cfg, channels):
        super().__init__()
        self.groups = math.gcd(cfg.vae.norm_groups, channels)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        y = F.group_norm(y.float(), self.groups, self.weight, self.bias, eps=1e-6)
        return y.reshape(b, t, c, h, w).transpose(1, 2).to(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, cfg, cin, cout):
        super().__init__()
        k1, k2 = _kernels(cfg)
        self.norm1, self.conv1 = FrameNorm(cfg, cin), CausalConv3d(cin, cout, k1)
        self.norm2, self.conv2 = FrameNorm(cfg, cout), CausalConv3d(cout, cout, k2)
        self.skip = CausalConv3d(cin, cout, (1, 1, 1)) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class DepthToTime(nn.Module):
    """Channels (st, sh, sw, C) -> C at st x sh x sw the resolution, the first st - 1
    frames dropped (latent frame 0 codes one frame)."""

    def __init__(self, factors):
        super().__init__()
        self.factors = tuple(factors)

    def forward(self, x):
        st, sh, sw = self.factors
        b, c, t, h, w = x.shape
        x = x.reshape(b, st, sh, sw, c // (st * sh * sw), t, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
        return x.reshape(b, -1, t * st, h * sh, w * sw)[:, :, st - 1:]


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.patch, strides = geometry(cfg)
        w, k = list(cfg.vae.widths), _kernels(cfg)[0]
        layers = [CausalConv3d(3 * self.patch ** 2, w[0], k)]
        for i, width in enumerate(w):
            layers += [ResBlock(cfg, width, width) for _ in range(cfg.vae.res_blocks)]
            if i + 1 < len(w):
                s = (strides[i], 2, 2)
                layers.append(CausalConv3d(width, w[i + 1], s, s))
        self.layers = nn.ModuleList(layers)
        self.norm = FrameNorm(cfg, w[-1])
        self.out = CausalConv3d(w[-1], 2 * cfg.vae.latent_channels, k)

    def forward(self, x):
        b, t, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, t, h // p, p, w // p, p, c).permute(0, 3, 5, 6, 1, 2, 4)
        h = x.reshape(b, p * p * c, t, h // p, w // p)  # space to depth: (row, column, C)
        for layer in self.layers:
            h = layer(h)
        return self.out(F.silu(self.norm(h))).float()


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.patch, strides = geometry(cfg)
        w, k = list(cfg.vae.widths), _kernels(cfg)[0]
        layers = [CausalConv3d(cfg.vae.latent_channels, w[-1], k)]
        for i in reversed(range(len(w))):
            layers += [ResBlock(cfg, w[i], w[i]) for _ in range(cfg.vae.res_blocks)]
            if i > 0:
                f = (strides[i - 1], 2, 2)
                layers.append(CausalConv3d(w[i], w[i - 1] * math.prod(f), (1, 1, 1)))
                layers.append(DepthToTime(f))
        self.layers = nn.ModuleList(layers)
        self.norm = FrameNorm(cfg, w[0])
        self.out = CausalConv3d(w[0], 3 * self.patch ** 2, k)

    def forward(self, z):
        h = z
        for layer in self.layers:
            h = layer(h)
        h = self.out(F.silu(self.norm(h)))
        return DepthToTime((1, self.patch, self.patch))(h).float()


class Critic(nn.Module):
    """The training-only patch critic (`vae.adversarial_weight`), kept so the state dict and
    the round trip stay complete."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.layers = nn.ModuleList([
            CausalConv3d(3, width, (3, 4, 4), (1, 2, 2)),
            CausalConv3d(width, 2 * width, (3, 4, 4), (1, 2, 2)),
            CausalConv3d(2 * width, 1, (1, 3, 3))])

    def forward(self, x):
        x = x.permute(0, 4, 1, 2, 3)
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else F.leaky_relu(x, 0.2))
        return x.permute(0, 2, 3, 4, 1).float()


class VAE(nn.Module):
    """`encode(video) -> (mean, logvar)`, `decode(z) -> video`, channels-last like JAX."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        if cfg.vae.adversarial_weight:
            self.critic = Critic()

    def encode(self, x):
        """x [B, 1 + k*r, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, 1 + k, h, w, C]."""
        mean, logvar = self.encoder(x).permute(0, 2, 3, 4, 1).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """z [B, 1 + k, h, w, C] -> video [B, 1 + k*r, H, W, 3] (not clipped)."""
        return self.decoder(z.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)

    def forward(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)
