"""Tests run on CPU with 8 fake devices, so sharding is real without an accelerator."""

import importlib.metadata
import os
import tempfile

# Compile time dominates these tests. LLVM optimisation off halves it, and XLA:CPU's older
# elemental (non-MLIR) fusion emitters cut it by a quarter (the tiny train step on 8
# devices: 14 s -> 11 s). XLA aborts on a flag it does not know, so that one is passed only
# to the jaxlib releases it was measured on.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2]) <= (0, 10):
    FAST_COMPILE += " --xla_cpu_use_fusion_emitters=false"


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


def pytest_configure(config):
    assert jax.device_count() == 8, "conftest must set XLA_FLAGS before jax starts"
