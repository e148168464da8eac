"""flashtile's kernels behind PyTorch SDPA's flash backend.

Importing flashtile registers the implementation ``"flashtile"`` with
``torch.nn.attention`` (where PyTorch has that registry: seen in 2.11 and 2.13);
nothing changes until it is activated::

    import flashtile
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

    activate_flash_attention_impl("flashtile")
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # flashtile's kernels
    restore_flash_attention_impl()                                                    # PyTorch's again

Activation registers CUDA kernels for the aten operators of SDPA's flash
backend (``_scaled_dot_product_flash_attention``, ``_flash_attention_forward``,
their backwards, and the in-place forward), so every call that PyTorch sends
to its flash backend, from any code, runs flashtile's forward and backward.
A call that flashtile does not serve with the same semantics (a debug mask,
ALiBi slopes (the operators' backward takes none), ``seqused_k``, a paged
``block_table``, split counts, causal attention of
unequal lengths through the SDPA operator, whose alignment PyTorch's own
kernel defines) goes to PyTorch's own kernel, taken before the override, so
a call never gets a different answer.

Dropout draws its own pattern (flashtile's generator, seeded from PyTorch's
default generator): the forward returns the seed in ``rng_state`` with a
marker in place of the offset, from which the backward knows that the
forward was flashtile's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..ops.attention import _attn_bwd, _attn_fwd, dropout_seed
from ..options import default_scale

IMPL_NAME = "flashtile"

# rng_state[1] of a forward that flashtile ran (PyTorch's kernels keep a Philox offset there,
# a multiple of 4 counted up from 0)
_OURS = ((1 << 63) | 0x0F1A5713) - (1 << 64)  # as int64

OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
       "_flash_attention_forward", "_flash_attention_forward_no_dropout_inplace", "_flash_attention_backward")


@dataclass
class _Handle:
    """What an activation keeps alive: the library holding the kernels (dropping it
    unregisters them) and PyTorch's own kernels for the calls flashtile leaves."""
    library: object | None
    originals: dict

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()  # unregisters the kernels now, not at garbage collection
        self.library = None
        self.originals = {}


def _unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why flashtile leaves a call to PyTorch's kernel, or None."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        return "dtype"
    if q.shape[-1] != k.shape[-1] or v.shape[-1] != q.shape[-1] or q.shape[-1] > 256:
        return "head dims"
    if q.shape[-2] % k.shape[-2]:
        return "heads"
    return None


def _flash_op_unsupported(q, k, v, return_debug_mask, seqused_k, block_table, num_splits, alibi_slopes) -> bool:
    """The calls of ``_flash_attention_forward`` (and its in-place twin) left to PyTorch:
    a debug mask, ``seqused_k``, a paged ``block_table``, split counts, ALiBi (the
    operators' backward takes no slopes), or inputs flashtile does not take."""
    return bool(return_debug_mask or seqused_k is not None or block_table is not None or (num_splits or 0) > 1
                or alibi_slopes is not None or _unsupported(q, k, v))


def _last_dim_contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _windows(is_causal: bool, left: int | None, right: int | None) -> tuple[int, int]:
    left = -1 if left is None or left < 0 else int(left)
    right = -1 if right is None or right < 0 else int(right)
    return left, 0 if is_causal else right


def _rng_state(seed: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rng_state, unused) as the operators return them: the seed and the marker, written
    by fills (no host-to-device copy, so that CUDA graphs can capture the call)."""
    state = torch.empty(2, dtype=torch.int64, device=device)
    state[0] = 0 if seed is None else int(seed)
    state[1] = _OURS
    return state.view(torch.uint64), torch.zeros((), dtype=torch.uint64, device=device)


def _seed_of(rng_state: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    """The seed of a forward flashtile ran with dropout (a host copy of rng_state)."""
    if dropout_p <= 0:
        return None
    return rng_state.view(torch.int64)[0].cpu()


def _ran_ours(rng_state: torch.Tensor | None, dropout_p: float) -> bool:
    """Whether the forward behind a backward call was flashtile's: it matters only with
    dropout (without, both forwards give the same output and LSE)."""
    if dropout_p <= 0:
        return True
    return rng_state is not None and rng_state.numel() == 2 and int(rng_state.view(torch.int64)[1]) == _OURS


def _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, *, scale,
                   window_size_left, window_size_right):
    """flash_attn layout (dense ``(B, S, H, D)`` or packed ``(total, H, D)``): (out, lse, seed)."""
    q, k, v = _last_dim_contiguous(query, key, value)
    left, right = _windows(is_causal, window_size_left, window_size_right)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    seed = dropout_seed(dropout_p)
    diag = 0 if cum_seq_q is not None else k.shape[1] - q.shape[1]  # bottom-right, as flash_attn
    out, lse = _attn_fwd(q, k, v, cum_seq_q, cum_seq_k, None, None, seed, int(max_q), int(max_k), scale,
                         diag, left, right, 0.0, dropout_p)
    return out, lse, seed


def _flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                    is_causal, rng_state, *, scale, window_size_left, window_size_right):
    q, k, v, o, do = _last_dim_contiguous(query, key, value, out, grad_out)
    left, right = _windows(is_causal, window_size_left, window_size_right)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    varlen = cum_seq_q is not None and cum_seq_q.numel() > 0
    diag = 0 if varlen else k.shape[1] - q.shape[1]
    dq, dk, dv, _, _ = _attn_bwd(do, q, k, v, o, logsumexp, cum_seq_q if varlen else None,
                                 cum_seq_k if varlen else None, None, None, _seed_of(rng_state, dropout_p),
                                 int(max_q), int(max_k), scale, diag, left, right, 0.0, dropout_p, False)
    return dq, dk, dv


# ---- the aten kernels (first argument: the dispatch key set, for PyTorch's own kernels)

def _make_kernels(originals: dict) -> dict:
    def pytorch(name):
        kernel = originals.get(name)
        if kernel is None:
            raise RuntimeError(f"flashtile does not serve this call of aten::{name}, and PyTorch has no kernel "
                               "of it for this device")
        return kernel

    def flash_attention_forward(keyset, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                                is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                                window_size_right=None, seqused_k=None, alibi_slopes=None, block_table=None,
                                num_splits=None):
        if _flash_op_unsupported(query, key, value, return_debug_mask, seqused_k, block_table, num_splits,
                                 alibi_slopes):
            return pytorch("_flash_attention_forward").call_boxed(
                keyset, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                return_debug_mask, scale=scale, window_size_left=window_size_left,
                window_size_right=window_size_right, seqused_k=seqused_k, alibi_slopes=alibi_slopes,
                block_table=block_table, num_splits=num_splits)
        out, lse, seed = _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                                        scale=scale, window_size_left=window_size_left,
                                        window_size_right=window_size_right)
        rng_state, unused = _rng_state(seed, query.device)
        return out, lse, rng_state, unused, query.new_empty(0)

    def flash_attention_forward_no_dropout_inplace(keyset, out, query, key, value, cum_seq_q, cum_seq_k, max_q,
                                                   max_k, dropout_p, is_causal, return_debug_mask, *, scale=None,
                                                   window_size_left=None, window_size_right=None, seqused_k=None,
                                                   alibi_slopes=None, block_table=None, num_splits=None):
        if dropout_p > 0 or _flash_op_unsupported(query, key, value, return_debug_mask, seqused_k, block_table,
                                                  num_splits, alibi_slopes):
            return pytorch("_flash_attention_forward_no_dropout_inplace").call_boxed(
                keyset, out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                return_debug_mask, scale=scale, window_size_left=window_size_left,
                window_size_right=window_size_right, seqused_k=seqused_k, alibi_slopes=alibi_slopes,
                block_table=block_table, num_splits=num_splits)
        result, lse, _ = _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, 0.0, is_causal,
                                        scale=scale, window_size_left=window_size_left,
                                        window_size_right=window_size_right)
        out.copy_(result)
        return lse

    def flash_attention_backward(keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                                 max_k, dropout_p, is_causal, rng_state, unused, *, scale=None,
                                 window_size_left=None, window_size_right=None):
        if _unsupported(query, key, value) or not _ran_ours(rng_state, dropout_p):
            return pytorch("_flash_attention_backward").call_boxed(
                keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                dropout_p, is_causal, rng_state, unused, scale=scale, window_size_left=window_size_left,
                window_size_right=window_size_right)
        return _flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                               dropout_p, is_causal, rng_state, scale=scale, window_size_left=window_size_left,
                               window_size_right=window_size_right)

    def sdpa_forward(keyset, query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *,
                     scale=None):
        # (B, H, S, D); causal of unequal lengths: PyTorch's kernel defines that alignment
        if (return_debug_mask or query.dim() != 4 or (is_causal and query.shape[2] != key.shape[2])
                or _unsupported(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))):
            return pytorch("_scaled_dot_product_flash_attention").call_boxed(
                keyset, query, key, value, dropout_p, is_causal, return_debug_mask, scale=scale)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out, lse, seed = _flash_forward(q, k, v, None, None, q.shape[1], k.shape[1], dropout_p, is_causal,
                                        scale=scale, window_size_left=None, window_size_right=None)
        rng_state, unused = _rng_state(seed, query.device)
        return (out.transpose(1, 2), lse, None, None, query.shape[2], key.shape[2], rng_state, unused,
                query.new_empty(0))

    def sdpa_backward(keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                      dropout_p, is_causal, philox_seed, philox_offset, *, scale=None):
        if (query.dim() != 4 or (is_causal and query.shape[2] != key.shape[2])
                or _unsupported(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
                or not _ran_ours(philox_seed, dropout_p)):
            return pytorch("_scaled_dot_product_flash_attention_backward").call_boxed(
                keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                is_causal, philox_seed, philox_offset, scale=scale)
        grads = _flash_backward(*(t.transpose(1, 2) for t in (grad_out, query, key, value, out)), logsumexp, None,
                                None, query.shape[2], key.shape[2], dropout_p, is_causal, philox_seed, scale=scale,
                                window_size_left=None, window_size_right=None)
        return tuple(g.transpose(1, 2) for g in grads)

    return {"_scaled_dot_product_flash_attention": sdpa_forward,
            "_scaled_dot_product_flash_attention_backward": sdpa_backward,
            "_flash_attention_forward": flash_attention_forward,
            "_flash_attention_forward_no_dropout_inplace": flash_attention_forward_no_dropout_inplace,
            "_flash_attention_backward": flash_attention_backward}


def install(dispatch_key: str = "CUDA") -> _Handle:
    """Register flashtile's kernels for SDPA's flash operators under ``dispatch_key``
    and return the handle that keeps them registered (``handle.remove()`` drops
    them). ``activate_flash_attention_impl("flashtile")`` calls this for CUDA."""
    originals = {}
    for name in OPS:
        try:
            originals[name] = torch.library.get_kernel(f"aten::{name}", dispatch_key)
        except RuntimeError:  # none for this key (e.g. the CPU): such calls raise
            pass
    library = torch.library.Library("aten", "IMPL", dispatch_key)
    for name, kernel in _make_kernels(originals).items():
        library.impl(name, kernel, dispatch_key, with_keyset=True)
    return _Handle(library, originals)


def register() -> bool:
    """Make ``"flashtile"`` an implementation that
    ``torch.nn.attention.activate_flash_attention_impl`` can activate; False on a
    PyTorch without that registry. Never activates it."""
    attention = torch.nn.attention
    if not hasattr(attention, "register_flash_attention_impl"):
        return False
    attention.register_flash_attention_impl(IMPL_NAME, register_fn=install)
    return True


@contextlib.contextmanager
def enabled():
    """flashtile behind SDPA's flash backend inside a ``with`` block: through
    ``torch.nn.attention``'s registry where PyTorch has one, else by installing the
    CUDA kernels directly; PyTorch's own again on exit."""
    attention = torch.nn.attention
    if hasattr(attention, "activate_flash_attention_impl"):
        attention.activate_flash_attention_impl(IMPL_NAME)
        try:
            yield
        finally:
            attention.restore_flash_attention_impl()
        return
    handle = install("CUDA")
    try:
        yield
    finally:
        handle.remove()
