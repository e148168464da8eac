"""The attention operators, registered with ``torch.library``.

``flashtile::attn_fwd`` and ``flashtile::attn_bwd`` are custom ops with fake
(meta) implementations, so ``torch.compile(fullgraph=True)`` traces through
them, and autograd is attached with ``register_autograd``. Each op picks its
backend by device: the Triton kernels for GPU tensors (and for CPU tensors
when Triton's interpreter is on); for CPU tensors PyTorch's fused CPU flash
attention where it computes the call as flashtile defines it (dense or per
varlen sequence: full, causal, windows, boolean masks, GQA;
``backends/torch_fused.py``), else the tiled PyTorch path.

Dense inputs are in flash_attn layout ``(batch, seqlen, nheads, headdim)``;
variable-length inputs are packed ``(total, nheads, headdim)`` with int32
``cu_seqlens_q/k``. Both have a contiguous last dimension.

Optional inputs: ``bias`` a float (added) or bool (False = masked) tensor
broadcastable to ``(batch, nheads, seqlen_q, seqlen_k)`` (4-D); ``alibi`` fp32
slopes ``(nheads,)`` or ``(batch, nheads)``; ``seed`` a 0-d int64 CPU tensor
for dropout. Positions: query ``i`` is aligned with key ``i + diag`` and sees
keys ``[i + diag - window_left, i + diag + window_right]`` (-1 = unbounded);
varlen sequences are aligned bottom-right, each its own ``diag``.
``fixed_max`` (forward only): an upper bound of ``q.k * softmax_scale`` for
l2-normalised q and k (cosine-similarity attention); the forward pass then
uses a fixed softmax offset (that bound, plus the largest value of an
additive ``bias``) instead of a running row max.
"""

from __future__ import annotations

import functools

import torch

from ..backends import torch_fused
from ..backends.torch_tiled import attention_tiled_backward, attention_tiled_forward
from ..backends.triton.launch import attention as launch
from ..backends.triton.launch.device import interpreting
from ..options import AttnOptions, empty_output
from .decode import cache_rows


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or interpreting()


def _score_bound(fixed_max: float | None, bias: torch.Tensor | None) -> float | None:
    """The fixed softmax offset: ``fixed_max`` plus the largest additive bias (read
    once, without its broadcast dimensions); None (running max) if not finite."""
    if fixed_max is None:
        return None
    if bias is not None and bias.is_floating_point() and bias.numel():
        stored = bias[tuple(slice(0, 1) if st == 0 else slice(None) for st in bias.stride())]
        fixed_max = fixed_max + max(0.0, float(stored.detach().amax()))
    return fixed_max if abs(fixed_max) < float("inf") else None


def attn_options(q, k, bias, alibi, seed, softmax_scale, diag, window_left, window_right, softcap, dropout_p,
                 varlen: bool, fixed_max: float | None = None, sinks: torch.Tensor | None = None) -> AttnOptions:
    batch, nheads = (1, q.shape[1]) if varlen else (q.shape[0], q.shape[2])
    fixed_max = _score_bound(fixed_max, bias)
    if bias is not None:
        bias = bias.expand(batch, nheads, q.shape[1], k.shape[1])
    if alibi is not None:
        alibi = alibi.float()
        if alibi.dim() == 1:
            # one slope per head for every sequence: batch stride 0 (the kernels index it by sequence,
            # and a varlen batch's sequences outnumber this view's batch of 1)
            alibi = alibi.as_strided((batch, nheads), (0, alibi.stride(0)))
    return AttnOptions(softmax_scale, diag, window_left, window_right, softcap, alibi, bias, dropout_p,
                       0 if seed is None else int(seed), fixed_max=fixed_max,
                       sinks=None if sinks is None else sinks.float())


def seq_options(opts: AttnOptions, i: int, seqlen_q: int, seqlen_k: int, max_seqlen_q: int, max_seqlen_k: int):
    """Options of sequence ``i`` of a varlen batch for the tiled path."""
    alibi = None if opts.alibi is None else opts.alibi[i:i + 1] if opts.alibi.shape[0] > 1 else opts.alibi
    return opts._replace(diag_offset=seqlen_k - seqlen_q, alibi=alibi, dropout_batch_base=i,
                         dropout_rows=max_seqlen_q, dropout_cols=max_seqlen_k)


def varlen_slices(cu_q, cu_k, seqused_k=None):
    """(index, query rows, key rows) of each sequence with queries and keys
    (the others produce zeros, which the callers' buffers start with); with
    ``seqused_k``, the first ``seqused_k[i]`` key rows of sequence ``i``."""
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    used = None if seqused_k is None else seqused_k.tolist()
    for i in range(len(cu_q) - 1):
        n_k = cu_k[i + 1] - cu_k[i] if used is None else used[i]
        if cu_q[i + 1] > cu_q[i] and n_k > 0:
            yield i, slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i] + n_k)


def _sequence_kv(k, v, i: int, sk: slice, block_table):
    """Keys and values of sequence ``i`` (rows ``sk`` of the packed tensors, or its first
    ``len(sk)`` keys through ``block_table`` when k and v are paged), batched as one."""
    if block_table is None:
        return k[None, sk], v[None, sk]
    n = sk.stop - sk.start
    return cache_rows(k, i, n, None, block_table)[None], cache_rows(v, i, n, None, block_table)[None]


def _attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
             cu_seqlens_k: torch.Tensor | None, bias: torch.Tensor | None, alibi: torch.Tensor | None,
             seed: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, diag: int,
             window_left: int, window_right: int, softcap: float,
             dropout_p: float, fixed_max: float | None = None, sinks: torch.Tensor | None = None,
             seqused_k: torch.Tensor | None = None,
             block_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    varlen = cu_seqlens_q is not None
    opts = attn_options(q, k, bias, alibi, seed, softmax_scale, diag, window_left, window_right, softcap, dropout_p,
                        varlen, fixed_max, sinks)
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    if q.numel() == 0 or k.shape[-3] == 0:
        # nothing to attend: zeros, and LSE -inf (or the sink's logit: the only key there is)
        return empty_output(q, v.shape[-1]).zero_(), _empty_lse(lse_shape, opts.sinks, varlen, q.device)
    if _use_triton(q):
        return launch.attention_forward(q, k, v, opts, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        seqused_k=seqused_k, block_table=block_table)
    if not varlen:
        return _cpu_forward(q, k, v, opts)
    out = empty_output(q, v.shape[-1]).zero_()
    lse = _empty_lse(lse_shape, opts.sinks, varlen, q.device)
    for i, sq, sk in varlen_slices(cu_seqlens_q, cu_seqlens_k, seqused_k):
        o, lse_i = _cpu_forward(q[None, sq], *_sequence_kv(k, v, i, sk, block_table),
                                seq_options(opts, i, sq.stop - sq.start, sk.stop - sk.start, max_seqlen_q,
                                            max_seqlen_k))
        out[sq], lse[:, sq] = o[0], lse_i[0]
    return out, lse


def _cpu_forward(q, k, v, opts: AttnOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of a dense call on CPU tensors: PyTorch's fused CPU kernel where it computes
    the call as flashtile defines it (``torch_fused.fused_mode``), else the tiled path."""
    mode = torch_fused.fused_mode(q, v, opts)
    if mode == "plain":
        out, lse = torch_fused.plain_forward(q, k, v, opts)
        if not torch_fused.may_leak(opts, last=(out,)):
            return out, lse
    elif mode == "masked":
        result = torch_fused.masked_forward(q, k, v, opts)
        if result is not None:
            return result
    return attention_tiled_forward(q, k, v, opts)


def _cpu_backward(dout, q, k, v, out, lse, opts: AttnOptions, bias_grad: bool, exact_strides: bool):
    """(dq, dk, dv, dbias, dsinks) of a dense call on CPU tensors, as ``_cpu_forward``
    chooses (dbias and dsinks None from the fused kernel, which serves neither)."""
    mode = torch_fused.fused_mode(q, v, opts, bias_grad)
    if mode == "plain":
        grads = torch_fused.plain_backward(dout, q, k, v, out, lse, opts, exact_strides)
        if not torch_fused.may_leak(opts, last=grads[:1], first=grads[1:]):
            return (*grads, None, None)
    elif mode == "masked":
        grads = torch_fused.masked_backward(dout, q, k, v, out, lse, opts)
        if grads is not None:
            return (*grads, None, None)
    return attention_tiled_backward(dout, q, k, v, out, lse, opts, bias_grad)


def _empty_lse(shape: tuple, sinks: torch.Tensor | None, varlen: bool, device) -> torch.Tensor:
    """The LSE of rows that see no key: -inf, or with sinks the sink's logit."""
    if sinks is None:
        return torch.full(shape, float("-inf"), device=device, dtype=torch.float32)
    heads = sinks.reshape(-1, 1) if varlen else sinks.reshape(1, -1, 1)
    return heads.float().expand(shape).clone()


attn_fwd = torch.library.custom_op("flashtile::attn_fwd", mutates_args=())(_attn_fwd)


@attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, bias, alibi, seed, max_seqlen_q, max_seqlen_k, softmax_scale, diag,
      window_left, window_right, softcap, dropout_p, fixed_max=None, sinks=None, seqused_k=None, block_table=None):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    return empty_output(q, v.shape[-1]), q.new_empty(lse_shape, dtype=torch.float32)


def _reduce_bias_grad(dbias: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Sum the (batch, nheads, seqlen_q, seqlen_k) gradient over bias's broadcast dims."""
    dims = [i for i in range(4) if bias.shape[i] == 1 and dbias.shape[i] != 1]
    return (dbias.sum(dims, keepdim=True) if dims else dbias).to(bias.dtype)


def _attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
             bias: torch.Tensor | None, alibi: torch.Tensor | None, seed: torch.Tensor | None,
             max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, diag: int, window_left: int,
             window_right: int, softcap: float, dropout_p: float, bias_grad: bool,
             sinks: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None, *,
             exact_strides: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dbias, dsinks); dbias has bias's shape and dtype, or is empty unless
    ``bias_grad``; dsinks has sinks's shape and dtype, or is empty without sinks. dq, dk and
    dv have q, k and v's strides, or with ``exact_strides=False`` (eager calls) may not."""
    varlen = cu_seqlens_q is not None
    bias_grad = bias_grad and bias is not None
    def no_grad():  # an empty output of its own (outputs of a custom op may not alias)
        return q.new_empty(0)

    if q.numel() == 0 or k.numel() == 0:
        dbias = torch.zeros_like(bias) if bias_grad else no_grad()
        dsinks = no_grad() if sinks is None else torch.zeros_like(sinks)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias, dsinks
    opts = attn_options(q, k, bias, alibi, seed, softmax_scale, diag, window_left, window_right, softcap, dropout_p,
                        varlen, sinks=sinks)
    dsinks = None
    if _use_triton(q):
        dq, dk, dv, dbias, dsinks = launch.attention_backward(dout, q, k, v, out, lse, opts, bias_grad,
                                                              cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                              seqused_k=seqused_k)
    elif not varlen:
        dq, dk, dv, dbias, dsinks = _cpu_backward(dout, q, k, v, out, lse, opts, bias_grad, exact_strides)
    else:
        dq, dk, dv, dbias = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None
        for i, sq, sk in varlen_slices(cu_seqlens_q, cu_seqlens_k, seqused_k):
            grads = _cpu_backward(dout[None, sq], q[None, sq], k[None, sk], v[None, sk], out[None, sq],
                                  lse[None, :, sq], seq_options(opts, i, sq.stop - sq.start, sk.stop - sk.start,
                                                                max_seqlen_q, max_seqlen_k), False, True)
            dq[sq], dk[sk], dv[sk] = grads[0][0], grads[1][0], grads[2][0]
            if sinks is not None:
                dsinks = grads[4] if dsinks is None else dsinks + grads[4]
        if sinks is not None and dsinks is None:
            dsinks = torch.zeros_like(opts.sinks)
        # the sequences without keys: their rows' only key is the sink, whose gradient -P_sink * delta is 0
        # there (their output is zero, so delta = rowsum(dO * O) is 0)
    dbias = _reduce_bias_grad(dbias, bias) if bias_grad else no_grad()
    return dq, dk, dv, dbias, no_grad() if sinks is None else dsinks.to(sinks.dtype)


attn_bwd = torch.library.custom_op("flashtile::attn_bwd", mutates_args=())(_attn_bwd)


@attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, bias, alibi, seed, max_seqlen_q, max_seqlen_k,
      softmax_scale, diag, window_left, window_right, softcap, dropout_p, bias_grad, sinks=None, seqused_k=None,
      exact_strides=True):
    dbias = torch.empty_like(bias) if bias_grad and bias is not None else q.new_empty(0)
    dsinks = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias, dsinks


_BIAS = 5  # position of bias among them
_SCALARS = slice(8, 16)  # those attn_bwd takes too (max_seqlen_q .. dropout_p)
_SINKS = 17  # and seqused_k after it


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, bias, alibi, seed = inputs[:8]
    sinks, seqused_k = (list(inputs[_SINKS:_SINKS + 2]) + [None, None])[:2]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, bias, alibi, seed, sinks, seqused_k)
    ctx.scalars = tuple(inputs[_SCALARS])
    ctx.n_inputs, ctx.has_sinks = len(inputs), sinks is not None
    ctx.mark_non_differentiable(lse)
    # the LSE takes no gradient: no zeros made for it (one launch less per backward)
    ctx.set_materialize_grads(False)


def _input_grads(ctx, dout, bias_grad: bool, bwd):
    """(dq, dk, dv, dbias, dsinks) from the saved context, by ``bwd`` (an ``attn_bwd``)."""
    q, k, v, out, lse, cu_q, cu_k, bias, alibi, seed, sinks, seqused_k = ctx.saved_tensors
    if dout is None:  # the output took no part in the loss
        dout = torch.zeros_like(out)
    return bwd(dout, q, k, v, out, lse, cu_q, cu_k, bias, alibi, seed, *ctx.scalars, bias_grad, sinks, seqused_k)


def _backward(ctx, dout, dlse):
    bias_grad = ctx.needs_input_grad[_BIAS]
    dq, dk, dv, dbias, dsinks = _input_grads(ctx, dout, bias_grad, attn_bwd)
    grads = [dq, dk, dv] + [None] * (ctx.n_inputs - 3)
    grads[_BIAS] = dbias if bias_grad else None
    if ctx.has_sinks:
        grads[_SINKS] = dsinks
    return tuple(grads)


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the registered ops, without the op
    dispatch (tens of microseconds per call, which short sequences notice).
    Used outside ``torch.compile``; traced graphs use the ops. ``inputs`` are
    the op's arguments; the tensors among them that take gradients come first on
    their own as well (autograd looks at those only: fewer arguments, less time)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, sinks, inputs):
        output = _attn_fwd(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        _, _, _, bias_grad, sinks_grad, _ = ctx.needs_input_grad
        dq, dk, dv, dbias, dsinks = _input_grads(ctx, dout, bias_grad, _eager_bwd)
        return dq, dk, dv, dbias if bias_grad else None, dsinks if sinks_grad else None, None


_eager_bwd = functools.partial(_attn_bwd, exact_strides=False)


def dropout_seed(dropout_p: float) -> torch.Tensor | None:
    """Seed of the dropout generator, drawn from torch's default generator (so
    reproducible under ``torch.manual_seed``), or None without dropout."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if dropout_p > 0 else None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, diag: int, *,
              window: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, dropout_p: float = 0.0, seed: torch.Tensor | None = None,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              max_seqlen_q: int = 0, max_seqlen_k: int = 0, fixed_max: float | None = None,
              sinks: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None,
              block_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention on checked inputs. Returns (out, lse).

    ``window = (left, right)``, -1 unbounded (causal is ``right = 0``).
    ``fixed_max``: a bound of the scores without bias (cosine-similarity
    attention, see the module docstring), or None for the running row max.
    ``sinks``: ``(nheads,)`` logits of attention sinks (see ``AttnOptions``), or None.
    Varlen: ``seqused_k`` (int32 ``(batch,)``) the keys each sequence uses;
    ``block_table`` (int32 ``(batch, max_pages)``) k and v paged (forward only).
    """
    # the kernels need a contiguous head dim; other strides are read as they are
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    inputs = (q, k, v, cu_seqlens_q, cu_seqlens_k, bias, alibi, seed, max_seqlen_q, max_seqlen_k, softmax_scale, diag,
              window[0], window[1], softcap, dropout_p, fixed_max, sinks, seqused_k, block_table)
    if torch.compiler.is_compiling():
        return attn_fwd(*inputs)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias, sinks)):
        return _EagerAttention.apply(q, k, v, bias, sinks, inputs)
    return _attn_fwd(*inputs)  # nothing to differentiate: no autograd node (it costs more than the rest of a short call)
