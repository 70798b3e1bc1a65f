"""Tests run on CPU with 8 fake devices, so sharding is real without an accelerator."""

import fcntl
import importlib.metadata
import os
import tempfile

# Compile time dominates these tests. LLVM optimisation off halves it, and XLA:CPU's older
# elemental (non-MLIR) fusion emitters cut it by a quarter (the tiny train step on 8
# devices: 14 s -> 11 s). Eigen's intra-op threads only fight the other test worker for the
# second core (the tiny step, two processes at once: 0.60 -> 0.49-0.57 s). XLA aborts on a
# flag it does not know, so these two are passed only to the jaxlib releases they were
# measured on.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2]) <= (0, 10):
    FAST_COMPILE += " --xla_cpu_use_fusion_emitters=false --xla_cpu_multi_thread_eigen=false"


# For a test that runs one step 70-250 times, level 0's slower code costs more than its
# faster compile saves: such a test jits its step with these options (the VAE's 250 steps:
# compile 5 s -> 9.5 s, step 0.13 s -> 0.043 s).
OPTIMIZED = {"xla_backend_optimization_level": 2}


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test's subprocess: `devices` fake CPU devices, the suite's compile level."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


# 8 fake CPU devices in the test process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session and the subprocesses it starts: a resumed
# run then reuses the executable of the run it resumes instead of compiling it again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mirage_jax_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """The tiny synthetic corpus (48 clips, 16x16), built once per test session."""
    from mirage_jax.data import synthetic_aroll

    data_dir = tmp_path_factory.mktemp("data")
    synthetic_aroll.prepare("tiny", str(data_dir), workers=0)
    return data_dir


@pytest.fixture(scope="session")
def tiny_cfg(corpus_dir):
    from mirage_jax import config

    return config.load(REPO / "configs" / "tiny.py", [f"config.data.data_dir={corpus_dir}"])


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id):
    """A directory every xdist worker of this session sees (their base temp's parent)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


def build_once(path: pathlib.Path, build) -> pathlib.Path:
    """`build(path)` in the first worker to ask; the others wait for it, then reuse `path`.
    A build that raised leaves no mark, so the next worker tries again."""
    done = path / ".built"
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def tiny_dit_run(shared_dir, corpus_dir):
    """3 train steps of configs/tiny.py: the checkpoint that generation and evaluation read,
    trained once per session (test_generate.py and test_evaluate.py run on two workers)."""
    from mirage_jax import config
    from mirage_jax.train import loop

    cfg = config.load(REPO / "configs" / "tiny.py", [f"data.data_dir={corpus_dir}",
                                                     "train.steps=3"])
    return build_once(shared_dir / "tiny_dit", lambda path: loop.train(cfg, path))


@pytest.fixture(scope="session")
def sync_judge_run(shared_dir, corpus_dir):
    """A small sync judge (configs/sync_demo.py on 12 frames of 16x16) trained 60 steps by the
    shared loop, once per session: test_sync.py tests it, test_evaluate.py judges with it."""
    from mirage_jax import config
    from mirage_jax.train import loop

    cfg = config.load(REPO / "configs" / "sync_demo.py", [
        f"data.data_dir={corpus_dir}", "data.dataset=synthetic_aroll/tiny", "data.height=16",
        "data.width=16", "data.frames=12", "data.audio_features=16", "data.global_batch=8",
        "sync.crop_size=16", "sync.ndf=8", "sync.width=32", "sync.n_rkhs=32", "optim.lr=3e-3",
        "optim.warmup_steps=5", "train.steps=60", "train.ckpt_every=60", "train.log_every=10"])
    return cfg, build_once(shared_dir / "sync_judge", lambda path: loop.train(cfg, path))


# `make test` hands whole files to its two workers in collection order (xdist's loadfile,
# --no-loadscope-reorder); the heaviest first lets both finish together. The order is that
# of their seconds (`--durations=0`, summed per file) when it was set, at 36ae9aa; since then
# the reliability, distributed and VAE files got faster, and at 9e8b407 one worker still
# waited only 33 s for the other. Sync comes before evaluate, which reads its judge. Files
# not named here run last.
HEAVY_FIRST = ("test_reliability.py", "test_train.py", "test_latents.py", "test_generate.py",
               "test_amdim.py", "test_vae.py", "test_distributed.py", "test_stitch.py",
               "test_scale.py", "test_sync.py", "test_sequence_parallel.py", "test_torch.py",
               "test_bench.py", "test_model.py", "test_evaluate.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


def pytest_configure(config):
    assert jax.device_count() == 8, "conftest must set XLA_FLAGS before jax starts"
