"""Config schema, loading and command-line overrides.

Configs are Python files with `get_config() -> ml_collections.ConfigDict` (big_vision style).
`base_config()` below is the one schema: a config file may change values but not add keys,
and every override (`--config.model.depth=4`) is checked against it, so a typo or a wrong
type fails at start with the key named instead of surfacing hours later.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import ml_collections

from mirage_jax.amdim.model import amdim_defaults
from mirage_jax.amdim.sync import sync_defaults
from mirage_jax.model.tokens import video_shape
from mirage_jax.model.vae import vae_defaults

# Logical axis -> mesh axes. One table for parameters and activations (MaxText habit).
# Parameters are FSDP-sharded on their model dimension and tensor-sharded on heads/MLP;
# the batch is split over every data-like axis.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("act_embed", None),
    ("head_dim", None),
    ("io", None),
    ("cond", None),
    ("vocab", None),
    ("layers", None),
)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def base_config() -> ml_collections.ConfigDict:
    """The schema with defaults (a tiny model). Config files start from this."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "dit"  # which model the train loop builds: dit | vae | amdim | sync
    c.vae_checkpoint = ""  # VAE run dir or export dir: encodes (data.video='encode'), decodes
    # A run (or its checkpoints/) to start from: parameters whose path and shape match are
    # restored, the rest are new (mirage_jax/train/stitch.py); a fresh optimizer and step 0.
    c.init_from = ""

    c.model = dict(
        depth=2,
        num_heads=4,
        head_dim=16,
        mlp_ratio=4.0,
        video_width=64,  # visual stream width (Mochi: 3072)
        audio_width=32,
        text_width=32,  # Mochi: 1536
        time_dim=64,  # width of the diffusion-time embedding
        patch=2,  # spatial patch of the video stream (latents: 2x2)
        text_vocab=260,  # bytes + pad/bos/eos; used by the 'bytes' text encoder
        text_encoder="bytes",  # 'bytes' (learned) | 'precomputed' (embeddings in the batch)
        text_embed_dim=0,  # input width of precomputed text embeddings
        rope_theta=100.0,  # base of the initial rotary frequencies (positions in frames/patches)
        ref_time=-4.0,  # time coordinate of the reference image, in video frames
        scan_layers=True,
        remat="none",  # none | full | save_dots | offload
        attention="xla",  # xla (reference) | blockwise (any) | flash_cpu | cudnn | splash
        attention_block=512,  # query/key block of blockwise and splash attention
        # XLA:CPU: projections see the tokens flattened to rows [B * N, d], so each weight
        # gradient is one 2-D dot (the demo step 0.86-0.89x). Not with mesh.sequence > 1:
        # the merged rows defeat sharding propagation there (the 10B plan's temporaries 5x).
        flat_projections=False,
        dtype="float32",  # compute dtype: float32 | bfloat16
        param_dtype="float32",
        audio=True,  # False: a silent model (no audio stream, tokens or head; text/ref -> video)
        ref=True,  # False: no reference-image tokens
        # Groups stitched into a trained model (e.g. ('audio',) or ('ref',)): their keys get a
        # learned per-head logit offset starting at stitch_offset (softmax weight ~5e-5), and
        # their own parameters are the "new" ones that train.warmup_new_steps trains first.
        # The offsets' AdamW steps are stitch_offset_lr times the learning rate: at lr 1e-3
        # an offset moves at most ~1e-3 a step, so from -30 (the first choice) it had moved
        # 0.35 after 2,000 steps, all weight decay (its gradient, ~e^-30, is below Adam's
        # eps): the old streams never saw the new one (README, the stitching experiment).
        stitch=(),
        stitch_offset=-10.0,
        stitch_offset_lr=30.0,
    )

    c.data = dict(
        source="tfds",  # TFDS ArrayRecord shards read by grain (mirage_jax/data/pipeline.py)
        dataset="synthetic_aroll/tiny",  # TFDS name/config, built by `mirage-jax prepare`
        data_dir="data_dir",  # where `mirage-jax prepare` wrote it
        split="train",
        # What the DiT's video stream sees: 'pixels' (patches of frames), 'latents' (cached VAE
        # latents written by `mirage-jax encode`) or 'encode' (pixels encoded on the fly by
        # the VAE at `vae_checkpoint`). With latents, data.frames counts video frames (1 + k*r)
        # and the audio window is (1 + k) * r frames, r - 1 of them before the first frame.
        video="pixels",
        workers=0,  # grain worker processes (0: in the main process)
        random_flip=False,  # augmentation, off by default
        frames=4,  # video frames per training window (25 fps)
        height=16,
        width=16,
        channels=3,
        audio_features=16,  # audio feature bins per video frame
        text_len=16,  # text tokens per example (padded)
        global_batch=8,
    )

    c.flow = dict(
        time_loc=0.0,  # logit-normal training time: t = sigmoid(loc + scale * N(0,1))
        time_scale=1.0,
        p_joint=0.1,  # task mix per example: generate audio and video together,
        p_video_to_audio=0.1,  # or audio from clean video; the rest is audio -> video
        p_video_prefix=0.1,  # some leading video frames clean (continuation / image-to-video)
        drop_text=0.1,  # classifier-free guidance: drop each condition independently
        drop_audio=0.1,
        drop_ref=0.1,
        motion_weight=0.0,  # extra loss weight on video tokens that change in time (lips)
    )

    c.optim = dict(
        lr=1e-3,
        warmup_steps=10,
        end_lr_ratio=0.1,  # cosine decays to lr * end_lr_ratio at train.steps
        b1=0.9,
        b2=0.95,
        weight_decay=0.01,
        clip_norm=1.0,
        ema_decay=0.999,
    )

    c.train = dict(
        steps=100,
        grad_accum=1,  # micro-batches per step (global_batch must divide)
        log_every=10,
        ckpt_every=50,
        keep=3,
        peak_flops=0.0,  # FLOP/s for MFU; 0 measures a matmul at start
        max_bad_steps=10,  # non-finite loss/grads skip the update; this many in a row stop (0: no)
        on_save_error="stop",  # a failed checkpoint write: 'stop' training or log and 'continue'
        # Stitching warm-up: the first N steps train only model.stitch's new parameters (the
        # rest frozen, no optimizer state for them), then everything with a fresh lr warm-up.
        warmup_new_steps=0,
        # Persistent XLA compilation cache: a resumed or repeated run loads its compiled step
        # instead of compiling it again ("" = off; JAX_COMPILATION_CACHE_DIR, if set, wins).
        compile_cache="~/.cache/mirage_jax/xla",
    )

    c.vae = vae_defaults()  # the video VAE (mirage_jax/model/vae.py)
    c.amdim = amdim_defaults()  # the AMDIM encoder and its views (mirage_jax/amdim/)
    c.sync = sync_defaults()  # the audio-visual sync judge (mirage_jax/amdim/sync.py)

    c.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)  # -1: the remaining devices
    c.sharding_rules = DEFAULT_RULES
    c.lock()
    return c


def _check_against(schema, cfg, prefix=""):
    """Every key of `cfg` exists in `schema` with a compatible type."""
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key '{name}'")
        want, got = schema[key], cfg[key]
        if isinstance(want, ml_collections.ConfigDict):
            if not isinstance(got, ml_collections.ConfigDict):
                raise ConfigError(f"config key '{name}' must be a group, got {got!r}")
            _check_against(want, got, name + ".")
        elif not _type_ok(want, got):
            raise ConfigError(
                f"config key '{name}' must be {type(want).__name__}, got {type(got).__name__} {got!r}"
            )


def _type_ok(want, got) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return isinstance(want, bool) and isinstance(got, bool)
    if isinstance(want, float):
        return isinstance(got, (int, float))
    if want is None or got is None:
        return True
    return isinstance(got, type(want))


def load_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports a config file and calls its get_config()."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"mirage_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config()")
    cfg = module.get_config()
    _check_against(base_config(), cfg)
    return cfg


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --config.model.remat=full


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: list[str]
) -> ml_collections.ConfigDict:
    """Applies `config.a.b=value` strings (the leading 'config.' or '--config.' is optional)."""
    cfg = cfg.copy_and_resolve_references()
    schema = base_config()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like --config.a.b=value")
        key, text = item.split("=", 1)
        key = key.lstrip("-")
        key = key[len("config.") :] if key.startswith("config.") else key
        *parents, leaf = key.split(".")
        node, snode = cfg, schema
        for p in parents:
            if p not in snode or not isinstance(snode[p], ml_collections.ConfigDict):
                raise ConfigError(f"unknown config key '{key}'")
            node, snode = node[p], snode[p]
        if leaf not in snode or isinstance(snode[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key '{key}'")
        value = _parse_value(text)
        if isinstance(snode[leaf], str) and not isinstance(value, str):
            value = text
        if not _type_ok(snode[leaf], value):
            raise ConfigError(
                f"config key '{key}' must be {type(snode[leaf]).__name__}, got {text!r}"
            )
        if isinstance(snode[leaf], float):
            value = float(value)
        with node.unlocked():
            node[leaf] = value
    validate(cfg)
    return cfg


def _is_box(box) -> bool:
    """(y0, y1, x0, x1) fractions of a frame with positive height and width."""
    return len(box) == 4 and 0 <= box[0] < box[1] <= 1 and 0 <= box[2] < box[3] <= 1


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Cross-field checks that a type system cannot express."""
    m, d = cfg.model, cfg.data
    checks = [
        (cfg.task in ("dit", "vae", "amdim", "sync"), "task", cfg.task),
        (cfg.task not in ("amdim", "sync") or d.video == "pixels", "data.video", d.video),
        (cfg.task != "sync" or d.frames >= cfg.sync.window + cfg.sync.min_shift, "data.frames",
         d.frames),  # a clip needs a shifted window as a negative
        (0 < cfg.sync.min_shift <= cfg.sync.max_shift, "sync.min_shift", cfg.sync.min_shift),
        (cfg.amdim.image_size in (32, 64), "amdim.image_size", cfg.amdim.image_size),
        (cfg.amdim.head_norm in ("batch", "layer"), "amdim.head_norm", cfg.amdim.head_norm),
        (all(f.strip() in ("r1", "r5", "r7") for f in cfg.amdim.probe_features.split(",")),
         "amdim.probe_features", cfg.amdim.probe_features),
        (cfg.amdim.ndf > 0 and cfg.amdim.depth > 0 and cfg.amdim.n_rkhs > 0, "amdim.ndf",
         cfg.amdim.ndf),
        (cfg.amdim.tclip > 0, "amdim.tclip", cfg.amdim.tclip),
        (cfg.amdim.frame_stride >= 1, "amdim.frame_stride", cfg.amdim.frame_stride),
        (0 < cfg.amdim.crop_min_scale <= 1, "amdim.crop_min_scale", cfg.amdim.crop_min_scale),
        (_is_box(cfg.amdim.region), "amdim.region", cfg.amdim.region),
        (len(cfg.amdim.crop_ratio) == 2 and 0 < cfg.amdim.crop_ratio[0] <= cfg.amdim.crop_ratio[1],
         "amdim.crop_ratio", cfg.amdim.crop_ratio),
        (_is_box(cfg.vae.mouth_region), "vae.mouth_region", cfg.vae.mouth_region),
        (cfg.task != "amdim" or d.global_batch * (d.frames + cfg.amdim.use_ref) >= 2,
         "data.global_batch", d.global_batch),  # InfoNCE needs another image as a negative
        (d.video in ("pixels", "latents", "encode"), "data.video", d.video),
        (d.video != "encode" or bool(cfg.vae_checkpoint), "vae_checkpoint", cfg.vae_checkpoint),
        (d.video == "pixels" or not d.random_flip, "data.random_flip", d.random_flip),
        (d.video == "pixels" or (d.frames - 1) % cfg.vae.temporal_factor == 0, "data.frames",
         d.frames),
        (m.remat in ("none", "full", "save_dots", "offload"), "model.remat", m.remat),
        (m.attention in ("xla", "blockwise", "flash_cpu", "cudnn", "splash"), "model.attention",
         m.attention),
        (m.attention_block > 0, "model.attention_block", m.attention_block),
        (not m.flat_projections or cfg.mesh.sequence == 1, "model.flat_projections",
         m.flat_projections),  # with sequence parallelism: see base_config
        (m.dtype in ("float32", "bfloat16"), "model.dtype", m.dtype),
        (m.param_dtype in ("float32", "bfloat16"), "model.param_dtype", m.param_dtype),
        (m.text_encoder in ("bytes", "precomputed"), "model.text_encoder", m.text_encoder),
        (m.head_dim % 2 == 0, "model.head_dim", m.head_dim),
        (all(n % m.patch == 0 for n in video_shape(cfg)[1:3]), "model.patch", m.patch),
        (d.global_batch % cfg.train.grad_accum == 0, "train.grad_accum", cfg.train.grad_accum),
        (cfg.train.on_save_error in ("stop", "continue"), "train.on_save_error",
         cfg.train.on_save_error),
        (cfg.train.max_bad_steps >= 0, "train.max_bad_steps", cfg.train.max_bad_steps),
        (cfg.flow.p_joint + cfg.flow.p_video_to_audio <= 1.0, "flow.p_joint", cfg.flow.p_joint),
        (set(m.stitch) <= {g for g in ("audio", "ref") if m[g]}, "model.stitch", m.stitch),
        (0 <= cfg.train.warmup_new_steps < max(cfg.train.steps, 1)
         and (not cfg.train.warmup_new_steps or bool(m.stitch)), "train.warmup_new_steps",
         cfg.train.warmup_new_steps),
    ]
    for ok, key, value in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' has an invalid value {value!r}")


def load(path: str | pathlib.Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    return apply_overrides(load_file(path), list(overrides))


def from_dict(values: dict, where: str = "stored config") -> ml_collections.ConfigDict:
    """A config saved as JSON (e.g. in a checkpoint) back into the schema, lists as tuples.
    Keys the schema has since gained keep their defaults; unknown keys are named."""

    def tuples(x):
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    def fill(node, vals, prefix):
        for key, value in vals.items():
            if key not in node:
                raise ConfigError(f"{where}: unknown config key '{prefix}{key}'")
            if isinstance(node[key], ml_collections.ConfigDict):
                fill(node[key], value, f"{prefix}{key}.")
            else:
                with node.unlocked():
                    node[key] = tuples(value)

    cfg = base_config()
    fill(cfg, values, "")
    validate(cfg)
    return cfg

