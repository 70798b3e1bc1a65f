"""mirage_jax: a JAX/Flax implementation of Mirage, audio-to-video generation."""

from setuptools import find_packages, setup

setup(
    name="mirage_jax",
    version="0.1.0",
    description="Mirage audio-to-video diffusion transformer in JAX/Flax NNX",
    packages=find_packages(include=["mirage_jax", "mirage_jax.*"]),
    # model.attention=flash_cpu compiles this on first use (mirage_jax/model/flash_cpu.py)
    package_data={"mirage_jax.model": ["flash_cpu.cc"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "librosa>=0.11",
        "av>=14",
        "espeakng-loader>=0.2.4",
        "ml_collections>=1.0",
        "safetensors>=0.5",
        "tensorboardX>=2.6",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        # torch: the PyTorch reference model (mirage_jax/torch/); the parity tests need it.
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist", "torch==2.13.0"],
        # Accelerator builds of jax; install one of these on the pod / cluster.
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
        "torch": ["torch==2.13.0"],
    },
    entry_points={"console_scripts": ["mirage-jax=mirage_jax.cli:main"]},
)
