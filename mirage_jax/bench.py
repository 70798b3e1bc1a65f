"""Benchmarks as ratios taken in one run (this machine is shared and noisy; absolute
seconds are not comparable between runs, ratios measured side by side are).

  mirage-jax bench data --config C    pipeline examples/s next to what the train step consumes
  mirage-jax bench attention --config C   the joint attention's backends alone, forward +
                                      backward at the config's shape (and torch's SDPA)
  mirage-jax bench train --config C   the train step: step time, tokens/s and MFU against a
                                      matmul peak measured in the same process, and the same
                                      model and batch in PyTorch (eager, torch.compile)

`bench train` runs on one device: on a CPU that is the whole machine (forced host devices
would only split the same cores); PyTorch gets as many threads. The parameters are random
(at the adaLN-Zero init the step would be trivial), converted to PyTorch by the export path;
PyTorch takes the JAX step's flow inputs (noised streams, targets, weights), and its step-0
loss must equal JAX's (rel. 1e-4) or the bench fails. FLOPs are model FLOPs counted from
the step's jaxpr (`plan.model_step_flops`): XLA's `cost_analysis()` counts a scanned layer once.
The report names the process's malloc (`host_malloc`): on a CPU it moves the JAX step.
"""
from __future__ import annotations

import copy
import functools
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax import sharding
from mirage_jax.data.pipeline import GrainSource, bench_data
from mirage_jax.model.dit import DTYPES
from mirage_jax.train import state as state_lib
from mirage_jax.train.loop import global_batch, tokens_per_example
from mirage_jax.train.step import MODEL_KEYS, compile_step, dit_flow_inputs

PEAK_N = 2048  # square matmul for the peak: large enough to be compute-bound on a CPU
LOSS_RTOL = 1e-4  # torch's step-0 loss against JAX's: the same computation or no comparison


def host_malloc() -> str:
    """The malloc this process runs on: 'tcmalloc', 'jemalloc' or 'glibc' ('unknown' without
    /proc). XLA:CPU allocates a step's buffers afresh on every call, and glibc hands large
    blocks back to the kernel when they are freed, so each step faults them in again;
    tcmalloc keeps them (`launch/tcmalloc.sh`; the demo step 0.78x on this CPU, README)."""
    try:
        maps = pathlib.Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return next((m for m in ("tcmalloc", "jemalloc") if f"lib{m}" in maps), "glibc")


def train_step_rate(cfg, steps: int = 10) -> dict:
    """Examples/s of the compiled train step on this machine's devices (data already there)."""
    mesh = sharding.make_mesh(cfg.mesh)
    setup = state_lib.setup(cfg, mesh)
    state = state_lib.init_state(cfg, setup)
    local = GrainSource(cfg).batch(0)
    abstract = {
        k: jax.ShapeDtypeStruct((cfg.data.global_batch,) + local[k].shape[1:], local[k].dtype)
        for k in MODEL_KEYS
    }
    step_fn = compile_step(cfg, setup, abstract)
    batch = global_batch(local, sharding.batch_sharding(mesh, cfg.sharding_rules))
    with jax.set_mesh(mesh):
        state, out = step_fn(state, batch)  # warm-up
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, out = step_fn(state, batch)
        jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    return {"examples_per_s": steps * cfg.data.global_batch / dt, "steps": steps, "seconds": dt}


def bench_data_vs_step(cfg, seconds: float = 10.0, steps: int = 10) -> dict:
    step = train_step_rate(cfg, steps)
    data = bench_data(cfg, seconds)
    data_rate = data["examples_per_s"] * jax.process_count()
    return {
        "pipeline_examples_per_s": data_rate,
        "train_step_examples_per_s": step["examples_per_s"],
        "ratio": data_rate / step["examples_per_s"],
        "workers": data["workers"],
    }


# ----------------------------------------------------------------------------- bench attention


def bench_attention(cfg, reps: int = 5, rounds: int = 3, use_torch: bool = True) -> dict:
    """Forward + backward of the joint attention alone at `cfg`'s shape (global batch,
    tokens per example, heads, head_dim; 10 % of keys masked), for each backend this platform
    runs in float32 (xla, blockwise; flash_cpu on a CPU) and, with torch installed, PyTorch's
    fused `scaled_dot_product_attention`; timed in turns, medians, each checked equal to the
    reference (outputs and q-gradient, 1e-4)."""
    from mirage_jax.model import attention

    m = cfg.model
    shape = (cfg.data.global_batch, tokens_per_example(cfg), m.num_heads, m.head_dim)
    ks = jax.random.split(jax.random.key(0), 5)
    q, k, v, dout = (jax.random.normal(x, shape) for x in ks[:4])
    mask = jax.random.uniform(ks[4], shape[:2]) > 0.1
    names = ["xla", "blockwise"] + (["flash_cpu"] if jax.default_backend() == "cpu" else [])

    def fwd_bwd(name, q, k, v, mask, dout):  # arguments, not constants XLA could fold
        sub = copy.deepcopy(m)
        sub.attention = name
        fn = attention._backend(sub, None)
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        return (out, *vjp(dout))

    jitted = {n: jax.jit(functools.partial(fwd_bwd, n)) for n in names}
    runners = {n: (lambda f=f: jax.block_until_ready(f(q, k, v, mask, dout)))
               for n, f in jitted.items()}
    want = jax.device_get(runners["xla"]())
    diff = lambda got: max(float(np.abs(np.asarray(got[i]) - want[i]).max()) for i in (0, 1))
    err = {n: diff(jax.device_get(f())) for n, f in runners.items()}  # output and dq
    if use_torch and _have_torch():
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        tq, tk, tv, tdo = (torch.from_numpy(np.asarray(x)).transpose(1, 2).contiguous()
                           for x in (q, k, v, dout))
        tmask = torch.from_numpy(np.asarray(mask))[:, None, None, :]

        def torch_sdpa():
            a, b, c = (x.detach().requires_grad_() for x in (tq, tk, tv))
            out = torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=tmask)
            out.backward(tdo)
            return out.transpose(1, 2), a.grad.transpose(1, 2)

        err["torch_sdpa"] = diff([x.detach().numpy() for x in torch_sdpa()])
        runners["torch_sdpa"] = torch_sdpa
    bad = {n: e for n, e in err.items() if e > 1e-4}
    if bad:
        raise RuntimeError(f"bench attention: backends differ from the reference: {bad}")
    for f in runners.values():
        f()
    times = {n: [] for n in runners}
    for _ in range(rounds):
        for n, f in runners.items():
            times[n] += [_timed(f) for _ in range(reps)]
    b, n, h, d = shape
    flops = 2.0 * 7 * b * h * n * n * d  # QK^T, PV; backward dP, dV, dQ, dK (+ QK^T recomputed)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"shape": list(shape), "ms": ms, "max_abs_err": err,
            "gflops_per_s": {name: flops / t / 1e6 for name, t in ms.items()},
            "over_xla": {name: t / ms["xla"] for name, t in ms.items()}}


def report_attention(r: dict) -> str:
    lines = [f"attention forward + backward, q/k/v {r['shape']} (B, N, H, D), 10 % keys masked",
             f"{'':12}{'ms':>9}{'GFLOP/s':>9}{'/ xla':>8}{'max err':>10}"]
    for name, ms in r["ms"].items():
        lines.append(f"{name:12}{ms:9.1f}{r['gflops_per_s'][name]:9.1f}"
                     f"{r['over_xla'][name]:8.2f}{r['max_abs_err'][name]:10.1e}")
    lines.append("GFLOP/s counts 7 N x N x D matmuls (forward 2, backward 4 + 1 recomputed)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- bench train


def _best_rate(fn, flops: float, reps: int) -> float:
    """FLOP/s of the fastest of `reps` timed calls (after one untimed): on a shared machine
    the fastest call is the one least disturbed."""
    fn()
    best = min(_timed(fn) for _ in range(reps))
    return flops / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_rate(m: int, k: int, n: int, dtype=jnp.float32, reps: int = 10) -> float:
    """FLOP/s of an [m, k] @ [k, n] matmul compiled by XLA on the first device."""
    dev = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((m, k), dtype), dev)
    b = jax.device_put(jnp.ones((k, n), dtype), dev)
    mm = jax.jit(lambda x, y: x @ y)
    return _best_rate(lambda: mm(a, b).block_until_ready(), 2.0 * m * k * n, reps)


def torch_matmul_rate(m: int, k: int, n: int, reps: int = 10) -> float:
    import torch

    a, b = torch.ones(m, k), torch.ones(k, n)
    return _best_rate(lambda: a @ b, 2.0 * m * k * n, reps)


def model_matmul(cfg) -> tuple[int, int, int]:
    """The model's largest matmul: a step's tokens through the video stream's first MLP layer."""
    m = cfg.model
    tokens = cfg.data.global_batch * tokens_per_example(cfg)
    return tokens, m.video_width, int(m.video_width * m.mlp_ratio)


def random_params(setup, seed: int = 0):
    """Random parameters for every leaf (adaLN-Zero gates and output heads included, which
    start at zero and would make the step-0 velocity, and the loss check, trivial); drawn on
    the host (a bench-sized model), placed in the state's shardings."""
    rng = np.random.default_rng(seed)

    def draw(path, a, sharding):
        fan_in = a.shape[-2] if len(a.shape) > 1 else 1
        x = 0.3 * rng.standard_normal(a.shape, np.float32) / fan_in**0.5
        return jax.device_put((x + (path[-1].key == "scale")).astype(a.dtype), sharding)

    return jax.tree_util.tree_map_with_path(draw, setup.abstract["params"],
                                            setup.shardings["params"])


def flow_inputs(cfg, state, batch):
    """What the JAX step's first micro-batch feeds its model at `state["step"]`: noised
    streams, velocity targets and loss weights, from `train.step.dit_flow_inputs` with the
    step's key (the loss check below fails if the keys drift apart)."""

    def inputs(rng, step, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
        return dit_flow_inputs(batch, jax.random.fold_in(key, 0), cfg)  # micro-batch 0

    return jax.device_get(jax.jit(inputs)(state["rng"], state["step"], batch))


def torch_model(cfg, params):
    """The PyTorch DiT with `params`, converted by the export path (safetensors written and
    loaded strictly), so both sides have the same parameters, name for name."""
    from mirage_jax import export
    from mirage_jax.torch import build, load_state

    with tempfile.TemporaryDirectory() as d:
        out = export.write(pathlib.Path(d) / "export", cfg, params, {"step": 0})
        model = build(cfg)
        load_state(model, out)
    return model


def _to_torch(inputs):
    import torch

    from mirage_jax.torch.dit import Stream

    def conv(a):
        return torch.from_numpy(np.array(a))

    noised, targets, weights = inputs
    streams = {g: Stream(conv(s.x), conv(s.t), conv(s.pos), conv(s.mask))
               for g, s in noised.items()}
    return (streams, {g: conv(v) for g, v in targets.items()},
            {g: conv(v) for g, v in weights.items()})


def _rel(a, b) -> float:
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


def _summary(times: list[float], warmup_s: float, flops: float, peak: float, tokens: int):
    step = statistics.median(times)
    return {"step_s": step, "step_s_min": min(times), "tokens_per_s": tokens / step,
            "mfu": flops / step / peak, "mfu_best": flops / min(times) / peak,
            "warmup_s": warmup_s, "steps_timed": len(times)}


class _JaxStep:
    """The compiled JAX step on a fixed batch, one call = one synchronised step."""

    def __init__(self, fn, state, batch, mesh):
        self.fn, self.state, self.batch, self.mesh = fn, state, batch, mesh

    def __call__(self):
        with jax.set_mesh(self.mesh):
            self.state, out = self.fn(self.state, self.batch)
        jax.block_until_ready((self.state, out))
        return out


def _torch_steps(cfg, params, inputs, threads: int, backend: str | None):
    """name -> (callable step, seconds of its first call, (loss, grad norm) of that call):
    eager, and with torch.compile's `backend` (None: none), each from a copy of the same
    initial model."""
    import torch

    from mirage_jax.torch.train import TrainStep

    torch.set_num_threads(threads)
    model = torch_model(cfg, params)
    variants = {"torch_eager": None} | ({"torch_compile": backend} if backend else {})
    steps, args = {}, _to_torch(inputs)
    for name, comp in variants.items():
        step = TrainStep(copy.deepcopy(model), cfg, backend=comp)
        t0 = time.perf_counter()
        loss, norm = step(*args)
        first = time.perf_counter() - t0
        steps[name] = (lambda step=step: step(*args), first, (float(loss), float(norm)))
    return steps


def bench_train(cfg, steps: int = 5, rounds: int = 3, batch: dict | None = None,
                use_torch: bool = True, compile_backend: str | None = "inductor",
                peak_n: int = PEAK_N) -> dict:
    """Times the JAX train step and, with torch installed, the same step in PyTorch (eager
    and compiled), `rounds` times `steps` steps each, the variants taking turns so a change in
    the machine's load hits all of them; step time is the median. `batch` (numpy, one global
    batch) defaults to the dataset's first."""
    if cfg.task != "dit" or cfg.train.grad_accum != 1:
        raise ValueError("bench train times the DiT step with train.grad_accum=1 (the PyTorch "
                         f"step takes one micro-batch); got task={cfg.task}, "
                         f"grad_accum={cfg.train.grad_accum}")
    if batch is None:
        batch = GrainSource(cfg).batch(0)
    batch = {k: np.asarray(batch[k]) for k in MODEL_KEYS}
    r, jax_step, params, inputs = _jax_side(cfg, batch, peak_n)
    torch_steps = {}
    if not use_torch or not _have_torch():
        r["torch_skipped"] = "--no-torch" if not use_torch else "torch is not installed"
    else:
        torch_steps = _torch_steps(cfg, params, inputs, r["threads"], compile_backend)
    t0 = time.perf_counter()
    out = jax.device_get(jax_step())  # step 0: the reference for torch's first step
    runners, first = {"jax": jax_step}, {"jax": time.perf_counter() - t0}
    r["loss"], r["grad_norm"] = float(out["loss"]), float(out["grad_norm"])
    for name, (fn, secs, (loss, norm)) in torch_steps.items():
        _check_same(r, name, loss, norm)
        runners[name], first[name] = fn, secs
    for name, fn in runners.items():  # a second untimed step (torch.compile may re-trace)
        first[name] += _timed(fn)
    times, cpu0 = {name: [] for name in runners}, _cpu_seconds()
    for _ in range(rounds):
        for name, fn in runners.items():
            times[name] += [_timed(fn) for _ in range(steps)]
    r["others_cpu_share"] = _others_share(cpu0, _cpu_seconds())
    peak_end = matmul_rate(peak_n, peak_n, peak_n, DTYPES[cfg.model.dtype])  # load changes
    r["peak_flops_per_s_start_end"] = [r.pop("peak_start"), peak_end]
    r["peak_flops_per_s"] = max(r["peak_flops_per_s_start_end"])
    for name, ts in times.items():
        r[name] = _summary(ts, first[name], r["flops_per_step"], r["peak_flops_per_s"],
                           r["tokens_per_step"])
    r["jax"]["compile_s"] = r.pop("jax_compile_s")
    if "torch_compile" in r:  # the first two calls trace and compile, less two steps
        r["torch_compile"]["compile_s"] = first["torch_compile"] - 2 * r["torch_compile"]["step_s"]
    if torch_steps:
        r["torch_model_matmul_flops_per_s"] = torch_matmul_rate(*model_matmul(cfg))
    r["ratios"] = {f"jax_over_{name}": r["jax"]["step_s"] / r[name]["step_s"]
                   for name in torch_steps}
    return r


def _jax_side(cfg, batch: dict, peak_n: int):
    """(figures so far, the compiled step on `batch` from random parameters, those parameters
    on the host, the flow inputs of its first step) on one device; the matmul peak is
    measured before anything else runs."""
    dtype = DTYPES[cfg.model.dtype]
    mesh = sharding.data_mesh(jax.local_devices()[:1])
    setup = state_lib.setup(cfg, mesh)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    mm = model_matmul(cfg)
    r = {"threads": len(os.sched_getaffinity(0)), "device": jax.local_devices()[0].platform,
         "malloc": host_malloc(), "attention": cfg.model.attention,
         "layers": "scanned" if cfg.model.scan_layers else "unrolled",
         "params": sum(x.size for x in jax.tree.leaves(setup.abstract["params"])),
         "global_batch": cfg.data.global_batch,
         "tokens_per_step": tokens_per_example(cfg) * cfg.data.global_batch,
         "dtype": cfg.model.dtype, "peak_matmul": f"{peak_n}^3 {cfg.model.dtype}",
         "peak_start": matmul_rate(peak_n, peak_n, peak_n, dtype),
         "model_matmul": "x".join(map(str, mm)),
         "model_matmul_flops_per_s": matmul_rate(*mm, dtype)}
    from mirage_jax.plan import model_step_flops

    t0 = time.perf_counter()
    step_fn = compile_step(cfg, setup, abstract)
    r["jax_compile_s"] = time.perf_counter() - t0
    r["flops_per_step"] = model_step_flops(cfg, setup, abstract)
    r["xla_cost_flops"] = float(step_fn.cost_analysis().get("flops", 0.0))
    state = state_lib.init_state(cfg, setup)
    state["params"] = random_params(setup)
    state["ema"] = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(state["params"])
    shard = sharding.batch_sharding(mesh, cfg.sharding_rules)
    batch = {k: jax.device_put(v, shard) for k, v in batch.items()}
    inputs = flow_inputs(cfg, state, batch)  # before step 0 donates the state
    params = jax.device_get(state["params"])
    return r, _JaxStep(step_fn, state, batch, mesh), params, inputs


def _check_same(r: dict, name: str, loss: float, norm: float) -> None:
    """Records torch's step-0 loss and gradient norm against JAX's; a loss off by more than
    LOSS_RTOL means the two compute different things, and their times would not compare."""
    r[f"{name}_loss_rel"] = _rel(loss, r["loss"])
    r[f"{name}_grad_norm_rel"] = _rel(norm, r["grad_norm"])
    if not r[f"{name}_loss_rel"] < LOSS_RTOL:
        raise RuntimeError(f"{name}: step-0 loss {loss} differs from JAX's {r['loss']} by "
                           f"{r[f'{name}_loss_rel']:.2e} (> {LOSS_RTOL}): not the same "
                           "computation, so no timing comparison")


def _cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds all processes used, CPU seconds this process used); the
    second is NaN without /proc/stat (not Linux)."""
    t = os.times()
    try:
        with open("/proc/stat") as f:
            ticks = [float(x) for x in f.readline().split()[1:9]]  # to `steal`, not guests
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    return time.perf_counter(), busy, t.user + t.system


def _others_share(start, end) -> float:
    """Fraction of the machine's CPU time that other processes (or, as `steal`, other virtual
    machines) took between two `_cpu_seconds()`: the contention the timings saw."""
    wall, busy, ours = (b - a for a, b in zip(start, end))
    return max(busy - ours, 0.0) / (wall * (os.cpu_count() or 1))


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def report_train(r: dict) -> str:
    """The table `mirage-jax bench train` prints."""
    g = 1e9
    lines = [
        (f"{r['params']:,} parameters; batch {r['global_batch']} ({r['tokens_per_step']:,} "
         f"tokens); {r['dtype']}; {r['device']}, {r['threads']} threads for XLA and torch; "
         f"malloc: {r['malloc']}; attention {r['attention']}, layers {r['layers']}"),
        (f"matmul peak {r['peak_flops_per_s'] / g:.1f} GFLOP/s ({r['peak_matmul']}, XLA, fastest"
         f" of 10; start/end {'/'.join(f'{p / g:.1f}' for p in r['peak_flops_per_s_start_end'])})"),
        f"model-shaped matmul {r['model_matmul']}: XLA {r['model_matmul_flops_per_s'] / g:.1f}"
        + (f", torch {r['torch_model_matmul_flops_per_s'] / g:.1f}"
           if "torch_model_matmul_flops_per_s" in r else "") + " GFLOP/s",
        (f"model FLOPs per step {r['flops_per_step']:.3e} (XLA cost analysis: "
         f"{r['xla_cost_flops']:.3e}, a scanned layer counted once)"),
        f"{'':15}{'step s':>9}{'min s':>9}{'tokens/s':>11}{'MFU':>8}{'best':>8}{'compile s':>11}",
    ]
    for name in ("jax", "torch_eager", "torch_compile"):
        if name in r:
            s = r[name]
            comp = f"{s['compile_s']:11.1f}" if "compile_s" in s else f"{'-':>11}"
            lines.append(f"{name:15}{s['step_s']:9.3f}{s['step_s_min']:9.3f}"
                         f"{s['tokens_per_s']:11.0f}{s['mfu']:8.1%}{s['mfu_best']:8.1%}{comp}")
    lines.append(f"step s: median of {r['jax']['steps_timed']} steps each, taken in turns; MFU "
                 f"of the median, best: of the fastest step; step-0 loss JAX {r['loss']:.6f}")
    for name in ("torch_eager", "torch_compile"):
        if name in r:
            lines.append(f"  {name}: loss rel. diff {r[f'{name}_loss_rel']:.1e}, "
                         f"grad norm rel. diff {r[f'{name}_grad_norm_rel']:.1e}")
    if r["ratios"]:
        lines.append("step time ratios (< 1: JAX faster): " + ", ".join(
            f"JAX / {k.removeprefix('jax_over_')} {v:.2f}" for k, v in r["ratios"].items()))
    if "torch_skipped" in r:
        lines.append(f"PyTorch skipped: {r['torch_skipped']}")
    if r["device"] == "cpu" and r["malloc"] == "glibc":
        lines.append("note: glibc malloc: XLA:CPU faults each step's buffers in afresh; "
                     "LD_PRELOAD=$(launch/tcmalloc.sh) keeps them (README, Benchmarks)")
    if r["others_cpu_share"] > 0.1:
        lines.append(f"warning: other processes took {r['others_cpu_share']:.0%} of the CPU "
                     "time while the steps ran; torch's OpenMP threads slow down far more than "
                     "XLA's under such contention, so these ratios are not a quiet machine's")
    return "\n".join(lines)
