"""What tests and benchmarks compare flashtile with: the materialised oracle and the
kernels' dropout pattern regenerated in PyTorch. Import it as
``flashtile.testing``; the library itself never does."""

from ..backends.dropout import dropout_keep_mask
from .reference import attention_ref, plain_cosine_sim_attention

__all__ = ["attention_ref", "dropout_keep_mask", "plain_cosine_sim_attention"]
