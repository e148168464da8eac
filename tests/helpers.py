"""The accuracy rule: the kernel's max error against an fp64 oracle must be at
most ``factor`` times the error of PyTorch computing the same thing in the
input dtype, plus a rounding floor of the output dtype."""

import torch

from flashtile import attention_ref


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the rounding step of ``dtype`` at ref's magnitude; for fp32, where
    both errors are a few ulps, a relative 1e-5 of ref's largest value."""
    if not ref.numel():
        return 0.0
    r = ref.to(dtype)
    floor = 2 * (r + 0.3 - 0.3 - r).abs().max().item()
    if dtype == torch.float32:
        floor = max(floor, 1e-5 * max(1.0, ref.abs().max().item()))
    return floor


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_attention(fn, q, k, v, *, causal=False, causal_align="bottom_right", softmax_scale=None,
                    backward=True, fwd_factor=2.0, bwd_factor=3.0, layout_fn=None):
    """Run ``fn(q, k, v)`` (flash_attn layout in and out) forward and backward and
    apply the accuracy rule against ``attention_ref``."""
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    out = fn(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any(), "NaN in output"
    kw = dict(causal=causal, causal_align=causal_align, softmax_scale=softmax_scale)
    ref = attention_ref(q, k, v, compute_dtype=torch.float64, **kw)
    low = attention_ref(q, k, v, upcast=False, **kw)
    err, base = max_err(out, ref), max_err(low, ref)
    assert err <= fwd_factor * base + rounding_floor(ref, q.dtype), f"forward error {err:.3e} vs pytorch {base:.3e}"
    if not backward:
        return
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    grads_ref = torch.autograd.grad(ref, (q, k, v), dout)
    grads_low = torch.autograd.grad(low, (q, k, v), dout)
    for name, g, gr, gl in zip("qkv", grads, grads_ref, grads_low):
        assert g.shape == gr.shape and g.dtype == gr.dtype
        assert not torch.isnan(g).any(), f"NaN in d{name}"
        err, base = max_err(g, gr), max_err(gl, gr)
        assert err <= bwd_factor * base + rounding_floor(gr, q.dtype), f"d{name} error {err:.3e} vs pytorch {base:.3e}"
