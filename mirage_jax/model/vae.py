"""Causal 3D convolutional VAE: video [B, 1 + k*r, H, W, 3] <-> latents [B, 1 + k, H/s, W/s, C].

Causal in time so a clip's first frame is coded on its own (a still image is a one-frame
video) and latent frame j sees only video frames up to j*r: every temporal convolution
pads on the past side only, by repeating the first frame, and a strided convolution with
stride r over 1 + k*r frames gives exactly 1 + k outputs. The decoder mirrors this with
depth-to-time (each latent frame unfolds into r frames, the first into one).

Because nothing looks ahead, a long clip is coded in temporal tiles that are *exact*: each
tile is preceded by just enough context (computed from the layer list) that the frames it
keeps are the same as coding the whole clip at once. Normalisation is per frame for the
same reason.

Space: a 2x2 (or larger) patchify in and out, then stride-2 levels, one per extra width, so
the expensive full-resolution convolutions are avoided (a CPU can train it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mirage_jax.model.dit import DTYPES


def vae_defaults() -> dict:
    """Every key of the `vae` config group with its default."""
    return dict(
        widths=(32, 64, 128),  # channels per level; level i is at H / (patch * 2**i)
        res_blocks=1,  # residual blocks per level (encoder and decoder)
        factorized=True,  # (2+1)D convolutions (spatial 1x3x3, temporal 3x1x1) in blocks, in/out
        latent_channels=8,
        temporal_factor=4,  # r: 1 + k*r frames -> 1 + k latent frames
        spatial_factor=8,  # = patch * 2**(len(widths) - 1)
        norm_groups=8,
        kl_weight=1e-6,  # on the KL in nats per latent element
        l1_weight=1.0,
        l2_weight=1.0,
        edge_weight=0.0,  # L1 of spatial finite differences (sharper edges); 0 = off
        motion_weight=0.0,  # extra weight on pixels that change between frames (lips); 0 = off
        mouth_weight=0.0,  # extra weight on pixels inside `mouth_region`; 0 = off
        # (y0, y1, x0, x1) as fractions of the frame: where the lower face lies in every clip
        # (the synthetic corpus: the union of its speakers' mouth boxes, latents.mouth_box)
        mouth_region=(0.5, 0.75, 0.23, 0.77),
        adversarial_weight=0.0,  # hinge GAN term from a spatio-temporal patch critic; 0 = off
        tile_latents=8,  # latent frames produced per temporal tile
        tile_context=-1,  # latent frames of context before a tile; -1 = the exact minimum
    )


# ----------------------------------------------------------------------------- layers


class CausalConv3d(nnx.Module):
    """3D convolution padded on the past side in time (first frame repeated)."""

    def __init__(self, cfg, cin, cout, kernel, stride=(1, 1, 1), names=("embed", "mlp"), *,
                 rngs, zero=False):
        m = cfg.model
        self.kernel_size, self.stride = tuple(kernel), tuple(stride)
        self.dtype = DTYPES[m.dtype]
        init = nnx.initializers.zeros_init() if zero else nnx.initializers.lecun_normal()
        shape = (*self.kernel_size, cin, cout)
        self.kernel = nnx.Param(
            nnx.with_partitioning(init, (None, None, None) + tuple(names))(
                rngs.params(), shape, DTYPES[m.param_dtype]))
        self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), names[-1:])(
            rngs.params(), (cout,), DTYPES[m.param_dtype]))

    def __call__(self, x):
        # A sum over the temporal taps of 2D convolutions on frames folded into the batch:
        # XLA's CPU backend runs 2D convolutions several times faster than 3D ones.
        kt, kh, kw = self.kernel_size
        st, sh, sw = self.stride
        x = x.astype(self.dtype)
        if kt > 1:
            x = jnp.concatenate([jnp.repeat(x[:, :1], kt - 1, axis=1), x], axis=1)
        b, t = x.shape[0], (x.shape[1] - kt) // st + 1
        pad = [(max(k - s, 0) // 2, max(k - s, 0) - max(k - s, 0) // 2)
               for k, s in ((kh, sh), (kw, sw))]
        kernel = self.kernel[...].astype(self.dtype)
        y = 0.0
        for i in range(kt):
            frames = x[:, i:i + (t - 1) * st + 1:st]
            frames = frames.reshape(b * t, *frames.shape[2:])
            if (kh, kw, sh, sw) == (1, 1, 1, 1):
                y = y + frames @ kernel[i, 0, 0]
            else:
                y = y + jax.lax.conv_general_dilated(
                    frames, kernel[i], (sh, sw), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])

    def time_ops(self):
        return [("conv", self.kernel_size[0], self.stride[0])]


class FrameNorm(nnx.Module):
    """GroupNorm over (H, W, channel group) of each frame separately: no mixing in time."""

    def __init__(self, cfg, channels, rngs):
        self.groups = math.gcd(cfg.vae.norm_groups, channels)
        ones = nnx.with_partitioning(nnx.initializers.ones_init(), (None,))
        zeros = nnx.with_partitioning(nnx.initializers.zeros_init(), (None,))
        self.scale = nnx.Param(ones(rngs.params(), (channels,)))
        self.shift = nnx.Param(zeros(rngs.params(), (channels,)))

    def __call__(self, x):
        b, t, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, t, h, w, self.groups, c // self.groups)
        mu = g.mean((2, 3, 5), keepdims=True)
        var = jnp.square(g - mu).mean((2, 3, 5), keepdims=True)
        g = ((g - mu) * jax.lax.rsqrt(var + 1e-6)).reshape(x.shape)
        return (g * self.scale[...] + self.shift[...]).astype(x.dtype)


def _kernels(cfg):
    """(first, second) kernel of a residual block: 3x3x3 twice, or factorised (2+1)D,
    a spatial 1x3x3 then a temporal 3x1x1 (4.5x fewer FLOPs)."""
    return ((1, 3, 3), (3, 1, 1)) if cfg.vae.factorized else ((3, 3, 3), (3, 3, 3))


class ResBlock(nnx.Module):
    """Pre-norm residual block of two causal convolutions; the second starts at zero."""

    def __init__(self, cfg, cin, cout, rngs):
        k1, k2 = _kernels(cfg)
        self.norm1 = FrameNorm(cfg, cin, rngs)
        self.conv1 = CausalConv3d(cfg, cin, cout, k1, rngs=rngs)
        self.norm2 = FrameNorm(cfg, cout, rngs)
        self.conv2 = CausalConv3d(cfg, cout, cout, k2, rngs=rngs, zero=True)
        self.skip = CausalConv3d(cfg, cin, cout, (1, 1, 1), rngs=rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))

    def time_ops(self):
        return self.conv1.time_ops() + self.conv2.time_ops()


class DepthToTime(nnx.Module):
    """Channels (st, sh, sw, C) -> C at st x sh x sw the resolution; drops the st - 1 frames
    that latent frame 0 would unfold into before frame 0 (it codes one frame)."""

    def __init__(self, factors):
        self.factors = tuple(factors)

    def __call__(self, x):
        st, sh, sw = self.factors
        b, t, h, w, c = x.shape
        c //= st * sh * sw
        x = x.reshape(b, t, h, w, st, sh, sw, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(b, t * st, h * sh, w * sw, c)[:, st - 1:]

    def time_ops(self):
        return [("d2t", self.factors[0], 1)]


def _space_to_depth(x, p):
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, h // p, w // p, p * p * c)


def _time_strides(r: int, stages: int) -> list[int]:
    """Splits r into per-stage temporal strides, the small prime factors first (earliest
    stages downsample time, which is where the frames are largest)."""
    primes, n, f = [], r, 2
    while n > 1:
        while n % f == 0:
            primes.append(f)
            n //= f
        f += 1
    strides = [1] * max(stages, 1)
    for i, p in enumerate(primes):
        strides[min(i, len(strides) - 1)] *= p
    return strides


def geometry(cfg):
    """(patch, per-stage temporal strides) from the vae config, checked."""
    v = cfg.vae
    levels = len(v.widths)
    patch = v.spatial_factor // 2 ** (levels - 1)
    if patch < 1 or patch * 2 ** (levels - 1) != v.spatial_factor:
        raise ValueError(f"vae.spatial_factor={v.spatial_factor} must be a power-of-two "
                         f"multiple of 2**(len(vae.widths) - 1) = {2 ** (levels - 1)}")
    if levels == 1 and v.temporal_factor > 1:
        raise ValueError("vae.temporal_factor > 1 needs at least two vae.widths")
    return patch, _time_strides(v.temporal_factor, levels - 1)


# ----------------------------------------------------------------------------- encoder / decoder


class Encoder(nnx.Module):

    def __init__(self, cfg, rngs):
        v = cfg.vae
        self.patch, strides = geometry(cfg)
        w = list(v.widths)
        k = _kernels(cfg)[0]
        layers = [CausalConv3d(cfg, 3 * self.patch ** 2, w[0], k, names=("io", "embed"), rngs=rngs)]
        for i, width in enumerate(w):
            layers += [ResBlock(cfg, width, width, rngs) for _ in range(v.res_blocks)]
            if i + 1 < len(w):  # a strided 'patchify' convolution: kernel = stride
                s = (strides[i], 2, 2)
                layers.append(CausalConv3d(cfg, width, w[i + 1], s, s, rngs=rngs))
        self.layers = nnx.List(layers)
        self.norm = FrameNorm(cfg, w[-1], rngs)
        self.out = CausalConv3d(cfg, w[-1], 2 * v.latent_channels, k, names=("embed", "io"),
                                rngs=rngs)

    def __call__(self, x):
        h = _space_to_depth(x, self.patch)
        for layer in self.layers:
            h = layer(h)
        return self.out(nnx.silu(self.norm(h))).astype(jnp.float32)

    def time_ops(self):
        return [op for layer in self.layers for op in layer.time_ops()] + self.out.time_ops()


class Decoder(nnx.Module):

    def __init__(self, cfg, rngs):
        v = cfg.vae
        self.patch, strides = geometry(cfg)
        w = list(v.widths)
        k = _kernels(cfg)[0]
        layers = [CausalConv3d(cfg, v.latent_channels, w[-1], k, names=("io", "embed"), rngs=rngs)]
        for i in reversed(range(len(w))):
            layers += [ResBlock(cfg, w[i], w[i], rngs) for _ in range(v.res_blocks)]
            if i > 0:  # a pointwise projection, then depth-to-time/space
                f = (strides[i - 1], 2, 2)
                layers.append(CausalConv3d(cfg, w[i], w[i - 1] * math.prod(f), (1, 1, 1),
                                           rngs=rngs))
                layers.append(DepthToTime(f))
        self.layers = nnx.List(layers)
        self.norm = FrameNorm(cfg, w[0], rngs)
        self.out = CausalConv3d(cfg, w[0], 3 * self.patch ** 2, k, names=("embed", "io"), rngs=rngs)

    def __call__(self, z):
        h = z
        for layer in self.layers:
            h = layer(h)
        h = self.out(nnx.silu(self.norm(h)))
        return DepthToTime((1, self.patch, self.patch))(h).astype(jnp.float32)

    def time_ops(self):
        return [op for layer in self.layers for op in layer.time_ops()] + self.out.time_ops()


def _trace_ok(ops, pos):
    """Walks output position `pos` back through `ops`; False if any layer would read its
    padding (a position < 0) on the way, i.e. if a tile starting at 0 would be inexact."""
    for kind, k, s in reversed(ops):
        if kind == "conv":
            pos = s * pos - (k - 1)
            if pos < 0:
                return False
        else:  # depth-to-time by k: output q comes from input (q + k - 1) // k
            pos = (pos + k - 1) // k
    return True


# ----------------------------------------------------------------------------- the VAE


class VAE(nnx.Module):
    """`encode(x) -> (mean, logvar)`, `sample`, `decode(z)`, and exact temporal tiling."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        self.r = cfg.vae.temporal_factor
        self.s = cfg.vae.spatial_factor
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)
        if cfg.vae.adversarial_weight:
            self.critic = Critic(cfg, rngs)
        # Context (latent frames) a tile needs so its kept frames are exact.
        enc, dec = self.encoder.time_ops(), self.decoder.time_ops()
        self.enc_context = next(c for c in range(1000) if _trace_ok(enc, c))
        self.dec_context = next(c for c in range(1, 1000) if _trace_ok(dec, (c - 1) * self.r + 1))

    def latent_shape(self, video_shape):
        b, t, h, w, _ = video_shape
        return (b, 1 + (t - 1) // self.r, h // self.s, w // self.s, self.cfg.vae.latent_channels)

    def encode(self, x):
        """x [B, 1 + k*r, H, W, 3] in [-1, 1] -> posterior (mean, logvar), each [B, 1+k, h, w, C]."""
        t, h, w = x.shape[1:4]
        if (t - 1) % self.r or h % self.s or w % self.s:
            raise ValueError(f"video of {t} frames of {h}x{w}: need 1 + k*{self.r} frames "
                             f"and sides divisible by {self.s}")
        mean, logvar = jnp.split(self.encoder(x), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    @staticmethod
    def sample(key, mean, logvar):
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    def decode(self, z):
        """z [B, 1 + k, h, w, C] -> video [B, 1 + k*r, H, W, 3] (not clipped)."""
        return self.decoder(z)

    def __call__(self, x, key=None):
        mean, logvar = self.encode(x)
        z = mean if key is None else self.sample(key, mean, logvar)
        return self.decode(z), mean, logvar

    def _tiles(self, n, tile, context):
        """(start with context, first kept, end) latent indices of each tile."""
        for j0 in range(0, n, tile):
            yield max(0, j0 - context), j0, min(n, j0 + tile)

    def encode_tiled(self, x, tile_latents=None, context=None):
        """`encode` over temporal tiles of `tile_latents` latent frames, each preceded by
        `context` latent frames of video (default: the exact minimum, so the result
        equals `encode(x)` up to float rounding; less context trades exactness for memory)."""
        tile = tile_latents or self.cfg.vae.tile_latents
        context = self.cfg.vae.tile_context if context is None else context
        context = self.enc_context if context < 0 else context
        n, r = 1 + (x.shape[1] - 1) // self.r, self.r
        means, logvars = [], []
        for a, j0, j1 in self._tiles(n, tile, context):
            mean, logvar = self.encode(x[:, a * r:(j1 - 1) * r + 1])
            means.append(mean[:, j0 - a:])
            logvars.append(logvar[:, j0 - a:])
        return jnp.concatenate(means, 1), jnp.concatenate(logvars, 1)

    def decode_tiled(self, z, tile_latents=None, context=None):
        """`decode` over temporal tiles (see `encode_tiled`); exact with the default context."""
        tile = tile_latents or self.cfg.vae.tile_latents
        context = self.cfg.vae.tile_context if context is None else context
        context = self.dec_context if context < 0 else max(context, 1)
        r, out = self.r, []
        for a, j0, j1 in self._tiles(z.shape[1], tile, context):
            frames = self.decode(z[:, a:j1])
            keep = 0 if j0 == 0 else (j0 - 1) * r + 1 - a * r  # first frame of group j0
            out.append(frames[:, keep:])
        return jnp.concatenate(out, 1)


# ----------------------------------------------------------------------------- loss and metrics


class Critic(nnx.Module):
    """PatchGAN-style critic for the optional adversarial term: causal convolutions over
    (time, space), one realism score per patch and frame, so blur and frozen lips both show."""

    def __init__(self, cfg, rngs, width: int = 32):
        self.layers = nnx.List([
            CausalConv3d(cfg, 3, width, (3, 4, 4), (1, 2, 2), names=("io", "embed"), rngs=rngs),
            CausalConv3d(cfg, width, 2 * width, (3, 4, 4), (1, 2, 2), rngs=rngs),
            CausalConv3d(cfg, 2 * width, 1, (1, 3, 3), names=("mlp", "io"), rngs=rngs),
        ])

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(jax.nn.leaky_relu(x, 0.2))
        return x.astype(jnp.float32)


def adversarial_terms(model: "VAE", rec, x):
    """(generator loss, critic hinge loss) in one differentiable expression: the generator
    sees the critic through stop_gradient and the critic sees stop_gradient(rec), so a single
    optimizer and train step update both without either term leaking into the other."""
    graphdef, state = nnx.split(model.critic)
    frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))
    gen = -jnp.mean(frozen(rec))
    real, fake = model.critic(x), model.critic(jax.lax.stop_gradient(rec))
    return gen, jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) in nats, averaged over latent elements."""
    return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def _edges(x):
    return x[:, :, 1:] - x[:, :, :-1], x[:, :, :, 1:] - x[:, :, :, :-1]


def vae_loss(model: VAE, batch: dict, key, cfg):
    """Weighted L1 + L2 (+ edge) reconstruction of a posterior sample, plus a small KL.

    With `motion_weight`, each pixel's error counts 1 + motion_weight * |x_t - x_(t-1)|;
    with `mouth_weight`, pixels inside `mouth_region` count 1 + mouth_weight more.

    batch['video']: [B, 1 + k*r, H, W, 3] in [-1, 1] (uint8 in [0, 255] is converted).
    With `adversarial_weight`, a critic is trained alongside (`adversarial_terms`).
    Returns (loss, parts) with parts 'l1', 'l2', 'edge', 'kl', 'psnr' (all scalars).
    """
    v = cfg.vae
    x = to_signed(batch["video"])
    mean, logvar = model.encode(x)
    rec = model.decode(model.sample(key, mean, logvar))
    err, w = rec - x, 1.0
    if v.motion_weight:  # moving pixels (the mouth) matter most and are the hardest to code
        w = 1.0 + v.motion_weight * jnp.abs(jnp.diff(x, axis=1, prepend=x[:, :1])).mean(-1, keepdims=True)
    if v.mouth_weight:  # the open mouth is where the error is (and where lip sync lives)
        w = w * (1.0 + v.mouth_weight * region_mask(v.mouth_region, *x.shape[2:4]))
    l1, l2 = jnp.mean(w * jnp.abs(err)), jnp.mean(w * jnp.square(err))
    (ry, rx), (xy, xx) = _edges(rec), _edges(x)
    edge = 0.5 * (jnp.mean(jnp.abs(ry - xy)) + jnp.mean(jnp.abs(rx - xx)))
    kl = kl_divergence(mean, logvar)
    loss = v.l1_weight * l1 + v.l2_weight * l2 + v.edge_weight * edge + v.kl_weight * kl
    parts = {"l1": l1, "l2": l2, "edge": edge, "kl": kl,
             "psnr": psnr(jax.lax.stop_gradient(rec), x)}
    if v.adversarial_weight:
        parts["adv_gen"], parts["adv_critic"] = adversarial_terms(model, rec, x)
        loss = loss + v.adversarial_weight * parts["adv_gen"] + parts["adv_critic"]
    return loss, parts


def region_mask(region, height: int, width: int) -> jax.Array:
    """float32 [H, W, 1]: 1 inside the (y0, y1, x0, x1) fractions of the frame, else 0."""
    y0, y1, x0, x1 = (int(round(f * n)) for f, n in zip(region, (height, height, width, width)))
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ValueError(f"vae.mouth_region={tuple(region)} is empty or outside the frame")
    m = jnp.zeros((height, width, 1), jnp.float32)
    return m.at[y0:y1, x0:x1].set(1.0)


def to_signed(video):
    """uint8 [0, 255] or float [-1, 1] -> float32 [-1, 1]."""
    if video.dtype == jnp.uint8:
        return video.astype(jnp.float32) / 127.5 - 1.0
    return video.astype(jnp.float32)


def psnr(a, b):
    """PSNR in dB of videos in [-1, 1], measured on the [0, 1] scale after clipping (as a
    saved video would be); one number over everything given."""
    a, b = (jnp.clip(jnp.asarray(y, jnp.float32), -1.0, 1.0) for y in (a, b))
    mse = jnp.mean(jnp.square((a - b) / 2.0))
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-12))

