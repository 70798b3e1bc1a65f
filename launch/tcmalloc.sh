#!/usr/bin/env bash
# Prints the path of this machine's tcmalloc, or nothing if it has none, for LD_PRELOAD:
#
#   LD_PRELOAD=$(launch/tcmalloc.sh) .venv/bin/mirage-jax train ...
#
# Why: XLA:CPU allocates each step's buffers afresh, and glibc's malloc returns large freed
# blocks to the kernel, so every step faults them in again (7.0M minor faults in a 15-step
# demo bench). tcmalloc keeps them: the demo config's JAX step 0.78x, PyTorch's unchanged
# (README, Benchmarks). Debian/Ubuntu: apt-get install libtcmalloc-minimal4.
for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
           /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 \
           /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4 /usr/lib64/libtcmalloc_minimal.so.4; do
  if [ -e "$lib" ]; then
    echo "$lib"
    exit 0
  fi
done
