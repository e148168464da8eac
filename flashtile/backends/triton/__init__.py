"""The Triton backend: ``kernels/`` holds the ``@triton.jit`` code only; ``launch/``
turns a call into kernel launches (device facts, the launch-configuration
table, tuning, launch plans, one launcher per kernel family)."""
