"""`model.attention='flash_cpu'`: the fused CPU attention kernel (flash_cpu.cc) as a JAX op.

XLA:CPU has no fused attention: the reference writes every [B, H, N, N] intermediate,
and at head_dim 32 that, not the FLOPs, is the step's cost. flash_cpu.cc is compiled
here on first use (the machine's C++ compiler, -O3 -march=native, cached by source,
flags and CPU under `$MIRAGE_JAX_CACHE` or ~/.cache/mirage_jax), registered as an XLA FFI
target and wrapped in a custom VJP whose backward is the kernel's own. Given the rotary
positions it also applies RoPE to q and k as it packs them (XLA computes only the cos and
sin tables), and its backward returns the frequencies' gradient.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from mirage_jax.model.tokens import rope_tables

SOURCE = Path(__file__).with_name("flash_cpu.cc")
HEAD_DIMS = (16, 32, 64, 128)
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
          "-fno-trapping-math", "-DNDEBUG"]
if platform.machine() in ("x86_64", "AMD64"):
    _FLAGS.append("-mprefer-vector-width=512")  # GCC's default stays at 256 bits on AVX-512
_LIB = None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def library_path() -> Path:
    """The compiled kernel, built now unless the cache holds one for this source and CPU."""
    asked = os.environ.get("CXX")  # a compiler the user names is the one used, or an error
    cxx = shutil.which(asked) if asked else shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        where = f"CXX={asked!r} is not a program" if asked else "no c++ or g++ on PATH"
        raise RuntimeError(
            f"model.attention='flash_cpu' compiles {SOURCE.name} on first use and found no C++ "
            f"compiler ({where}; install g++ or set CXX); model.attention='xla' needs none")
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join(
        [SOURCE.read_text(), cxx, *_FLAGS, jax.__version__, _cpu_id()]).encode()).hexdigest()
    cache = Path(os.environ.get("MIRAGE_JAX_CACHE") or Path.home() / ".cache" / "mirage_jax")
    out = cache / f"flash_cpu-{key[:16]}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, renamed in: atomic
        part = Path(tmp) / out.name
        cmd = [cxx, *_FLAGS, f"-I{include}", str(SOURCE), "-o", str(part)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(
                f"building {SOURCE} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        os.replace(part, out)
    return out


def _register():
    global _LIB
    if _LIB is None:
        lib = ctypes.cdll.LoadLibrary(str(library_path()))
        for name in ("MirageFlashFwd", "MirageFlashBwd"):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                        platform="cpu")
        _LIB = lib


def _call(name, results, *args):
    _register()
    return jax.ffi.ffi_call(name, results, vmap_method="sequential")(*args)


def _tables(rope):
    """RoPE's cos and sin [B, N, H, D/2] for rope = (pos [B, N, 3], freqs [H, D/2, 3]); empty
    arrays (no rotation) for None."""
    if rope is None:
        return (jnp.zeros((0,), jnp.float32),) * 2
    return rope_tables(*rope)


def _forward(q, k, v, mask, bias, tables):
    b, n, h, _ = q.shape
    stat = jax.ShapeDtypeStruct((b, h, n), jnp.float32)
    return _call("MirageFlashFwd", (jax.ShapeDtypeStruct(q.shape, jnp.float32), stat, stat),
                 q, k, v, mask, bias, *tables)


@jax.custom_vjp
def _flash(q, k, v, mask, bias, rope):
    return _forward(q, k, v, mask, bias, _tables(rope))[0]


def _flash_fwd(q, k, v, mask, bias, rope):
    tables = _tables(rope)
    out, rmax, rinv = _forward(q, k, v, mask, bias, tables)
    return out, (q, k, v, mask, bias, rope, tables, out, rmax, rinv)


def _flash_bwd(res, dout):
    q, k, v, mask, bias, rope, tables, out, rmax, rinv = res
    b, _, h, d = q.shape
    pos = jnp.zeros((0,), jnp.float32) if rope is None else rope[0]
    freq_shape = (b, h, d // 2 if rope is not None else 0, 3)
    shapes = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v, bias)]
    shapes.append(jax.ShapeDtypeStruct(freq_shape, jnp.float32))
    dq, dk, dv, dbias, dfreq = _call("MirageFlashBwd", tuple(shapes), q, k, v, mask, bias,
                                     *tables, pos, out, rmax, rinv, dout.astype(jnp.float32))
    drope = None if rope is None else (None, dfreq.sum(0))
    return dq, dk, dv, None, dbias, drope


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_cpu(q, k, v, key_mask, key_bias=None, rope=None):
    """Equal to `attention.reference` (float32 inside; the key bias gets its gradient); with
    rope = (pos [B, N, 3], freqs [H, D/2, 3]), to the reference on `attention.rope`-rotated
    q and k, the rotation done inside the kernel (freqs get their gradient, pos none)."""
    if jax.default_backend() != "cpu":
        raise ValueError(f"model.attention='flash_cpu' runs on CPU only, this process has "
                         f"'{jax.default_backend()}' devices")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"model.attention='flash_cpu' takes head_dim in {HEAD_DIMS}, "
                         f"got model.head_dim={q.shape[-1]}")
    f32 = lambda x: x.astype(jnp.float32)
    bias = jnp.zeros(q.shape[:3], jnp.float32) if key_bias is None else f32(key_bias)
    if rope is not None:
        rope = (f32(rope[0]), f32(rope[1]))
    out = _flash(f32(q), f32(k), f32(v), key_mask.astype(bool), bias, rope)
    return out.astype(q.dtype)
