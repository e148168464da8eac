"""flashtile as an attention implementation of Hugging Face transformers.

    import flashtile.integrations.transformers  # registers "flashtile" (or call register())
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flashtile")

The implementation is transformers' own FlashAttention path with flashtile's
functions in place of the ``flash_attn`` package's: padding masks are
unpadded into variable-length batches, packed sequences (``position_ids``
that restart, no padding) run as variable-length batches, and GQA, sliding
windows, softcap, dropout in training and ``generate()`` with transformers'
caches behave as with ``attn_implementation="flash_attention_2"``. The same
route serves a model whose ``attn_implementation`` names flashtile through
transformers' FlashAttention-2 loader: flashtile's module has the names it
looks up (``flash_attn_func``, ``flash_attn_varlen_func``,
``flash_attn_with_kvcache``).

Tested with the transformers release line that ``pip install flashtile[transformers]``
installs.
"""

from __future__ import annotations

import functools
import inspect

NAME = "flashtile"

_registered = False


def _flash_functions():
    """What transformers' FlashAttention path loads for an implementation: the
    dense, varlen and KV-cache functions and the padding helpers."""
    import flashtile
    from transformers import modeling_flash_attention_utils as fa_utils

    return (_taking_s_aux(flashtile.flash_attn_func), _taking_s_aux(flashtile.flash_attn_varlen_func),
            _taking_s_aux(flashtile.flash_attn_with_kvcache), fa_utils._pad_input, fa_utils._unpad_input)


@functools.cache
def _taking_s_aux(fn):
    """``fn`` taking attention sinks as ``s_aux``, the name transformers passes them by
    (it looks for that name in the function's signature)."""
    @functools.wraps(fn)
    def with_s_aux(*args, s_aux=None, **kwargs):
        if s_aux is not None:
            kwargs["sinks"] = s_aux
        return fn(*args, **kwargs)

    signature = inspect.signature(fn)
    s_aux = inspect.Parameter("s_aux", inspect.Parameter.KEYWORD_ONLY, default=None)
    with_s_aux.__signature__ = signature.replace(parameters=[*signature.parameters.values(), s_aux])
    return with_s_aux


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers' attention-function signature: ``query`` ``(batch, nheads, seqlen_q,
    headdim)``, ``key``/``value`` ``(batch, nheads_kv, seqlen_k, headdim)``, the
    FlashAttention mask (a 2-D padding mask or None); returns ``(out, None)`` with out
    ``(batch, seqlen_q, nheads, headdim)``. transformers' FlashAttention path, except
    that fp32 inputs stay fp32 (flashtile computes in fp32; flash_attn cannot)."""
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    if kwargs.get("output_attentions", False):
        raise NotImplementedError("flashtile: output_attentions in transformers models (use attn_implementation='eager')")
    seq_len = query.shape[2]
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    out = _flash_attention_forward(
        query, key, value, attention_mask, query_length=seq_len,
        is_causal=module.is_causal if is_causal is None else is_causal, dropout=dropout, softmax_scale=scaling,
        sliding_window=sliding_window, softcap=softcap, use_top_left_mask=False, target_dtype=None,
        attn_implementation=NAME, layer_idx=getattr(module, "layer_idx", None),
        s_aux=None if s_aux is None else s_aux.to(query.dtype), **kwargs)
    return out, None


def _accept_in_listed_models() -> None:
    """Models that list the FlashAttention implementations they work with (those with
    attention sinks or their own windows, e.g. gpt-oss) replace any other one with the
    first of their list; flashtile serves what they need, so it joins each such list
    when a model asks for it."""
    from transformers import PreTrainedModel

    check = PreTrainedModel._check_and_adjust_attn_implementation

    @functools.wraps(check)
    def check_with_flashtile(self, attn_implementation, *args, **kwargs):
        listed = getattr(type(self), "_compatible_flash_implementations", None)
        if attn_implementation == NAME and listed is not None and NAME not in listed:
            type(self)._compatible_flash_implementations = [*listed, NAME]
        return check(self, attn_implementation, *args, **kwargs)

    PreTrainedModel._check_and_adjust_attn_implementation = check_with_flashtile


def register() -> None:
    """Register ``"flashtile"`` with ``transformers.AttentionInterface`` and
    ``transformers.AttentionMaskInterface`` (the FlashAttention mask: a 2-D padding
    mask, or none). Idempotent; needs transformers."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers import modeling_flash_attention_utils as fa_utils
    from transformers.masking_utils import flash_attention_mask

    # transformers loads the functions of any implementation whose name holds "flash" by
    # name; it knows flash_attn's packages and Hub kernels, and now flashtile
    load = fa_utils._lazy_imports

    def lazy_imports(implementation, *args, **kwargs):
        if implementation == NAME:
            return _flash_functions()
        return load(implementation, *args, **kwargs)

    fa_utils._lazy_imports = lazy_imports
    _accept_in_listed_models()
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    _registered = True


register()
