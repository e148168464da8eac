"""The backends the ops run on: ``triton/`` (the GPU kernels and their launchers)
and ``torch_tiled`` (the same algorithm in PyTorch, for CPU tensors)."""
