"""The AMDIM encoder (Bachman, Hjelm & Buchwalter 2019) in Flax NNX.

A ResNet with no padding: every output unit sees a known, whole patch of the image, so the
1x1 output is a *global* feature of the image and the 5x5 and 7x7 maps are *local*
features of overlapping patches; the NCE loss (loss.py) makes a global feature of one view
predict the local features of another. Feature maps at `amdim.image_size` = 64, with
w = `amdim.ndf` and d = `amdim.depth` residual units per block (the reference's 64x64
encoder):

    conv 3x3              3 -> w    62x62
    res  4x4 /2           w -> w    30x30
    res  4x4 /2 (+ d-1)   w -> 2w   14x14
    res  2x2 /2 (+ d-1)  2w -> 4w    7x7   local features r7
    res  3x3    (+ d-1)  4w -> 8w    5x5   local features r5
    res  3x3    (+ d-1)  8w -> 8w    3x3
    res  3x3    (+ d-1)  8w -> 8w    1x1   global feature r1

At image_size = 32 the first residual unit is 1x1 (30x30 stays 30x30); the rest is equal.
No batch norm in the encoder: a frozen encoder must give one image the same features in any
batch (the probe, the judges). The feature heads end, as in the reference, in its one
always-on batch norm, with the statistics of the current batch (no running averages: the
heads serve only the training loss, and the train state holds parameters only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mirage_jax.model.dit import DTYPES


def amdim_defaults() -> dict:
    """Every key of the `amdim` config group with its default."""
    return {
        "image_size": 64,  # encoder input side (64 or 32); frames are resized to it
        "ndf": 32,  # channels of the first level (the reference's ndf)
        "depth": 1,  # residual units per block (the reference's n_depth)
        "n_rkhs": 128,  # width of the feature heads: the space where scores are dot products
        # How the feature heads end: 'batch' (the reference's always-on batch norm, statistics
        # of the current batch) or 'layer'. Batch norm makes every score channel vary across
        # the batch, so the heads cannot collapse to one vector for all images (with 'layer'
        # the loss sat at chance and the encoder lost the mouth: configs/amdim_demo.py).
        "head_norm": "batch",
        "tclip": 20.0,  # scores soft-clipped to c * tanh(s / c)
        "score_penalty": 5e-2,  # weight of mean(score^2), taken before the clip
        "use_ref": True,  # the clip's reference frame joins the batch (a same-speaker negative)
        # Every frame_stride-th frame of a window joins the batch (data.frames = 1 + (n-1) *
        # stride gives n): consecutive frames mostly share a viseme, frames further apart
        # differ at the mouth. Measured on the viseme probe: within seed noise (README).
        "frame_stride": 1,
        # What a linear probe (probe.py) reads of a frozen encoder, trained or at random init
        # alike: 'r1' (the global feature, the reference's evaluation) and/or the local maps
        # 'r5', 'r7', flattened. 'r5': the mouth is a few pixels of a 64x64 frame, and the
        # global feature codes the speaker; the mouth lives in the local features.
        "probe_features": "r5",
        # (y0, y1, x0, x1) fractions: the part of each frame the encoder sees, in training
        # views and in the probe alike: the whole frame, or e.g. the sync judge's mouth box
        # (sync.crop), where the sway and the eyes no longer tell two moments apart. On the
        # viseme probe the box lifted every encoder alike, random init too (README).
        "region": (0.0, 1.0, 0.0, 1.0),
        "crop_min_scale": 0.3,  # random resized crop: area fraction in [this, 1],
        "crop_ratio": (0.7, 1.4),  # and aspect ratio (width / height) in this range
        "jitter": 0.4,  # colour jitter: brightness, contrast, saturation in 1 +- this
        "hue": 0.2,  # and hue rotated by up to +- this fraction of a turn
        "p_jitter": 0.8,
        "p_grey": 0.25,
    }


def _units(size: int, w: int, d: int) -> list[list[tuple[int, int, int, int]]]:
    """Residual units (cin, cout, kernel, stride) per block after the first conv."""
    first = (w, w, 4, 2) if size == 64 else (w, w, 1, 1)
    blocks = [[first]]
    for cin, cout, k, s in ((w, 2 * w, 4, 2), (2 * w, 4 * w, 2, 2), (4 * w, 8 * w, 3, 1),
                            (8 * w, 8 * w, 3, 1), (8 * w, 8 * w, 3, 1)):
        blocks.append([(cin, cout, k, s)] + [(cout, cout, 1, 1)] * (d - 1))
    return blocks


R7_BLOCK, R5_BLOCK = 2, 3  # blocks whose outputs are the 7x7 and 5x5 maps


class Conv(nnx.Module):
    """A 'valid' 2D convolution (no padding) with a bias, NHWC."""

    def __init__(self, cfg, cin, cout, k=1, stride=1, names=("embed", "mlp"), init=None, *,
                 rngs):
        m = cfg.model
        self.k, self.stride, self.dtype = k, stride, DTYPES[m.dtype]
        init = init or nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(nnx.with_partitioning(init, (None, None) + tuple(names))(
            rngs.params(), (k, k, cin, cout), DTYPES[m.param_dtype]))
        self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), names[-1:])(
            rngs.params(), (cout,), DTYPES[m.param_dtype]))

    def __call__(self, x):
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if self.k == 1 and self.stride == 1:
            y = x @ kernel[0, 0]
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (self.stride,) * 2, "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class ResUnit(nnx.Module):
    """kxk conv -> ReLU -> 1x1 conv, plus a shortcut: the input average-pooled over the same
    window (channels zero-padded when they grow, projected when they shrink)."""

    def __init__(self, cfg, cin, cout, k, stride, *, rngs):
        self.k, self.stride, self.cin, self.cout = k, stride, cin, cout
        self.conv = Conv(cfg, cin, cout, k, stride, rngs=rngs)
        self.mix = Conv(cfg, cout, cout, rngs=rngs)
        self.proj = Conv(cfg, cin, cout, rngs=rngs) if cout < cin else None

    def __call__(self, x):
        h = self.mix(jax.nn.relu(self.conv(jax.nn.relu(x))))
        skip = x
        if self.k > 1 or self.stride > 1:
            window = (1, self.k, self.k, 1)
            skip = jax.lax.reduce_window(x, 0.0, jax.lax.add, window,
                                         (1, self.stride, self.stride, 1), "VALID") / self.k ** 2
        if self.proj is not None:
            skip = self.proj(skip)
        elif self.cout > self.cin:
            skip = jnp.pad(skip, ((0, 0),) * 3 + ((0, self.cout - self.cin),))
        return skip + h


class FeatureHead(nnx.Module):
    """The residual 1x1-conv MLP that maps encoder features into the score space (the
    reference's FakeRKHSConvNet): x W_skip + W2 relu(W1 x), then a norm: 'layer' (per
    vector) or 'batch' (per channel over the batch and locations, the reference's bn_out).
    The shortcut starts as a (padded) identity and W2 at zero, so training starts from the
    features."""

    def __init__(self, cfg, cin, cout, norm: str = "layer", *, rngs):
        if norm not in ("layer", "batch"):
            raise ValueError(f"FeatureHead norm must be 'layer' or 'batch', got {norm!r}")
        self.batch_norm = norm == "batch"
        eye = lambda key, shape, dtype: jnp.eye(shape[2], shape[3], dtype=dtype)[None, None]
        self.skip = Conv(cfg, cin, cout, init=eye, rngs=rngs)
        self.hidden = Conv(cfg, cin, cout, rngs=rngs)
        self.out = Conv(cfg, cout, cout, init=nnx.initializers.zeros_init(), rngs=rngs)
        # Scale 1/2 at first: unit-norm features of near-identical images (all faces, at
        # init) would score ~sqrt(D) and the score penalty would drown the NCE at the start.
        # (Batch norm standardises each channel, so its scale starts at 1 as in the reference.)
        self.norm = nnx.LayerNorm(cout, rngs=rngs, scale_init=nnx.with_partitioning(
            nnx.initializers.constant(1.0 if self.batch_norm else 0.5), ("mlp",)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)))

    def __call__(self, x):
        h = (self.skip(x) + self.out(jax.nn.relu(self.hidden(x)))).astype(jnp.float32)
        if not self.batch_norm:
            return self.norm(h)
        axes = tuple(range(h.ndim - 1))
        h = (h - h.mean(axes)) * jax.lax.rsqrt(h.var(axes) + 1e-5)
        return h * self.norm.scale[...] + self.norm.bias[...]


class AMDIM(nnx.Module):
    """Encoder + feature heads. `encode(x)`: the encoder's maps r1 [B, 8w], r5 [B, 5, 5, 8w],
    r7 [B, 7, 7, 4w]; `__call__(x)`: their head outputs g [B, D], l5 [B, 5, 5, D],
    l7 [B, 7, 7, D] with D = `amdim.n_rkhs` (with batch-norm heads, these depend on the
batch: they are for the loss). x: [B, S, S, 3] in [-1, 1], S = image_size."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        a = cfg.amdim
        w, self.size = a.ndf, a.image_size
        self.stem = Conv(cfg, 3, w, 3, names=("io", "embed"), rngs=rngs)
        self.blocks = nnx.List([
            nnx.List([ResUnit(cfg, *u, rngs=rngs) for u in block])
            for block in _units(a.image_size, w, a.depth)])
        self.head1 = FeatureHead(cfg, 8 * w, a.n_rkhs, a.head_norm, rngs=rngs)
        self.head5 = FeatureHead(cfg, 8 * w, a.n_rkhs, a.head_norm, rngs=rngs)
        self.head7 = FeatureHead(cfg, 4 * w, a.n_rkhs, a.head_norm, rngs=rngs)

    def encode(self, x) -> dict:
        if x.shape[1:3] != (self.size, self.size):
            raise ValueError(f"AMDIM wants {self.size}x{self.size} images, got {x.shape}")
        h = jax.nn.relu(self.stem(x))
        out = {}
        for i, block in enumerate(self.blocks):
            for unit in block:
                h = unit(h)
            if i == R7_BLOCK:
                out["r7"] = h
            elif i == R5_BLOCK:
                out["r5"] = h
        out["r1"] = h[:, 0, 0]
        return {k: v.astype(jnp.float32) for k, v in out.items()}

    def __call__(self, x) -> dict:
        r = self.encode(x)
        return {"g": self.head1(r["r1"]), "l5": self.head5(r["r5"]), "l7": self.head7(r["r7"])}
