"""VAE checkpoint -> latent statistics -> cached latents dataset -> DiT on latents."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import REPO

from mirage_jax import cli, config, generate
from mirage_jax.data.pipeline import GrainSource
from mirage_jax.latents import Codec, report_batches
from mirage_jax.model import tokens
from mirage_jax.train import loop
from mirage_jax.train.checkpoint import Checkpointer

TINY = REPO / "configs" / "tiny.py"
VAE = ["task=vae", "data.frames=9", "vae.widths=(8, 16, 16)", "vae.latent_channels=4",
       "train.steps=4", "train.ckpt_every=2", "optim.ema_decay=0.5"]
LATENT_DIT = ["vae.latent_channels=4", "data.frames=5", "model.patch=2", "train.steps=3"]


@pytest.fixture(scope="module")
def vae_run(corpus_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vae")
    cfg = config.load(TINY, [f"data.data_dir={corpus_dir}", *VAE])
    loop.train(cfg, workdir)
    return workdir, cfg


@pytest.fixture(scope="module")
def latents_dir(vae_run, corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    rc = cli.main(["encode", "--vae", str(vae_run[0]), "--dataset", "synthetic_aroll/tiny",
                   "--data_dir", str(corpus_dir), "--out", str(out), "--audio-features", "16"])
    assert rc == 0
    return out


def test_vae_checkpoints_store_latent_stats_that_normalise(vae_run):
    workdir, cfg = vae_run
    ckpt = Checkpointer(workdir / "checkpoints", 2, 3)
    assert {2, 4} <= set(ckpt.manager.all_steps())
    for step in ckpt.manager.all_steps():
        stats = ckpt.read_json(step, "latent_stats")
        assert len(stats["mean"]) == len(stats["std"]) == 4
        assert min(stats["std"]) > 0 and np.isfinite(stats["psnr_test"])
        assert np.isfinite(stats["psnr_mouth_test"]) and stats["test_clips"] == 8
        # the whole mouth's error is the frame-weighted mix of the first frame's and the rest's
        low, high = sorted((stats["psnr_mouth_first_test"], stats["psnr_mouth_rest_test"]))
        assert low - 1e-6 <= stats["psnr_mouth_test"] <= high + 1e-6
        # and the rest's, of its closed and open frames (the corpus's mouth_open)
        low, high = sorted((stats["psnr_mouth_closed_test"], stats["psnr_mouth_open_test"]))
        assert low - 1e-6 <= stats["psnr_mouth_rest_test"] <= high + 1e-6
    ckpt.close()
    # The stored statistics really whiten the latents of the batches they were measured on.
    codec = Codec(workdir)
    z = np.concatenate([np.asarray(codec.encode(b["video"])) for b in report_batches(cfg)])
    z = z.reshape(-1, 4)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-3)


def test_codec_refuses_what_is_not_a_vae(tmp_path, corpus_dir):
    cfg = config.load(TINY, [f"data.data_dir={corpus_dir}", "train.steps=1"])
    loop.train(cfg, tmp_path)
    with pytest.raises(ValueError, match="'dit' checkpoint, not a VAE"):
        Codec(tmp_path)


def test_encoded_dataset_matches_the_codec(vae_run, latents_dir, corpus_dir):
    codec = Codec(vae_run[0])
    src = tfds.data_source("synthetic_aroll/tiny", data_dir=corpus_dir)["train"]
    lat = tfds.data_source("mirage_latents/synthetic_aroll_tiny", data_dir=latents_dir)["train"]
    assert len(lat) == len(src) == 40
    rec, pix = lat[3], src[3]
    assert rec["latents"].shape == (3, 2, 2, 4)  # 12 frames -> 9 -> 1 + 2 latent frames
    assert rec["frame_latents"].shape == (12, 2, 2, 4)
    assert rec["audio_features"].shape == (12, 16)
    np.testing.assert_array_equal(rec["mouth_open"], pix["mouth_open"])
    np.testing.assert_allclose(rec["latents"], codec.encode(pix["video"][None, :9])[0], atol=1e-5)
    np.testing.assert_allclose(rec["frame_latents"][7], codec.encode(pix["video"][None, 7:8])[0, 0],
                               atol=1e-5)
    # Causal: the cached prefix is what encoding a shorter clip from frame 0 gives.
    np.testing.assert_allclose(rec["latents"][:2], codec.encode(pix["video"][None, :5])[0],
                               atol=1e-4)


def test_pipeline_windows_of_cached_latents(latents_dir):
    cfg = config.load(TINY, [f"data.data_dir={latents_dir}", "data.video=latents",
                             "data.dataset=mirage_latents/synthetic_aroll_tiny", *LATENT_DIT])
    assert config.video_shape(cfg) == (2, 2, 2, 4) and tokens.audio_frames(cfg) == 8
    b = next(GrainSource(cfg))
    assert b["video"].shape == (8, 2, 2, 2, 4) and b["ref"].shape == (8, 2, 2, 4)
    assert b["audio"].shape == (8, 8, 16) and b["mouth_open"].shape == (8, 8)
    lat = tfds.data_source("mirage_latents/synthetic_aroll_tiny", data_dir=latents_dir)["train"]
    for i in range(8):
        rec = lat[int(b["index"][i])]
        j0 = next(j for j in range(2) if np.array_equal(rec["latents"][j:j + 2], b["video"][i]))
        a0 = (j0 - 1) * 4 + 1  # latent j0 codes frames up to j0 * 4
        ref = a0 + int(b["ref_time"][i])
        assert not a0 <= ref < a0 + 8  # the reference lies outside the window
        np.testing.assert_array_equal(b["ref"][i], rec["frame_latents"][ref])
        k = max(-a0, 0)  # audio frames before the clip are silence
        np.testing.assert_array_equal(b["audio"][i, k:], rec["audio_features"][a0 + k:a0 + 8])
        assert np.allclose(b["audio"][i, :k], b["audio"].min())
    streams = tokens.batch_to_streams(b, cfg)
    np.testing.assert_array_equal(np.unique(streams["video"].pos[0, :, 0]), [3.0, 7.0])


def test_a_config_that_does_not_fit_the_latents_is_named(latents_dir):
    cfg = config.load(TINY, [f"data.data_dir={latents_dir}", "data.video=latents",
                             "data.dataset=mirage_latents/synthetic_aroll_tiny", *LATENT_DIT,
                             "vae.latent_channels=8"])
    with pytest.raises(ValueError, match="latent_channels: latents have 4, config has 8"):
        GrainSource(cfg)


@pytest.mark.parametrize("mode", ["latents", "encode"])
def test_dit_trains_on_latents(mode, vae_run, latents_dir, corpus_dir, tmp_path):
    data = ([f"data.data_dir={latents_dir}", "data.dataset=mirage_latents/synthetic_aroll_tiny"]
            if mode == "latents" else [f"data.data_dir={corpus_dir}"])
    cfg = config.load(TINY, [*data, f"data.video={mode}", f"vae_checkpoint={vae_run[0]}",
                             *LATENT_DIT])
    summary = loop.train(cfg, tmp_path)
    assert len(summary["losses"]) == 3 and np.all(np.isfinite(summary["losses"]))
    params = summary["state"]["params"]
    assert params["video_in"]["kernel"].shape[0] == 2 * 2 * 4  # 2x2 patches of 4 channels
    jax.block_until_ready(params)
    if mode == "latents":  # generation samples latents window by window, then decodes them
        gen = generate.Generator(tmp_path)
        wave = np.sin(np.arange(8000) / 5.0).astype(np.float32) * 0.3  # 0.5 s: 12 frames
        frames = gen(wave, "a woman", None, generate.Settings(steps=2), False)
        assert frames.shape == (12, 16, 16, 3) and frames.dtype == np.uint8
        assert gen.units_for(12) == 4 and gen.audio_start(1) == 1 and gen.audio_start(0) == -3


def test_safetensors_export_loads_like_the_run(vae_run, corpus_dir, tmp_path):
    path = tmp_path / "vae_export"
    assert cli.main(["export", "--checkpoint", str(vae_run[0]), "--out", str(path)]) == 0
    a, b = Codec(vae_run[0]), Codec(path)
    assert b.report == a.report and b.cfg.vae.latent_channels == 4
    x = tfds.data_source("synthetic_aroll/tiny", data_dir=corpus_dir)["test"][0]["video"][None, :9]
    np.testing.assert_array_equal(a.encode(x), b.encode(x))
    with open(path / "model.safetensors", "rb") as f:
        assert b"pickle" not in f.read(2000)


def test_generate_refuses_a_vae_checkpoint(vae_run, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    rc = cli.main(["generate", "--checkpoint", str(vae_run[0]), "--text", "Hi.", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "is a 'vae' checkpoint, not a DiT" in capsys.readouterr().err


def test_weights_file_that_does_not_fit_names_the_arrays(vae_run, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from mirage_jax.train.checkpoint import CheckpointMismatch

    good, bad = tmp_path / "vae_export", tmp_path / "bad"
    assert cli.main(["export", "--checkpoint", str(vae_run[0]), "--out", str(good)]) == 0
    with safe_open(str(good / "model.safetensors"), framework="numpy") as f:
        meta, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    dropped = sorted(arrays)[0]
    grown = sorted(arrays)[1]
    arrays["extra.weight"] = arrays.pop(dropped)
    arrays[grown] = np.zeros((*arrays[grown].shape, 2), arrays[grown].dtype)
    bad.mkdir()
    (bad / "config.json").write_text((good / "config.json").read_text())
    save_file(arrays, str(bad / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointMismatch) as e:
        Codec(bad)
    msg = str(e.value)
    assert f"missing in export: {dropped}" in msg and "not in model: extra.weight" in msg
    assert f"shape differs: {grown} export" in msg
