"""The multi-stream ("asymmetric") diffusion transformer of Mirage.

Each modality is a stream with its own width and its own weights: input projection,
adaLN-Zero modulation from that stream's per-token diffusion time, QKV and output
projections with QK-RMSNorm, and MLP. Only the attention is shared: every block runs one
multi-head self-attention over the concatenated sequence [ref, text, audio, video].
Reference-image tokens use the video stream's weights. Rotary positions are learned
(RoPE-Mixed: per layer and head, a learned frequency vector over (t, h, w)).

Layers are created stacked with `nnx.vmap` and run with `nnx.scan`, so compile time does
not grow with depth; `model.remat` picks the rematerialisation policy per block.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mirage_jax.model.attention import attend, rope  # noqa: F401 (dit.rope)
from mirage_jax.model.attention import reference as attention  # noqa: F401 (dit.attention)
from mirage_jax.model.tokens import GENERATED, GROUPS, STREAM_OF, Stream, video_shape
from mirage_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STREAMS = ("video", "audio", "text")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class FlatLinear(nnx.Linear):
    """nnx.Linear over the tokens flattened to rows (`model.flat_projections`). Its weight
    gradient is then one 2-D dot contracting the rows; over [B, N, d] XLA:CPU first
    transposes the output gradient and takes a slower dot (the demo step 0.86-0.89x)."""

    def __call__(self, x):
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def _linear(cfg, din, dout, names, rngs, zero=False):
    m = cfg.model
    init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
    return (FlatLinear if m.flat_projections else nnx.Linear)(
        din,
        dout,
        rngs=rngs,
        dtype=DTYPES[m.dtype],
        param_dtype=DTYPES[m.param_dtype],
        kernel_init=nnx.with_partitioning(init, names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[-1:]),
    )


def _norm(x):
    """Parameter-free LayerNorm in float32; adaLN supplies scale and shift."""
    x32 = x.astype(jnp.float32)
    mu = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mu).mean(-1, keepdims=True)
    return ((x32 - mu) * jax.lax.rsqrt(var + 1e-6)).astype(x.dtype)


def _modulate(x, shift, scale):
    return _norm(x) * (1 + scale) + shift


def stream_widths(cfg) -> dict[str, int]:
    m = cfg.model
    widths = {"video": m.video_width, "audio": m.audio_width, "text": m.text_width}
    return {s: w for s, w in widths.items() if s != "audio" or m.audio}


def active_groups(cfg) -> tuple[str, ...]:
    """The groups of the joint sequence this model has: a silent model (`model.audio=False`)
    has no audio tokens, a model without `model.ref` no reference image."""
    m = cfg.model
    return tuple(g for g in GROUPS if (g != "audio" or m.audio) and (g != "ref" or m.ref))


def init_rope_freqs(key, heads, head_dim, theta):
    """RoPE-Mixed init: standard magnitudes, a random direction in (t,h,w) per head and pair."""
    mags = theta ** (-jnp.arange(head_dim // 2) / (head_dim // 2))
    dirs = jax.random.normal(key, (heads, head_dim // 2, 3))
    dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
    return mags[None, :, None] * dirs


class StreamLayer(nnx.Module):
    """One stream's weights within a block."""

    def __init__(self, cfg, width: int, rngs: nnx.Rngs):
        m = cfg.model
        inner, hidden = m.num_heads * m.head_dim, int(width * m.mlp_ratio)
        self.flat = m.flat_projections
        # adaLN-Zero: shift/scale/gate for attention and MLP, all zero at init.
        self.mod = _linear(cfg, m.time_dim, 6 * width, ("cond", "embed"), rngs, zero=True)
        self.q = _linear(cfg, width, inner, ("embed", "heads"), rngs)
        self.k = _linear(cfg, width, inner, ("embed", "heads"), rngs)
        self.v = _linear(cfg, width, inner, ("embed", "heads"), rngs)
        norm_init = nnx.with_partitioning(nnx.initializers.ones_init(), ("head_dim",))
        self.q_norm = nnx.RMSNorm(m.head_dim, rngs=rngs, scale_init=norm_init)
        self.k_norm = nnx.RMSNorm(m.head_dim, rngs=rngs, scale_init=norm_init)
        self.o = _linear(cfg, inner, width, ("heads", "embed"), rngs)
        self.fc1 = _linear(cfg, width, hidden, ("embed", "mlp"), rngs)
        self.fc2 = _linear(cfg, hidden, width, ("mlp", "embed"), rngs)

    def qkv(self, h, heads):
        # One dot for q, k and v, their kernels stacked on a new axis (each stays sharded on
        # its own heads): fewer, larger matmuls (the demo's XLA:CPU step 0.96x; README).
        dt, projections = self.q.dtype, (self.q, self.k, self.v)
        w = jnp.stack([p.kernel[...] for p in projections], 1).astype(dt)
        b = jnp.stack([p.bias[...] for p in projections], 0).astype(dt)
        x = h.reshape(-1, h.shape[-1]) if self.flat else h  # rows, as in FlatLinear
        y = (jnp.einsum("...w,wti->...ti", x.astype(dt), w) + b).reshape(*h.shape[:-1], *b.shape)
        q, k, v = (y[..., i, :].reshape(*y.shape[:-2], heads, -1) for i in range(3))
        q = self.q_norm(q.astype(jnp.float32))
        k = self.k_norm(k.astype(jnp.float32))
        return q.astype(h.dtype), k.astype(h.dtype), v

    def mlp(self, h):
        return self.fc2(jax.nn.gelu(self.fc1(h)))


class Block(nnx.Module):
    """Per-stream modulation and projections around one joint self-attention."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        m = cfg.model
        self.cfg = cfg
        for name, width in stream_widths(cfg).items():
            setattr(self, name, StreamLayer(cfg, width, rngs))
        self.rope_freqs = nnx.Param(
            init_rope_freqs(rngs.params(), m.num_heads, m.head_dim, m.rope_theta),
            out_sharding=("heads", "head_dim", None),
        )
        # Stitching: a learned per-head offset on the logits of a new group's keys, starting
        # low, so the trained streams at first attend to it with weight ~exp(stitch_offset).
        for g in m.stitch:
            setattr(self, f"{g}_key_offset", nnx.Param(
                jnp.full((m.num_heads,), m.stitch_offset, jnp.float32), out_sharding=("heads",)))

    def __call__(self, xs: dict, ctx: dict) -> dict:
        heads, rules = self.cfg.model.num_heads, self.cfg.sharding_rules
        groups, stitch = active_groups(self.cfg), self.cfg.model.stitch
        qs, ks, vs, mods, bias = [], [], [], {}, []
        for g in groups:
            layer = getattr(self, STREAM_OF[g])
            mods[g] = jnp.split(layer.mod(ctx["cond"][g]), 6, axis=-1)
            shift, scale = mods[g][0], mods[g][1]
            q, k, v = layer.qkv(_modulate(xs[g], shift, scale), heads)
            qs.append(q)
            ks.append(k)
            vs.append(v)
            if stitch:  # per-key bias: the stitched groups' offsets, 0 for the rest
                offset = getattr(self, f"{g}_key_offset")[...] if g in stitch else jnp.zeros(heads)
                bias.append(jnp.broadcast_to(offset, (*k.shape[:2], heads)))
        q, k, v = (jnp.concatenate(a, axis=1) for a in (qs, ks, vs))
        key_bias = jnp.concatenate(bias, axis=1) if stitch else None
        pos = jnp.concatenate([ctx["pos"][g] for g in groups], axis=1)
        rotary = (pos, self.rope_freqs[...])  # RoPE: `attend` rotates q and k
        out = attend(q, k, v, ctx["key_mask"], self.cfg.model, rules, key_bias, rotary)
        out = constrain(out, ("batch", "length", "heads", "head_dim"), rules)
        offsets = list(itertools.accumulate(xs[g].shape[1] for g in groups))[:-1]
        new = {}
        for g, o in zip(groups, jnp.split(out, offsets, axis=1)):
            layer = getattr(self, STREAM_OF[g])
            _, _, gate1, shift2, scale2, gate2 = mods[g]
            x = xs[g] + gate1 * layer.o(o.reshape(*o.shape[:2], -1))
            x = x + gate2 * layer.mlp(_modulate(x, shift2, scale2))
            new[g] = constrain(x, ("batch", "length", "act_embed"), rules)
        return new


class TimeEmbedding(nnx.Module):
    """Sinusoidal features of t, then an MLP: one conditioning vector per token."""

    def __init__(self, cfg, rngs):
        d = cfg.model.time_dim
        self.dim = d
        self.fc1 = _linear(cfg, d, d, ("cond", "embed"), rngs)
        self.fc2 = _linear(cfg, d, d, ("cond", "embed"), rngs)

    def __call__(self, t):
        half = self.dim // 2
        freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
        args = (1000.0 * t.astype(jnp.float32))[..., None] * freqs
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)
        return nnx.silu(self.fc2(nnx.silu(self.fc1(emb))))


class OutputHead(nnx.Module):
    """Final adaLN (shift, scale) and a zero-initialised projection to the velocity."""

    def __init__(self, cfg, width, dout, rngs):
        self.mod = _linear(cfg, cfg.model.time_dim, 2 * width, ("cond", "embed"), rngs, zero=True)
        self.proj = _linear(cfg, width, dout, ("embed", "io"), rngs, zero=True)

    def __call__(self, x, cond):
        shift, scale = jnp.split(self.mod(cond), 2, axis=-1)
        return self.proj(_modulate(x, shift, scale)).astype(jnp.float32)


class DiT(nnx.Module):
    """Streams in, velocities of the generated streams (audio, video) out."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        m, d = cfg.model, cfg.data
        self.cfg = cfg
        w = stream_widths(cfg)
        patch_dim = m.patch * m.patch * video_shape(cfg)[3]
        self.video_in = _linear(cfg, patch_dim, w["video"], ("io", "embed"), rngs)
        if m.audio:  # a silent model has no audio stream
            self.audio_in = _linear(cfg, d.audio_features, w["audio"], ("io", "embed"), rngs)
        if m.text_encoder == "bytes":
            self.text_in = nnx.Embed(
                m.text_vocab,
                w["text"],
                rngs=rngs,
                param_dtype=DTYPES[m.param_dtype],
                embedding_init=nnx.with_partitioning(
                    nnx.initializers.normal(0.02), ("vocab", "io")
                ),
            )
            self.text_pos = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (d.text_len, w["text"])),
                out_sharding=(None, "io"),
            )
        else:
            self.text_in = _linear(cfg, m.text_embed_dim, w["text"], ("io", "embed"), rngs)
        self.time = TimeEmbedding(cfg, rngs)

        @nnx.split_rngs(splits=m.depth)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.video_out = OutputHead(cfg, w["video"], patch_dim, rngs)
        if m.audio:
            self.audio_out = OutputHead(cfg, w["audio"], d.audio_features, rngs)

    def embed(self, streams: dict[str, Stream]) -> dict:
        dtype = DTYPES[self.cfg.model.dtype]
        text = streams["text"].x
        if self.cfg.model.text_encoder == "bytes":
            text = self.text_in(text) + self.text_pos[: text.shape[1]]
        else:
            text = self.text_in(text)
        embed = {"video": self.video_in, "ref": self.video_in, "text": lambda _: text,
                 "audio": getattr(self, "audio_in", None)}
        return {g: embed[g](streams[g].x).astype(dtype) for g in active_groups(self.cfg)}

    def run_blocks(self, xs, ctx):
        policy = REMAT_POLICIES[self.cfg.model.remat]

        def body(block, x):
            return block(x, ctx)

        if self.cfg.model.remat != "none":
            body = nnx.remat(body, policy=policy)
        if self.cfg.model.scan_layers:
            scan = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            return scan(self.blocks, xs)
        graphdef, state = nnx.split(self.blocks)  # same stacked weights, a Python loop
        for i in range(self.cfg.model.depth):
            xs = body(nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)), xs)
        return xs

    def __call__(self, streams: dict[str, Stream]) -> dict[str, jax.Array]:
        dtype, groups = DTYPES[self.cfg.model.dtype], active_groups(self.cfg)
        ctx = {
            "cond": {g: self.time(streams[g].t).astype(dtype) for g in groups},
            "pos": {g: streams[g].pos for g in groups},
            "key_mask": jnp.concatenate([streams[g].mask for g in groups], axis=1),
        }
        xs = self.run_blocks(self.embed(streams), ctx)
        return {g: getattr(self, f"{g}_out")(xs[g], ctx["cond"][g])
                for g in ("video", "audio") if g in groups}


assert set(GENERATED) == {"video", "audio"}
