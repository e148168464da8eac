"""``@triton.jit`` code only: one file per kernel family, the shared score,
mask and tile-order logic in ``tiles``."""
