"""Training: one-batch overfit, mesh equivalence, sharded state, the loop's metrics.
(Kill -9 and resume, the compile cache across runs: tests/test_reliability.py.)"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import OPTIMIZED, REPO
from flax import nnx

from mirage_jax import config, sharding
from mirage_jax.data.pipeline import GrainSource
from mirage_jax.model.dit import DiT
from mirage_jax.train import state as state_lib
from mirage_jax.train.step import MODEL_KEYS, batch_loss, compile_step


def test_one_batch_overfit_drops_loss_10x(tiny_cfg):
    """Same batch, same noise and times every step: the model must memorise it."""
    cfg = config.apply_overrides(tiny_cfg, ["config.data.global_batch=4"])
    batch = {
        k: jnp.asarray(v) for k, v in GrainSource(cfg).batch(0).items() if k in MODEL_KEYS
    }
    model = DiT(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(3e-3)
    opt = tx.init(params)
    key = jax.random.key(7)

    @functools.partial(jax.jit, compiler_options=OPTIMIZED)
    def step(params, opt):
        loss, grads = jax.value_and_grad(
            lambda p: batch_loss(nnx.merge(graphdef, p), batch, key, cfg)[0]
        )(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for _ in range(70):  # it passes 10x at about step 50
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    print("overfit", losses[::10])
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def losses_for(cfg, batches, devices, init=None):
    """Trains `cfg` on the given per-step global batches from `init` (a host copy of a
    state; None: a fresh one); returns losses and the final state."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    setup = state_lib.setup(cfg, mesh)
    state = state_lib.init_state(cfg, setup) if init is None else jax.device_put(
        init, setup.shardings)
    shard = sharding.batch_sharding(mesh, cfg.sharding_rules)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()
                if k in MODEL_KEYS}
    step_fn = compile_step(cfg, setup, abstract)
    losses = []
    with jax.set_mesh(mesh):
        for local in batches:
            batch = {k: jax.device_put(v, shard) for k, v in local.items() if k in MODEL_KEYS}
            state, m = step_fn(state, batch)
            losses.append(float(m["loss"]))
    return np.array(losses), state


def _losses_on_mesh(cfg, mesh_axes, devices, init, steps=3):
    overrides = [f"config.mesh.{k}={v}" for k, v in zip(("data", "fsdp", "tensor"), mesh_axes)]
    cfg = config.apply_overrides(cfg, overrides)
    source = GrainSource(cfg)
    return losses_for(cfg, [source.batch(i) for i in range(steps)], devices, init)


def test_same_losses_on_1_device_and_8_device_meshes(tiny_cfg):
    """The initial state built on 2x2x2 is the one built on one device, bitwise; every mesh
    then trains from that state (one init compiled twice, not four times)."""
    cfg = config.apply_overrides(tiny_cfg, ["config.optim.warmup_steps=1"])
    one = jax.devices()[:1]
    init = jax.device_get(state_lib.init_state(cfg, state_lib.setup(
        cfg, sharding.make_mesh(cfg.mesh, one))))
    sharded_cfg = config.apply_overrides(cfg, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    sharded = state_lib.init_state(sharded_cfg, state_lib.setup(
        sharded_cfg, sharding.make_mesh(sharded_cfg.mesh)))
    kernel = sharded["params"]["blocks"]["video"]["fc1"]["kernel"]
    assert kernel.addressable_shards[0].data.shape[1:] == (kernel.shape[1] // 2,
                                                           kernel.shape[2] // 2)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(sharded), init)
    ref, ref_state = _losses_on_mesh(cfg, (1, 1, 1), one, init)
    assert np.all(np.isfinite(ref)) and ref[0] != ref[-1]
    for axes in ((8, 1, 1), (2, 4, 1), (2, 2, 2)):
        losses, state = _losses_on_mesh(cfg, axes, jax.devices(), init)
        np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=1e-5, err_msg=f"mesh {axes}")
        kernel = state["params"]["blocks"]["video"]["fc1"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        assert kernel.addressable_shards[0].data.shape[1:] == (
            kernel.shape[1] // axes[1],
            kernel.shape[2] // axes[2],
        )
        np.testing.assert_allclose(
            kernel, ref_state["params"]["blocks"]["video"]["fc1"]["kernel"], rtol=1e-4, atol=1e-6
        )


def test_fsdp_shards_nearly_all_parameter_bytes():
    cfg = config.load(REPO / "configs" / "demo.py", ["config.mesh.fsdp=8", "config.mesh.data=1"])
    mesh = sharding.make_mesh(cfg.mesh)
    setup = state_lib.setup(cfg, mesh)
    frac = sharding.replicated_fraction(setup.abstract["params"], setup.shardings["params"])
    assert frac <= 0.02, f"{frac:.1%} of parameter bytes replicated under fsdp=8"
    opt_leaves = jax.tree.leaves(setup.shardings["opt_state"])
    assert any(s.spec != jax.sharding.PartitionSpec() for s in opt_leaves)  # moments follow params


def test_loop_reads_metrics_one_step_late_and_counts_mfu_over_every_layer(
        tmp_path, tiny_cfg, monkeypatch):
    """One run of the loop, two properties.

    No host sync: the metrics of step k are read only after step k+1 has been dispatched,
    so the host never waits for the device between steps. (A transfer guard cannot show
    this on CPU: there device-to-host reads are not guarded.)

    MFU: the loop takes its FLOPs from the model FLOPs `plan.model_flops` counts (as
    `bench train` does), not from XLA's cost analysis, which counts the scanned layers once;
    the peak is measured by `bench.matmul_rate` where `train.peak_flops` is 0, and
    metrics.jsonl's `mfu` is model FLOPs per device x steps/s / peak."""
    from mirage_jax import plan
    from mirage_jax.train import loop

    events = []
    compile_step_ = loop.compile_step

    def logged_compile(*args):
        fn = compile_step_(*args)

        class Logged:
            def __getattr__(self, name):
                return getattr(fn, name)

            def __call__(self, state, batch):
                events.append(("step", int(jax.device_get(state["step"]))))
                return fn(state, batch)

        return Logged()

    emit_ = loop._emit
    monkeypatch.setattr(loop, "compile_step", logged_compile)
    monkeypatch.setattr(loop, "_emit", lambda m, pending, *a: events.append(("read", pending[0]))
                        or emit_(m, pending, *a))
    cfg = config.apply_overrides(tiny_cfg, ["--config.train.steps=4", "--config.train.ckpt_every=2"])
    assert cfg.model.scan_layers and cfg.model.depth == 2 and not cfg.train.peak_flops
    summary = loop.train(cfg, tmp_path / "run")
    assert len(summary["losses"]) == 4 and all(np.isfinite(summary["losses"]))
    assert events == [("step", 0), ("step", 1), ("read", 0), ("step", 2), ("read", 1),
                      ("step", 3), ("read", 2), ("read", 3)]

    mesh = sharding.make_mesh(cfg.mesh)
    model = plan.model_flops(cfg, state_lib.setup(cfg, mesh), plan.abstract_batch(cfg))[1]
    assert summary["flops_per_step"] == model and mesh.size == 8
    assert summary["flops_per_device"] == model / 8
    # Two scanned layers: XLA's per-device count (its elementwise ops included) has one.
    assert summary["flops_per_device"] > 1.5 * summary["xla_cost_flops"] > 0, summary
    assert 1e9 < summary["peak_flops"] < 1e15  # measured: a CPU's float32 matmul
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        want = summary["flops_per_device"] * r["steps_per_s"] / summary["peak_flops"]
        assert r["mfu"] == pytest.approx(want, rel=1e-9), r


def test_loop_without_countable_flops_logs_no_mfu(tmp_path, tiny_cfg, monkeypatch, caplog):
    from mirage_jax.train import loop

    def fail(*args):
        raise NotImplementedError("no FLOP rule for this step")

    monkeypatch.setattr(loop, "model_step_flops", fail)
    # The step of the test above (4 steps: the same schedule), so the suite's compilation
    # cache has it.
    cfg = config.apply_overrides(tiny_cfg, ["--config.train.steps=4", "--config.train.ckpt_every=2",
                                            "--config.train.peak_flops=1e12"])
    with caplog.at_level("WARNING", logger="mirage_jax"):
        summary = loop.train(cfg, tmp_path / "run")
    assert summary["flops_per_step"] is None and len(summary["losses"]) == 4
    assert "no MFU: the step's model FLOPs could not be counted (NotImplementedError: no FLOP " \
           "rule for this step)" in caplog.text
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and not any("mfu" in r for r in recs)
    assert all(r["steps_per_s"] > 0 for r in recs)
