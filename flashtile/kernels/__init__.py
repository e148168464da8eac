"""Triton kernels: forward, backward, shared score/mask logic, launch configurations."""
