"""The DiT's joint attention, with backends picked by `model.attention`.

All take q, k, v [B, N, H, D] and a key mask [B, N] (False = not attended) and agree with
`xla`, the reference, which materialises the [B, H, N, N] logits: fine for the demo, not
for 4 s of 720p (~97k tokens, 0.9 TB of float32 logits per example and layer). `attend`
also takes the rotary positions: q and k are rotated (`rope`) before the backend, or, with
flash_cpu, inside it (XLA:CPU then writes no rotated copies).

  xla        the reference: einsum, masked softmax, einsum (any backend)
  blockwise  flash-style attention in pure JAX (any backend): an online softmax over key
             blocks inside a map over query blocks; a custom VJP recomputes each block's
             probabilities from the saved row max and sum, so no pass keeps N x N values
  flash_cpu  a fused C++ kernel for XLA:CPU (flash_cpu.cc via the XLA FFI, compiled on first
             use), forward and backward, RoPE included: XLA:CPU writes each N x N
             intermediate of the reference to memory, which at head_dim 32 costs more than
             the FLOPs
  cudnn      jax.nn.dot_product_attention(implementation="cudnn"): GPU only
  splash     Pallas splash attention (jax.experimental.pallas.ops.tpu): TPU only

Sequence (context) parallelism, Ulysses style (DeepSpeed-Ulysses, Jacobs et al. 2023): for
a sequence too long for one device's activations, the mesh axis that `length` maps to
(`mesh.sequence`) splits the tokens, and attention, the one place a token needs every
other, runs in `shard_map`: an all-to-all turns each device's q, k, v from N/S tokens of
all heads into all N tokens of H/S heads, the backend above runs on that, and an all-to-all
brings the output back to N/S tokens. Automatic whenever mesh.sequence = S > 1; the heads
per tensor shard must be divisible by S, the length is padded to a multiple of S. Cost: per
attention, all-to-alls of four activations (q, k, v, out), each device sending about 4/S
of one [B, N, H, D] activation (twice that with the backward), and no N x N traffic.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mirage_jax.model.flash_cpu import flash_cpu
from mirage_jax.model.tokens import rope_tables
from mirage_jax.sharding import _fit, logical_to_mesh

BACKENDS = ("xla", "blockwise", "flash_cpu", "cudnn", "splash")
MASKED = -1e30  # masked real keys, as in the reference (a fully masked row is uniform)


def rope(x, pos, freqs):
    """Rotates channel pairs of x [B,N,H,D] by angles pos [B,N,3] . freqs [H,D/2,3]."""
    cos, sin = rope_tables(pos, freqs)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def _key_bias(key_bias):
    """[B, N, H] additive per-key, per-head logit bias -> [B, H, 1, N] (None stays None)."""
    return None if key_bias is None else key_bias.transpose(0, 2, 1)[:, :, None, :]


def reference(q, k, v, key_mask, key_bias=None):
    """Joint softmax attention; q,k,v [B,N,H,D], key_mask [B,N] (False = not attended),
    key_bias [B,N,H] or None: added to the logits of unmasked keys (a stitched stream's
    learned offset, `model.stitch`)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if key_bias is not None:
        logits = logits + _key_bias(key_bias).astype(jnp.float32)
    logits = jnp.where(key_mask[:, None, None, :], logits, MASKED)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


# ----------------------------------------------------------------------------- blockwise


def _blocks(x, size, fill=0):
    """[B, N, ...] -> [N/size, B, size, ...], padded at the end to a multiple of size."""
    pad = -x.shape[1] % size
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(x.shape[0], -1, size, *x.shape[2:]), 1, 0)


def _unblock(x, n):
    """Inverse of `_blocks` (drops the padding)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :n]


def _bias(mask_block):
    """[B, bk] in {1: key, 0: masked key, -1: padding} -> additive bias [B, 1, 1, bk].
    Padding gets -inf, so it never counts, even in a row whose real keys are all masked."""
    return jnp.where(mask_block > 0, 0.0, jnp.where(mask_block == 0, MASKED, -jnp.inf))[
        :, None, None, :
    ]


def _logits(qb, kb, bias, scale, kbias=None):
    s = jnp.einsum("bqhd,bkhd->bhqk", qb, kb, preferred_element_type=jnp.float32) * scale
    if kbias is not None:  # this key block's [B, bk, H] offsets
        s = s + _key_bias(kbias).astype(jnp.float32)
    return jnp.where(bias == 0.0, s, bias)  # masked logits are constants, as in the reference


def _forward(q, k, v, key_mask, key_bias, block):
    """Returns out [B,N,H,D] and each query's running max and sum of exp(logit - max),
    [B,N,H] each (kept apart, not as a log-sum-exp: -1e30 + log l rounds to -1e30)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    n = q.shape[1]
    kbs, vbs = _blocks(k, block), _blocks(v, block)
    mbs = _blocks(key_mask.astype(jnp.int32), block, fill=-1)
    bbs = None if key_bias is None else _blocks(key_bias, block)

    def one_query_block(qb):
        b, bq, h, d = qb.shape

        def step(carry, kvm):
            m, l, acc = carry
            s = _logits(qb, kvm[0], _bias(kvm[2]), scale, kvm[3])
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), kvm[1],
                            preferred_element_type=jnp.float32)
            return (m_new, l, acc * corr[..., None] + pv), None

        init = (jnp.full((b, h, bq), -jnp.inf), jnp.zeros((b, h, bq)), jnp.zeros((b, h, bq, d)))
        (m, l, acc), _ = jax.lax.scan(step, init, (kbs, vbs, mbs, bbs))
        out = (acc / l[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)  # [B, bq, H, D]
        return out, m.transpose(0, 2, 1), l.transpose(0, 2, 1)

    out, m, l = jax.lax.map(one_query_block, _blocks(q, block))
    return _unblock(out, n), _unblock(m, n), _unblock(l, n)


def blockwise(q, k, v, key_mask, block=512, key_bias=None):
    """Flash-style attention, equal to `reference` (memory O(N * block) per head)."""
    return _blockwise(q, k, v, key_mask, key_bias, min(block, q.shape[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(q, k, v, key_mask, key_bias, block):
    return _forward(q, k, v, key_mask, key_bias, block)[0]


def _blockwise_fwd(q, k, v, key_mask, key_bias, block):
    out, m, l = _forward(q, k, v, key_mask, key_bias, block)
    return out, (q, k, v, key_mask, key_bias, out, m, l)


def _blockwise_bwd(block, res, dout):
    """Flash-attention backward: dP = dO V^T, dS = P (dP - rowsum(dO * O)); one pass over
    query blocks for dq, one over key blocks for dk, dv and the key bias (its gradient is
    dS summed over queries), P recomputed in each. Masked logits are constants (no
    gradient), as in the reference."""
    q, k, v, key_mask, key_bias, out, m, l = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    n, f32 = q.shape[1], jnp.float32
    delta = jnp.einsum("bnhd,bnhd->bhn", dout.astype(f32), out.astype(f32))
    qbs, dobs = _blocks(q, block), _blocks(dout, block)
    stats = (_blocks(m, block), _blocks(l, block, fill=1))  # [nb, B, bq, H]; no 0 / 0
    dbs = _blocks(delta.transpose(0, 2, 1), block)
    kbs, vbs = _blocks(k, block), _blocks(v, block)
    mbs = _blocks(key_mask.astype(jnp.int32), block, fill=-1)
    bbs = None if key_bias is None else _blocks(key_bias, block)

    def probs(qb, kb, mb, lb, bb):
        s = _logits(qb, kb, _bias(mb), scale, bb)
        m_, l_ = (x.transpose(0, 2, 1)[..., None] for x in lb)
        return jnp.exp(s - m_) / l_  # [B, H, bq, bk]

    def dscores(p, dob, vb, mb, db):
        dp = jnp.einsum("bqhd,bkhd->bhqk", dob, vb, preferred_element_type=f32)
        return jnp.where(_bias(mb) == 0.0, p * (dp - db.transpose(0, 2, 1)[..., None]), 0.0)

    def dq_block(xs):
        qb, dob, lb, db = xs

        def step(dq, kvm):
            kb, vb, mb, bb = kvm
            ds = dscores(probs(qb, kb, mb, lb, bb), dob, vb, mb, db)
            return dq + jnp.einsum("bhqk,bkhd->bqhd", ds, kb.astype(f32)) * scale, None

        return jax.lax.scan(step, jnp.zeros(qb.shape, f32), (kbs, vbs, mbs, bbs))[0]

    def dkv_block(xs):
        kb, vb, mb, bb = xs

        def step(carry, qs):
            dk, dv, dbias = carry
            qb, dob, lb, db = qs
            p = probs(qb, kb, mb, lb, bb)
            ds = dscores(p, dob, vb, mb, db)
            dv = dv + jnp.einsum("bhqk,bqhd->bkhd", p, dob.astype(f32))
            dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds, qb.astype(f32)) * scale
            if bb is not None:  # only a stitched model carries the bias gradient
                dbias = dbias + ds.sum(2).transpose(0, 2, 1)
            return (dk, dv, dbias), None

        zeros = jnp.zeros(kb.shape, f32)
        init = (zeros, zeros, None if bb is None else jnp.zeros(kb.shape[:3], f32))
        return jax.lax.scan(step, init, (qbs, dobs, stats, dbs))[0]

    dq = _unblock(jax.lax.map(dq_block, (qbs, dobs, stats, dbs)), n)
    dkv = jax.lax.map(dkv_block, (kbs, vbs, mbs, bbs))
    dk, dv, dbias = jax.tree.map(lambda x: _unblock(x, k.shape[1]), dkv)  # dbias may be None
    dbias = None if key_bias is None else dbias.astype(key_bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, dbias


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ----------------------------------------------------------------------------- accelerators


def _require(backend, platform):
    if jax.default_backend() != platform:
        raise ValueError(
            f"model.attention='{backend}' runs on {platform.upper()} only, this process has "
            f"'{jax.default_backend()}' devices; use model.attention='blockwise' (any backend)"
        )


def cudnn(q, k, v, key_mask, key_bias=None, implementation="cudnn"):
    """cuDNN flash attention (bf16/fp16 inputs, head_dim <= 128 or 256 by GPU generation)."""
    if implementation == "cudnn":
        _require("cudnn", "gpu")
    bias = None if key_bias is None else _key_bias(key_bias).astype(q.dtype)
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=key_mask[:, None, None, :], implementation=implementation
    )


def per_shard(kernel, rules, q, k, v, key_mask, key_bias=None, rotary=None):
    """`kernel(q, k, v, key_mask, key_bias, rotary)` on each device's batch and head shard, in
    `shard_map` under a mesh: the SPMD partitioner cannot split a custom call or a Pallas
    kernel, and would gather its inputs. rotary: (pos [B, N, 3], freqs [H, D/2, 3]) or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, key_mask, key_bias, rotary)
    spec = _fit(logical_to_mesh(("batch", None, "heads", None), rules), q.shape, mesh)
    specs = (spec, spec, spec, P(spec[0], None),
             None if key_bias is None else P(spec[0], None, spec[2]),
             None if rotary is None else (P(spec[0], None, None), P(spec[2], None, None)))
    return jax.shard_map(kernel, in_specs=specs, out_specs=spec,
                         check_vma=False)(q, k, v, key_mask, key_bias, rotary)


def splash(q, k, v, key_mask, rules, block=512, interpret=False):
    """Pallas splash attention on TPU. The key mask becomes kv segment ids (1 = masked; every
    query is segment 0), the sequence is padded to the block size, and under a mesh the
    kernel runs per shard (`per_shard`)."""
    def kernel(q, k, v, key_mask, key_bias=None, rotary=None):  # both None (see attend)
        return _splash_local(q, k, v, key_mask, block, interpret)

    return per_shard(kernel, rules, q, k, v, key_mask)


def _splash_local(q, k, v, key_mask, block=512, interpret=False):
    """`splash` on one device's arrays (no mesh)."""
    if not interpret:
        _require("splash", "tpu")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    n = q.shape[1]
    size = min(block, -(-n // 128) * 128)
    pad = -n % size
    padded = [jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k, v)]
    qp, kp, vp = (x.transpose(0, 2, 1, 3) for x in padded)  # [B, H, N, D]
    qp = qp * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)  # the kernel does not scale
    kv_ids = jnp.pad(jnp.where(key_mask, 0, 1), [(0, 0), (0, pad)], constant_values=2)
    q_ids = jnp.zeros_like(kv_ids)
    mask = sm.MultiHeadMask([sm.FullMask((qp.shape[2], kp.shape[2]))] * qp.shape[1])
    sizes = sk.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size,
                          block_q_dkv=size, block_kv_dkv=size, block_kv_dkv_compute=size,
                          block_q_dq=size, block_kv_dq=size)
    kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    out = jax.vmap(kernel)(qp, kp, vp, segment_ids=sk.SegmentIds(q_ids, kv_ids))
    return out.transpose(0, 2, 1, 3)[:, :n]


# ----------------------------------------------------------------------------- Ulysses


def sequence_axis(rules):
    """(mesh axes of `length`, their size) under the current mesh: Ulysses runs if size > 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = _names(logical_to_mesh(("length",), rules)[0])
    return axes, math.prod(mesh.shape.get(a, 1) for a in axes)


def _names(axes):
    """A PartitionSpec entry as a tuple of mesh axes."""
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def ulysses(local, q, k, v, key_mask, key_bias, rules):
    """`local` (a backend on whole arrays) with the sequence split over the `length` axes:
    inside `shard_map`, all-to-alls swap sequence shards for head shards and back. The
    length is padded to a multiple of S; the padding is cut off again before `local`, where
    every device holds the whole sequence, so padded keys never enter a softmax."""
    mesh = jax.sharding.get_abstract_mesh()
    axes, s = sequence_axis(rules)
    name = axes[0] if len(axes) == 1 else axes
    b, n, h, _ = q.shape
    pad = -n % s
    spec = _fit(logical_to_mesh(("batch", "length", "heads", None), rules),
                (b, n + pad, h, 1), mesh)
    tensor = math.prod(mesh.shape[a] for a in _names(spec[2]))
    if (h // tensor) % s:
        raise ValueError(
            f"Ulysses sequence parallelism splits each device's heads over mesh.{'*'.join(axes)}"
            f"={s}: model.num_heads={h} ({h // tensor} per tensor shard) is not divisible by "
            f"{s}; change model.num_heads or mesh.{'*'.join(axes)}")
    to_heads = lambda x: jax.lax.all_to_all(x, name, 2, 1, tiled=True)[:, :n]
    to_tokens = lambda x: jax.lax.all_to_all(x, name, 1, 2, tiled=True)

    def body(q, k, v, key_mask, *key_bias):  # [B/., (N+pad)/S, H/., .]
        q, k, v, *key_bias = (to_heads(x) for x in (q, k, v, *key_bias))  # [., N, H/(.S), .]
        key_mask = jax.lax.all_gather(key_mask, name, axis=1, tiled=True)[:, :n]
        out = local(q, k, v, key_mask, *key_bias)
        return to_tokens(jnp.pad(out, [(0, 0), (0, pad), (0, 0), (0, 0)]))

    padded = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    args = [padded(x) for x in (q, k, v, key_mask) + (() if key_bias is None else (key_bias,))]
    specs = (spec, spec, spec, P(*spec[:2]), P(*spec[:3]))
    out = jax.shard_map(body, in_specs=specs[:len(args)], out_specs=spec,
                        check_vma=False)(*args)  # the backends' scans start from constants
    return out[:, :n]


def _backend(model_cfg, key_bias):
    """The backend named by `model.attention` as f(q, k, v, key_mask, key_bias=None) on one
    device's (or, outside Ulysses, the jit's global) arrays."""
    name, block = model_cfg.attention, model_cfg.attention_block
    if name == "xla":
        return reference
    if name == "blockwise":
        return lambda q, k, v, m, b=None: blockwise(q, k, v, m, block, b)
    if name == "flash_cpu":
        return flash_cpu
    if name == "cudnn":
        return cudnn
    if key_bias is not None:  # the kernel takes segment ids, not an additive bias
        raise ValueError("model.attention='splash' has no per-key bias for model.stitch; "
                         "stitch with model.attention=blockwise, xla or cudnn")
    if name == "splash":
        return lambda q, k, v, m, b=None: _splash_local(q, k, v, m, block)
    raise ValueError(f"model.attention must be one of {BACKENDS}, got '{name}'")


def attend(q, k, v, key_mask, model_cfg, rules, key_bias=None, rotary=None):
    """The joint attention with the backend named by `model.attention`, Ulysses-parallel
    when mesh.sequence > 1; `key_bias` [B,N,H]: the stitched streams' key offsets (None
    without `model.stitch`); `rotary` (pos [B,N,3], freqs [H,D/2,3]): RoPE for q and k."""
    local = _backend(model_cfg, key_bias)
    ulysses_on = sequence_axis(rules)[1] > 1
    if model_cfg.attention == "flash_cpu" and not ulysses_on:  # a custom call, RoPE inside
        return per_shard(local, rules, q, k, v, key_mask, key_bias, rotary)
    if rotary is not None:
        q, k = rope(q, *rotary), rope(k, *rotary)
    if ulysses_on:
        return ulysses(local, q, k, v, key_mask, key_bias, rules)
    if model_cfg.attention == "splash":  # a Pallas kernel needs its own shard_map
        return splash(q, k, v, key_mask, rules, model_cfg.attention_block)
    return local(q, k, v, key_mask, key_bias)
