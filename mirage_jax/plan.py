"""Pod planning without a pod: the train step AOT-compiled for a mesh of simulated devices.

`mirage-jax plan --config C --mesh data=A,fsdp=B,tensor=C,sequence=D [--chips v5p,h100]`
builds nothing: the state is `jax.eval_shape`, the inputs are ShapeDtypeStructs carrying
NamedShardings, and `jit(...).lower(...).compile()` runs on A*B*C*D CPU devices made with
`--xla_force_host_platform_device_count` (set here before JAX starts its backend).

Reported per device: parameter, optimizer-state, EMA and batch bytes (exact, from the
shardings) and temporaries (XLA's buffer assignment for XLA:CPU: an estimate of what a TPU
or GPU compile would need, not a measurement of it). FLOPs come from the step's jaxpr
(matmuls and convolutions, loop bodies times their trip counts), because XLA's
`cost_analysis()` counts a scanned layer's body once; "model" FLOPs leave out
recomputation (remat, blockwise attention's backward) and are what MFU is measured against.
"""

from __future__ import annotations

import math
import os
import re
import time

# Peak dense bf16 FLOP/s and HBM bytes per chip (a chip is one JAX device), as published
# (GB taken as 1e9 bytes: where a sheet means GiB, the fit test errs on the safe side).
CHIPS = {
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2
    "v5e": (197e12, 16e9),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e
    "v5p": (459e12, 95e9),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM
    "v6e": (918e12, 32e9),
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense (1,979 with sparsity), 80 GB HBM3
    "h100": (989e12, 80e9),
    # NVIDIA H200 SXM datasheet: 989 TFLOP/s bf16 dense, 141 GB HBM3e
    "h200": (989e12, 141e9),
}
MFU_ASSUMED = 0.4


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' -> all four axes (unnamed ones are 1)."""
    from mirage_jax.sharding import MESH_AXES

    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh wants axis=size with axes {MESH_AXES}, got '{item}'")
        sizes[name] = int(value)
    return sizes


def simulate_devices(n: int) -> None:
    """Makes n CPU devices, if JAX's backend has not started yet; else checks it has n."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       os.environ.get("XLA_FLAGS", ""))
        # LLVM optimisation does not change buffer sizes; off, it compiles several times faster.
        if "xla_backend_optimization_level" not in flags:
            flags += " --xla_backend_optimization_level=0"
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # not XLA's sharding warnings
        import jax

        jax.config.update("jax_platforms", "cpu")
    import jax

    have = len(jax.devices("cpu"))
    if have < n:
        raise ValueError(f"the mesh needs {n} devices but JAX started with {have} CPU devices; "
                         f"run `mirage-jax plan` in a fresh process")


# N x N x D matmuls of the fused CPU attention's calls (flash_cpu.cc): forward Q K^T and
# P V; backward Q K^T again (recomputed), dO V^T, P^T dO, dS^T Q and dS K.
KERNEL_MATMULS = {"MirageFlashFwd": 2, "MirageFlashBwd": 5}


def count_flops(jaxpr, scale: float = 1.0) -> float:
    """FLOPs of the matmuls and convolutions in a jaxpr, with scan bodies times their length
    (a while loop, of unknown trip count, once; a cond, its costliest branch)."""
    from jax.extend import core

    if isinstance(jaxpr, core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (contract, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            per_output = math.prod(rhs) / rhs[params["dimension_numbers"].rhs_spec[0]]
            # An input-dilated conv (the input gradient of a strided one) skips the zeros
            # it inserts: about 1 / prod(lhs_dilation) of its taps are real.
            per_output /= math.prod(params.get("lhs_dilation") or (1,))
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
        elif name == "ffi_call" and params["target_name"] in KERNEL_MATMULS:
            b, n, h, d = eqn.invars[0].aval.shape  # q of the fused attention
            total += 2.0 * KERNEL_MATMULS[params["target_name"]] * b * h * n * n * d
        elif name == "scan":
            total += params["length"] * count_flops(params["jaxpr"])
        elif name == "cond":
            total += max(count_flops(b) for b in params["branches"])
        elif name == "shard_map":  # the body sees one shard: every device runs it
            total += params["mesh"].size * count_flops(params["jaxpr"])
        else:
            total += sum(count_flops(j) for j in core.jaxprs_in_params(params))
    return total * scale


def abstract_batch(cfg) -> dict:
    """ShapeDtypeStructs of one global batch, as the data pipeline yields it."""
    import jax
    import jax.numpy as jnp

    from mirage_jax.model.tokens import audio_frames, video_shape

    b, d = cfg.data.global_batch, cfg.data
    t, h, w, c = (d.frames, d.height, d.width, d.channels) if cfg.task == "vae" else video_shape(cfg)
    frames = d.frames if cfg.task == "vae" else audio_frames(cfg)
    f32 = jnp.float32
    return {
        "video": jax.ShapeDtypeStruct((b, t, h, w, c), f32),
        "audio": jax.ShapeDtypeStruct((b, frames, d.audio_features), f32),
        "text": jax.ShapeDtypeStruct((b, d.text_len), jnp.int32),
        "ref": jax.ShapeDtypeStruct((b, h, w, c), f32),
    }


def _device_bytes(abstract, shardings) -> int:
    import jax

    return sum(
        math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
        for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
    )


def model_flops(cfg, state, batch) -> tuple[float, float]:
    """(FLOPs of the step as compiled; model FLOPs) per step, all devices (`state`: the
    Setup of `cfg`)."""
    import jax

    from mirage_jax.train.step import make_train_step

    compiled = count_flops(jax.make_jaxpr(make_train_step(cfg, state))(state.abstract, batch))
    return compiled, model_step_flops(cfg, state, batch, compiled)


def model_step_flops(cfg, setup, batch, step_flops: float | None = None) -> float:
    """Model FLOPs of one step, all devices: no recomputation, so no remat and the reference
    attention (traced only, never built), whose backward is 2 matmuls to the blockwise
    backward's 5 (probabilities recomputed). `step_flops`: the count of `cfg`'s own step,
    which is the model's when it has no remat and the reference attention."""
    import jax

    from mirage_jax.train import state as state_lib
    from mirage_jax.train.step import make_train_step

    if (cfg.model.remat, cfg.model.attention) == ("none", "xla"):
        if step_flops is not None:
            return step_flops
        c, s = cfg, setup
    else:
        c = cfg.copy_and_resolve_references()
        with c.unlocked():
            c.model.remat, c.model.attention = "none", "xla"
        s = state_lib.setup(c, setup.mesh)
    return count_flops(jax.make_jaxpr(make_train_step(c, s))(s.abstract, batch))


def plan(cfg, chips=tuple(CHIPS), step_time: float = 0.0) -> dict:
    """Compiles `cfg`'s train step for `cfg.mesh` on simulated devices; the figures as a dict."""
    import jax

    from mirage_jax import sharding
    from mirage_jax.train import state as state_lib
    from mirage_jax.train.loop import tokens_per_example
    from mirage_jax.train.step import compile_step

    note = ""
    if cfg.model.attention in ("cudnn", "splash"):  # GPU/TPU kernels do not compile on CPU
        note = f"attention planned as 'blockwise' (stands in for '{cfg.model.attention}')"
        cfg = cfg.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.model.attention = "blockwise"
    sizes = {a: int(cfg.mesh[a]) for a in sharding.MESH_AXES}
    n = math.prod(sizes.values())
    simulate_devices(n)
    mesh = sharding.make_mesh(sizes, jax.devices("cpu")[:n])
    s = state_lib.setup(cfg, mesh)
    batch = abstract_batch(cfg)
    t0 = time.perf_counter()
    compiled = compile_step(cfg, s, batch)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hw_flops, flops = model_flops(cfg, s, batch)
    shard = sharding.batch_sharding(mesh, cfg.sharding_rules)
    r = {
        "config_params": sum(x.size for x in jax.tree.leaves(s.abstract["params"])),
        "mesh": sizes,
        "devices": n,
        "global_batch": cfg.data.global_batch,
        "tokens_per_example": tokens_per_example(cfg),
        "params_bytes": _device_bytes(s.abstract["params"], s.shardings["params"]),
        "opt_state_bytes": _device_bytes(s.abstract["opt_state"], s.shardings["opt_state"]),
        "ema_bytes": _device_bytes(s.abstract["ema"], s.shardings["ema"]),
        "batch_bytes": _device_bytes(batch, {k: shard for k in batch}),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "flops": flops,  # per step, all devices, without recomputation (model FLOPs)
        "flops_compiled": hw_flops,  # with remat and recomputation: what the devices execute
        "xla_cost_flops": float(compiled.cost_analysis().get("flops", 0.0)),  # per device
        "compile_s": compile_s,
        "note": note,
    }
    # Donated state: outputs reuse the arguments' buffers (alias), the rest is new.
    r["total_bytes"] = (r["argument_bytes"] + r["temp_bytes"]
                        + r["output_bytes"] - r["alias_bytes"])
    r["chips"] = {}
    for name in chips:
        peak, hbm = CHIPS[name]
        per_device = flops / n
        row = {"peak_flops": peak, "hbm_bytes": hbm, "fits": r["total_bytes"] <= hbm,
               "step_s_at_40": per_device / (MFU_ASSUMED * peak)}
        if step_time:
            row["mfu_needed"] = per_device / (step_time * peak)
        r["chips"][name] = row
    return r


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def report(r: dict, step_time: float = 0.0) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"parameters {r['config_params']:,}; mesh {mesh} ({r['devices']} devices); "
        f"global batch {r['global_batch']} x {r['tokens_per_example']:,} tokens; "
        f"compiled in {r['compile_s']:.0f} s" + (f"; {r['note']}" if r["note"] else ""),
        "per device:",
        f"  parameters      {_gib(r['params_bytes'])}",
        f"  optimizer state {_gib(r['opt_state_bytes'])}",
        f"  EMA             {_gib(r['ema_bytes'])}",
        f"  batch           {_gib(r['batch_bytes'])}",
        f"  temporaries     {_gib(r['temp_bytes'])}  (XLA:CPU buffer assignment)",
        (f"  total           {_gib(r['total_bytes'])}  (arguments + temporaries + "
         f"outputs not aliased to donated arguments)"),
        (f"FLOPs per step: {r['flops']:.3e} model, {r['flops_compiled']:.3e} executed "
         f"({r['flops'] / r['devices']:.3e} model per device)"),
    ]
    header = f"{'chip':6} {'peak TFLOP/s':>12} {'HBM':>10} {'fits':>5} {'step s @40% MFU':>16}"
    lines.append(header + (f" {'MFU for ' + format(step_time, 'g') + ' s':>12}" if step_time else ""))
    for name, c in r["chips"].items():
        line = (f"{name:6} {c['peak_flops'] / 1e12:12.0f} {_gib(c['hbm_bytes']):>10} "
                f"{'yes' if c['fits'] else 'no':>5} {c['step_s_at_40']:16.2f}")
        if "mfu_needed" in c:
            line += f" {c['mfu_needed']:12.1%}"
        lines.append(line)
    return "\n".join(lines)
