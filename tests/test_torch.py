"""Export to PyTorch: the layout on disk, the PyTorch models' parity with JAX (float32),
export from an FSDP-sharded checkpoint, and the round trip back to Orbax."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from mirage_jax import cli, config, export, flow
from mirage_jax.model import tokens
from mirage_jax.model.vae import psnr
from mirage_jax.train import state as state_lib
from mirage_jax.train.checkpoint import CheckpointMismatch, flat_paths, load_run
from conftest import REPO

torch = pytest.importorskip("torch")

from mirage_jax.torch import load_pretrained  # noqa: E402
from mirage_jax.torch import sampler as torch_sampler  # noqa: E402
from mirage_jax.torch.dit import Stream as TorchStream  # noqa: E402


def model_and_export(cfg, tmp_path, seed=0):
    """Random parameters for `cfg`'s JAX model (adaLN-Zero gates and output heads included,
    which start at zero), exported to `tmp_path` and loaded in PyTorch."""
    abstract = state_lib.abstract_model(cfg)
    rng = np.random.default_rng(seed)
    scale = 0.3 if cfg.task == "dit" else 1.0

    def draw(path, a):
        x = rng.normal(size=a.shape) * scale / (a.shape[-2] if a.ndim > 1 else 1) ** 0.5
        return x + (path[-1].key == "scale")  # norm scales around 1

    graphdef = nnx.graphdef(abstract)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(draw(path, a), jnp.float32),
        nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    out = export.write(tmp_path / cfg.task, cfg, params, {"step": 0, "weights": "ema"})
    torch_model, _ = load_pretrained(out)
    return graphdef, params, torch_model


def random_streams(cfg, seed=0, batch=2):
    """Clean streams of a random batch, then random per-token times on audio and video, text
    padding and one example without its reference image."""
    rng = np.random.default_rng(seed)
    t, h, w, c = tokens.video_shape(cfg)
    text = np.zeros((batch, cfg.data.text_len), np.int32)
    text[:, :5] = rng.integers(3, 259, (batch, 5))
    b = {"video": rng.normal(size=(batch, t, h, w, c)), "ref": rng.normal(size=(batch, h, w, c)),
         "audio": rng.normal(size=(batch, tokens.audio_frames(cfg), cfg.data.audio_features)),
         "text": text}
    b = {k: jnp.asarray(v, jnp.int32 if k == "text" else jnp.float32) for k, v in b.items()}
    streams = tokens.batch_to_streams(b, cfg)
    for g in ("video", "audio"):
        streams[g] = streams[g].replace(t=jnp.asarray(rng.uniform(size=streams[g].t.shape),
                                                      jnp.float32))
    streams["ref"] = streams["ref"].replace(mask=streams["ref"].mask.at[1].set(False))
    return streams


def to_torch(streams):
    conv = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    return {g: TorchStream(conv(s.x), conv(s.t), conv(s.pos), conv(s.mask))
            for g, s in streams.items()}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", ["tiny", "demo", "latent_demo"])
def test_dit_velocity_matches_jax(name, tmp_path):
    cfg = config.load(REPO / "configs" / f"{name}.py", [])
    graphdef, params, torch_model = model_and_export(cfg, tmp_path)
    streams = random_streams(cfg)
    want = jax.jit(lambda p, s: nnx.merge(graphdef, p)(s))(params, streams)
    with torch.no_grad():
        got = torch_model(to_torch(streams))
    for g in ("video", "audio"):
        err = rel_err(got[g], want[g])
        print(f"{name} {g}: max |torch - jax| / max |jax| = {err:.2e}")
        assert np.abs(np.asarray(want[g])).max() > 0.1 and err < 1e-4, (g, err)


def small_vae_cfg(**kw):
    cfg = config.load(REPO / "configs" / "tiny.py", [])
    cfg.task = "vae"
    cfg.vae.widths, cfg.vae.latent_channels = (8, 16), 4
    cfg.vae.spatial_factor, cfg.vae.temporal_factor = 4, 2
    for k, v in kw.items():
        setattr(cfg.data, k, v)
    return cfg


def test_vae_decode_and_encode_match_jax(tmp_path):
    """A random small VAE (with the training-only critic), and the shipped demo VAE (a
    trained export) at the demo size."""
    small_cfg = small_vae_cfg()
    small_cfg.vae.adversarial_weight = 0.1
    graphdef, params, small = model_and_export(small_cfg, tmp_path)
    shipped = load_run(REPO / "demo_assets" / "vae_demo", None)
    demo, demo_cfg = load_pretrained(REPO / "demo_assets" / "vae_demo")
    assert demo.latent_stats == shipped["latent_stats"] and demo_cfg.vae.latent_channels == 16
    rng = np.random.default_rng(0)
    for cfg, gd, p, tmodel, (b, t, h, w) in [
        (small_cfg, graphdef, params, small, (2, 5, 16, 16)),
        (demo_cfg, shipped["graphdef"], shipped["params"], demo, (1, 9, 64, 64)),
    ]:
        run = jax.jit(lambda p, x, z, gd=gd: (lambda m: (m.encode(x)[0], m.decode(z)))(
            nnx.merge(gd, p)))
        v = cfg.vae
        zshape = (b, 1 + (t - 1) // v.temporal_factor, h // v.spatial_factor,
                  w // v.spatial_factor, v.latent_channels)
        z = rng.normal(size=zshape).astype(np.float32)
        x = np.tanh(rng.normal(size=(b, t, h, w, 3))).astype(np.float32)
        want_mean, want_video = run(p, x, z)
        with torch.no_grad():
            got_mean = tmodel.encode(torch.from_numpy(x))[0]
            got_video = tmodel.decode(torch.from_numpy(z))
        e_dec, e_enc = rel_err(got_video, want_video), rel_err(got_mean, want_mean)
        print(f"VAE {h}x{w}: decode {e_dec:.2e}, encode mean {e_enc:.2e}")
        assert e_dec < 1e-4 and e_enc < 1e-4, (e_dec, e_enc)
    want = jax.jit(lambda p, x: nnx.merge(graphdef, p).critic(x))(params, x[:, :5, :16, :16])
    with torch.no_grad():
        got = small.critic(torch.from_numpy(x[:, :5, :16, :16]))
    assert rel_err(got, want) < 1e-4


def test_sampler_gives_the_same_video(tmp_path):
    """Audio-guided Heun sampling of latents by the DiT, decoded by the VAE: JAX against
    PyTorch given the same noise. Different noise gives a clearly different video."""
    from mirage_jax.torch.dit import unpatchify

    vae_cfg = small_vae_cfg(frames=9)
    dit_cfg = small_vae_cfg(frames=9)
    dit_cfg.task, dit_cfg.data.video = "dit", "latents"
    gd, params, tdit = model_and_export(dit_cfg, tmp_path)
    vgd, vparams, tvae = model_and_export(vae_cfg, tmp_path, seed=3)
    streams = random_streams(dit_cfg, batch=1)
    streams = {g: s.replace(t=jnp.zeros_like(s.t)) for g, s in streams.items()}
    generate = {"video": jnp.ones(streams["video"].t.shape, bool)}
    schedule, key = flow.linear_quadratic_schedule(6), jax.random.key(4)
    n, h, w, _ = tokens.video_shape(dit_cfg)
    p = dit_cfg.model.patch

    @jax.jit
    def jax_video(params, vparams, streams):
        velocity = flow.guided(lambda s: nnx.merge(gd, params)(s), [("audio", 2.0)], cosine=True)
        out = flow.sample(velocity, streams, generate, key, schedule, "heun")
        return nnx.merge(vgd, vparams).decode(tokens.streams_to_video(out["video"].x, dit_cfg, n))

    def torch_video(noise):
        velocity = torch_sampler.guided(tdit, [("audio", 2.0)], cosine=True)
        gen = {"video": torch.ones(streams["video"].t.shape, dtype=torch.bool)}
        out = torch_sampler.sample(velocity, to_torch(streams), gen, {"video": noise}, schedule,
                                   "heun")
        with torch.no_grad():
            return tvae.decode(unpatchify(out["video"].x, n, h, w, p)).numpy()

    want = np.asarray(jax_video(params, vparams, streams))
    noise = jax.random.normal(jax.random.split(key, 1)[0], streams["video"].x.shape)
    same = float(psnr(torch_video(torch.from_numpy(np.array(noise))), want))
    other = float(psnr(torch_video(torch.randn(noise.shape)), want))
    print(f"sampler: PSNR {same:.1f} dB with the same noise, {other:.1f} dB with other noise")
    assert want.shape == (1, 9, 16, 16, 3) and 0.05 < np.mean(np.abs(want) < 1) and want.std() > 0.1
    assert same >= 40.0 and other < 30.0, (same, other)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """2 train steps of the tiny DiT on 8 devices as fsdp=8, saved as the loop saves."""
    from mirage_jax import sharding
    from mirage_jax.train.checkpoint import Checkpointer
    from mirage_jax.train.step import compile_step

    cfg = config.load(REPO / "configs" / "tiny.py", ["config.mesh.data=1", "config.mesh.fsdp=8"])
    mesh = sharding.make_mesh(cfg.mesh)
    setup = state_lib.setup(cfg, mesh)
    state = state_lib.init_state(cfg, setup)
    streams = random_streams(cfg, batch=8)
    rng = np.random.default_rng(1)
    batch = {"video": rng.normal(size=(8, *tokens.video_shape(cfg))).astype(np.float32),
             "ref": rng.normal(size=(8, *tokens.video_shape(cfg)[1:])).astype(np.float32),
             "audio": np.asarray(streams["audio"].x), "text": np.asarray(streams["text"].x)}
    step = compile_step(cfg, setup, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                     for k, v in batch.items()})
    shard = sharding.batch_sharding(mesh, cfg.sharding_rules)
    with jax.set_mesh(mesh):
        for _ in range(2):
            state, _ = step(state, {k: jax.device_put(v, shard) for k, v in batch.items()})
    kernel = state["ema"]["blocks"]["video"]["fc1"]["kernel"]
    assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 8  # really sharded
    run = tmp_path_factory.mktemp("fsdp_run")
    ckpt = Checkpointer(run / "checkpoints", every=1, keep=1, async_save=False)
    ckpt.save(2, state, cfg, force=True)
    ckpt.close()
    return run, {w: {k: np.asarray(v) for k, v in flat_paths(state[w]).items()}
                 for w in ("ema", "params")}


@pytest.fixture(scope="module")
def fsdp_export(fsdp_run, tmp_path_factory):
    """The EMA weights of `fsdp_run` exported in files of at most 0.25 MiB."""
    out = tmp_path_factory.mktemp("fsdp_export") / "export"
    assert cli.main(["export", "--checkpoint", str(fsdp_run[0]), "--out", str(out),
                     "--max-shard-mb", "0.25"]) == 0
    return out


def test_export_from_fsdp_checkpoint_sharded_files(fsdp_run, fsdp_export, tmp_path):
    run, trained = fsdp_run
    out = fsdp_export
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n >= 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(set(index["weight_map"].values())) == files
    assert all(p.stat().st_size <= 0.25 * 2**20 + 4096 for p in out.glob("*.safetensors"))
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"] == "dit" and meta["step"] == 2 and meta["weights"] == "ema"
    assert "blocks.1.video.q.weight" in index["weight_map"]  # [out, in], one per layer
    exported = load_run(out, None)
    a, b = trained["ema"], flat_paths(exported["params"])
    assert a.keys() == b.keys() and exported["step"] == 2
    for k in a:
        np.testing.assert_array_equal(a[k], np.asarray(b[k]), err_msg=k)
    q = a["blocks/video/q/kernel"][1]
    with safe_open(str(out / index["weight_map"]["blocks.1.video.q.weight"]), "numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("blocks.1.video.q.weight"), q.T)
    dit, cfg = load_pretrained(out)
    assert not dit.training and cfg.model.depth == 2
    np.testing.assert_array_equal(dit.blocks[1].video.q.weight.detach().numpy(), q.T)

    bf16 = tmp_path / "bf16"  # half the bytes, every value rounded to bfloat16
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(bf16),
                     "--dtype", "bfloat16", "--no-ema"]) == 0
    with safe_open(str(bf16 / "model.safetensors"), "numpy") as f:
        w = f.get_tensor("blocks.1.video.q.weight")
    params_q = trained["params"]["blocks/video/q/kernel"][1]
    assert w.dtype.name == "bfloat16"
    np.testing.assert_array_equal(w, params_q.T.astype(w.dtype))
    assert json.loads((bf16 / "config.json").read_text())["weights"] == "params"


def test_import_torch_restores_bit_identically(fsdp_run, fsdp_export, tmp_path):
    out, back = fsdp_export, tmp_path / "back"
    assert cli.main(["import-torch", str(out), "--out", str(back)]) == 0
    want = fsdp_run[1]["ema"]
    for weights in ("ema", "params"):
        got = load_run(back, None, weights)
        assert got["step"] == 2
        got = flat_paths(got["params"])
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
    assert cli.main(["import-torch", str(out), "--out", str(back)]) == 2  # never overwrites


def test_files_that_do_not_fit_name_the_tensors(tmp_path):
    cfg = small_vae_cfg()
    model_and_export(cfg, tmp_path)
    good = tmp_path / "vae"
    with safe_open(str(good / "model.safetensors"), "numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    arrays["extra.weight"] = arrays.pop("decoder.out.weight")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((good / "config.json").read_text())
    save_file(arrays, str(tmp_path / "bad" / "model.safetensors"))
    for load in (load_pretrained, lambda p: load_run(p, None)):
        with pytest.raises(CheckpointMismatch) as e:
            load(tmp_path / "bad")
        assert "missing in export: decoder.out.weight" in str(e.value)
        assert "not in model: extra.weight" in str(e.value)
    for py in (REPO / "mirage_jax").rglob("*.py"):  # safetensors only: nothing unpickles
        text = py.read_text()
        assert "torch.load(" not in text and "import pickle" not in text, py
