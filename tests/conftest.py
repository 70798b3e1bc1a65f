"""Tests run on CPU with 8 fake devices, so sharding is real without an accelerator."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_cfg():
    from mirage_jax import config

    return config.load(REPO / "configs" / "tiny.py")


def pytest_configure(config):
    assert jax.device_count() == 8, "conftest must set XLA_FLAGS before jax starts"
