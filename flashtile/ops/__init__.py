"""``torch.library`` custom ops with fake implementations and autograd, so that
``torch.compile(fullgraph=True)`` and CUDA graphs trace through flashtile; each op
picks a backend: the Triton kernels for GPU tensors (and under Triton's
interpreter), PyTorch's fused CPU kernel or the tiled PyTorch path for CPU tensors."""
