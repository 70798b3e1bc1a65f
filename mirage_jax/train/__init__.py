"""Sharded training: state, step, loop, checkpoints."""
