"""The multi-stream diffusion transformer and its parts."""
