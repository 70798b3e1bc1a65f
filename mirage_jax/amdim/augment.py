"""AMDIM's views of one image, made on the device inside the loss.

As in the reference: one horizontal flip shared by both views, then for each view
independently a random resized crop (area 0.3-1, aspect 0.7-1.4: `amdim.crop_min_scale`,
`amdim.crop_ratio`) back to the encoder's size, colour jitter (p = 0.8) and greyscale
(p = 0.25). Why on the device: the views cost a few matrix products per image there, the
step's key makes them reproducible and resumable with no pipeline state, and the grain
pipeline stays the one every task uses.
The crops lie inside `amdim.region` (default the whole frame; the flip comes first, so keep
a region symmetric about the vertical midline, as the mouth box is).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

LUMA = np.array([0.299, 0.587, 0.114], np.float32)
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                       [0.211, -0.523, 0.312]], np.float32)
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ).astype(np.float32)


def _interp(coords, n: int):
    """[S, n] bilinear weights of source pixels for sample positions `coords` (pixels)."""
    coords = jnp.clip(coords, 0.0, n - 1.0)
    return jnp.maximum(0.0, 1.0 - jnp.abs(coords[:, None] - jnp.arange(n)[None, :]))


def crop_resize(img, box, size: int):
    """The box (y0, x0, h, w), as fractions of the image, of img [H, W, C] resampled
    bilinearly to [size, size, C]: two small matrix products."""
    y0, x0, h, w = box
    t = (jnp.arange(size) + 0.5) / size
    ry = _interp((y0 + t * h) * img.shape[0] - 0.5, img.shape[0])
    rx = _interp((x0 + t * w) * img.shape[1] - 0.5, img.shape[1])
    return jnp.einsum("sh,hwc,tw->stc", ry, img, rx)


WHOLE = (0.0, 1.0, 0.0, 1.0)


def resize(images, size: int, region=WHOLE):
    """[N, H, W, C] -> [N, size, size, C]: the region (y0, y1, x0, x1 fractions, one [4] for
    all frames or one per frame [N, 4]; default the whole frame, then a no-op at that size)
    resampled."""
    static = isinstance(region, (tuple, list))
    if static and tuple(region) == WHOLE and images.shape[1:3] == (size, size):
        return images
    r = jnp.broadcast_to(jnp.asarray(region, jnp.float32), (images.shape[0], 4))
    yxhw = jnp.stack([r[:, 0], r[:, 2], r[:, 1] - r[:, 0], r[:, 3] - r[:, 2]], -1)
    return jax.vmap(lambda x, b: crop_resize(x, b, size))(images.astype(jnp.float32), yxhw)


def _random_box(key, min_scale: float, region, ratios):
    """(y0, x0, h, w) of a random crop of `region` (area and ratio relative to it), the
    aspect ratio log-uniform in `ratios` (amdim.crop_ratio)."""
    ka, kr, ky, kx = jax.random.split(key, 4)
    area = jax.random.uniform(ka, (), minval=min_scale, maxval=1.0)
    lo, hi = (math.log(r) for r in ratios)
    ratio = jnp.exp(jax.random.uniform(kr, (), minval=lo, maxval=hi))
    h = jnp.minimum(jnp.sqrt(area / ratio), 1.0)
    w = jnp.minimum(jnp.sqrt(area * ratio), 1.0)
    y0, y1, x0, x1 = region
    ry, rx = y1 - y0, x1 - x0
    return jnp.stack([y0 + jax.random.uniform(ky) * (1 - h) * ry,
                      x0 + jax.random.uniform(kx) * (1 - w) * rx, h * ry, w * rx])


def _colour(key, x, a):
    """Jitter (brightness, contrast, saturation, hue) and greyscale of x [S, S, 3] in [0, 1]."""
    kb, kc, ks, kh, kp, kg = jax.random.split(key, 6)
    u = lambda k, r: jax.random.uniform(k, (), minval=-r, maxval=r)
    y = x * (1 + u(kb, a.jitter))
    mean = jnp.mean(y @ LUMA)
    y = (y - mean) * (1 + u(kc, a.jitter)) + mean
    grey = (y @ LUMA)[..., None]
    y = grey + (y - grey) * (1 + u(ks, a.jitter))
    theta = 2 * jnp.pi * u(kh, a.hue)  # hue: rotate the chroma plane of YIQ
    c, s = jnp.cos(theta), jnp.sin(theta)
    rot = jnp.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    y = y @ (YIQ_TO_RGB @ rot @ RGB_TO_YIQ).T
    x = jnp.where(jax.random.uniform(kp) < a.p_jitter, jnp.clip(y, 0.0, 1.0), x)
    return jnp.where(jax.random.uniform(kg) < a.p_grey, jnp.repeat(x @ LUMA[:, None], 3, -1), x)


def _view(key, img, a):
    kc, kj = jax.random.split(key)
    box = _random_box(kc, a.crop_min_scale, a.region, a.crop_ratio)
    x = crop_resize(img, box, a.image_size)
    return _colour(kj, (x + 1.0) / 2.0, a) * 2.0 - 1.0


def two_views(key, images, a):
    """images [N, H, W, 3] in [-1, 1] -> two views [N, S, S, 3] each (S = a.image_size)."""
    n = images.shape[0]
    kf, k1, k2 = jax.random.split(key, 3)
    flip = jax.random.bernoulli(kf, 0.5, (n,))[:, None, None, None]
    images = jnp.where(flip, images[:, :, ::-1], images).astype(jnp.float32)
    view = jax.vmap(lambda k, x: _view(k, x, a))
    return view(jax.random.split(k1, n), images), view(jax.random.split(k2, n), images)
