"""Stitching (issue 6): step-0 equivalence, the restore report, the frozen warm-up, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mirage_jax import config, flow, sharding
from mirage_jax.data.pipeline import GrainSource
from mirage_jax.model.tokens import batch_to_streams
from mirage_jax.train import state as state_lib
from mirage_jax.train import stitch
from mirage_jax.train.checkpoint import Checkpointer, CheckpointMismatch, flat_paths
from mirage_jax.train.step import MODEL_KEYS, compile_step

MESH = ["config.mesh.data=2", "config.mesh.fsdp=4"]  # restores land on real shards


def _state(cfg, devices=1):
    """Setup and fresh state on the first `devices` devices (one: compiles fastest)."""
    setup = state_lib.setup(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:devices]))
    return setup, state_lib.init_state(cfg, setup)


def _save(tmp_path, name, cfg, state):
    ckpt = Checkpointer(tmp_path / name / "checkpoints", every=1, keep=1, async_save=False)
    ckpt.save(0, state, cfg, force=True)
    ckpt.close()
    return str(tmp_path / name)


def _trained_like(state, seed=1):
    """Parameters perturbed away from init: nonzero gates and heads, so every stream and
    every attention weight shapes the output (an untrained DiT outputs exactly 0)."""
    leaves, tree = jax.tree.flatten(state["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return dict(state, params=jax.tree.unflatten(tree, noisy))


def _held_out_streams(cfg):
    """A test-split batch, noised for audio -> video, with every audio token attended."""
    test = config.apply_overrides(cfg, ["config.data.split=test", "config.data.global_batch=4"])
    batch = {k: jnp.asarray(v) for k, v in GrainSource(test).batch(0).items() if k in MODEL_KEYS}
    streams, _, _ = flow.training_inputs(jax.random.key(3), batch_to_streams(batch, test), test)
    for g in ("audio", "ref", "text"):
        streams[g] = streams[g].replace(mask=jnp.ones_like(streams[g].mask))
    return streams


def _video_velocity(setup, params, streams):
    return np.asarray(jax.jit(lambda p, s: nnx.merge(setup.graphdef, p)(s)["video"])(
        jax.device_get(params), streams))


def _rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def _stitch_difference(tmp_path, old_cfg, new_overrides, name):
    """Relative RMS difference of the video velocity, old model vs stitched, at step 0."""
    old_setup, old_state = _state(old_cfg)
    old_state = _trained_like(old_state)
    run = _save(tmp_path, name, old_cfg, old_state)
    streams = _held_out_streams(old_cfg)
    want = _video_velocity(old_setup, old_state["params"], streams)
    cfg = config.apply_overrides(old_cfg, new_overrides + [f"config.init_from={run}"])
    setup, state = _state(cfg)
    state, report = stitch.init_from(cfg, setup, state)
    velocity = jax.jit(lambda p: nnx.merge(setup.graphdef, p)(streams)["video"])
    out = {}
    for offset in (cfg.model.stitch_offset, 0.0):  # the model's init, and none as a control
        params = jax.tree_util.tree_map_with_path(
            lambda path, x, o=offset: jnp.full_like(x, o) if "key_offset" in str(path) else x,
            jax.device_get(state["params"]))
        out[offset] = _rel_rms(np.asarray(velocity(params)), want)
    return out, report


def test_audio_stitched_into_silent_model_is_step0_equivalent(tiny_cfg, tmp_path):
    silent = config.apply_overrides(tiny_cfg, ["config.model.audio=False"])
    diff, report = _stitch_difference(
        tmp_path, silent, ["config.model.audio=True", "config.model.stitch=('audio',)",
                           "config.model.attention=blockwise", "config.model.attention_block=8"],
        "silent")
    print("step-0 relative RMS difference (stitch_offset, offset 0):", diff)
    assert diff[silent.model.stitch_offset] < 1e-3, diff
    assert diff[0.0] > 1e-2, diff  # without the offset the audio keys do change the video
    assert report["new"] and all("audio" in k for k in report["new"]) and not report["ignored"]
    assert "blocks/audio_key_offset" in report["new"] and "audio_in/kernel" in report["new"]


def test_ref_stitched_into_audio_model_is_step0_equivalent(tiny_cfg, tmp_path):
    no_ref = config.apply_overrides(tiny_cfg, ["config.model.ref=False"])
    diff, report = _stitch_difference(
        tmp_path, no_ref, ["config.model.ref=True", "config.model.stitch=('ref',)"], "no_ref")
    print("ref step-0 relative RMS difference (stitch_offset, offset 0):", diff)
    assert report["new"] == ["blocks/ref_key_offset"] and not report["ignored"]
    assert diff[no_ref.model.stitch_offset] < 1e-3 and diff[0.0] > 1e-2, diff


def test_restore_report_extra_missing_and_sharded(tiny_cfg, tmp_path):
    cfg = config.apply_overrides(tiny_cfg, MESH)
    setup, state = _state(cfg, devices=8)
    stored = _trained_like(state)
    params = dict(jax.device_get(stored["params"]))
    params["extra"] = np.arange(3.0, dtype=np.float32)  # in the checkpoint only
    params["time"] = {"fc1": params["time"]["fc1"], "fc2": {"kernel": params["time"]["fc2"]["kernel"]}}
    run = _save(tmp_path, "odd", cfg, {"step": 0, "params": params})

    cfg = config.apply_overrides(cfg, [f"config.init_from={run}"])
    setup, fresh = _state(cfg, devices=8)
    fresh_bias = np.asarray(fresh["params"]["time"]["fc2"]["bias"])
    state, report = stitch.init_from(cfg, setup, fresh)
    assert report["new"] == ["time/fc2/bias"] and report["ignored"] == ["extra"]
    assert len(report["restored"]) == len(flat_paths(setup.abstract["params"])) - 1
    got, want = flat_paths(state["params"]), flat_paths(params)
    for k in report["restored"]:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k])
    np.testing.assert_array_equal(np.asarray(got["time/fc2/bias"]), fresh_bias)
    for k, sh in flat_paths(setup.shardings["params"]).items():
        assert got[k].sharding == sh, k  # read straight into the target shards
    assert any(len(s.device_set) > 1 and s.spec != jax.sharding.PartitionSpec()
               for s in flat_paths(setup.shardings["params"]).values())
    np.testing.assert_array_equal(np.asarray(flat_paths(state["ema"])["video_in/kernel"]),
                                  want["video_in/kernel"])


def test_shape_mismatch_names_paths_and_shapes(tiny_cfg, tmp_path):
    setup, state = _state(tiny_cfg)
    params = dict(jax.device_get(state["params"]))
    params["video_in"] = {"kernel": np.zeros((5, 7), np.float32),
                          "bias": params["video_in"]["bias"]}
    run = _save(tmp_path, "bad", tiny_cfg, {"step": 0, "params": params})
    cfg = config.apply_overrides(tiny_cfg, [f"config.init_from={run}"])
    with pytest.raises(CheckpointMismatch) as err:
        stitch.init_from(cfg, setup, state)
    want = setup.abstract["params"]["video_in"]["kernel"].shape
    assert f"video_in/kernel: checkpoint (5, 7) vs model {tuple(want)}" in str(err.value)


def test_warmup_freezes_old_parameters_then_trains_all_and_resumes(tiny_cfg, tmp_path):
    silent = config.apply_overrides(tiny_cfg, ["config.model.audio=False"])
    _, old = _state(silent)
    run = _save(tmp_path, "silent", silent, _trained_like(old))
    cfg = config.apply_overrides(tiny_cfg, [
        "config.model.stitch=('audio',)", f"config.init_from={run}",
        "config.train.warmup_new_steps=3", "config.train.steps=5", "config.optim.warmup_steps=1"])
    setup, state = _state(cfg)
    state, report = stitch.init_from(cfg, setup, state)
    new = set(report["new"])
    # No moments for frozen parameters in the warm-up optimizer.
    warm_sizes = sum(x.size for x in jax.tree.leaves(state["opt_state"].new) if x.ndim)
    new_sizes = sum(v.size for k, v in flat_paths(state["params"]).items() if k in new)
    assert warm_sizes == 2 * new_sizes  # mu and nu of the new parameters only

    source = GrainSource(cfg)
    batches = [source.batch(i) for i in range(5)]
    shard = sharding.batch_sharding(setup.mesh, cfg.sharding_rules)
    step_fn = compile_step(cfg, setup, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                        for k, v in batches[0].items() if k in MODEL_KEYS})

    def run_steps(state, steps):
        snaps, losses = [], []
        with jax.set_mesh(setup.mesh):
            for i in steps:
                batch = {k: jax.device_put(v, shard) for k, v in batches[i].items()
                         if k in MODEL_KEYS}
                state, m = step_fn(state, batch)
                losses.append(float(m["loss"]))
                snaps.append(jax.device_get(flat_paths(state["params"])))
        return state, snaps, losses

    start = jax.device_get(flat_paths(state["params"]))
    ckpt = Checkpointer(tmp_path / "stitched", every=1, keep=2, async_save=False)
    mid, snaps, _ = run_steps(state, range(2))
    ckpt.save(2, mid, cfg, force=True)
    _, more, more_losses = run_steps(mid, range(2, 5))
    snaps += more
    for k, v in start.items():
        if k in new:  # the warm-up trains the new parameters (lr 0 at its first step)
            assert not np.array_equal(snaps[2][k], v), k
            continue
        for i in range(3):  # and leaves the old ones bit-identical
            np.testing.assert_array_equal(snaps[i][k], v, err_msg=k)
    # The key offsets step model.stitch_offset_lr times further than AdamW's ~lr a step
    # (the second warm-up step is the first at lr > 0): from stitch_offset they can open.
    opened = snaps[2]["blocks/audio_key_offset"] - start["blocks/audio_key_offset"]
    assert np.all(np.abs(opened) > 0.5 * cfg.model.stitch_offset_lr * cfg.optim.lr), opened
    moved = [k for k in start if k not in new and not np.array_equal(snaps[4][k], start[k])]
    assert len(moved) > 0.9 * (len(start) - len(new)), "after the warm-up everything trains"

    resumed = ckpt.restore(2, setup.abstract, setup.shardings)  # the phase is in opt_state
    ckpt.close()
    assert int(resumed["opt_state"].count) == 2
    _, again, again_losses = run_steps(resumed, range(2, 5))
    assert again_losses == more_losses  # bitwise, across the phase boundary
    for k in start:
        np.testing.assert_array_equal(again[-1][k], snaps[-1][k], err_msg=k)
