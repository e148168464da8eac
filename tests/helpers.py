"""The accuracy rule: the kernel's max error against an fp64 oracle must be at
most ``factor`` times the error of PyTorch computing the same thing in the
input dtype, plus a rounding floor of the output dtype."""

import math

import torch

from flashtile.testing import attention_ref


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype, magnitude: float = 0.0) -> float:
    """Twice the rounding step of ``dtype`` at ref's magnitude, at least 1e-5 (a
    reference that is exactly 0, e.g. dq when every row sees one key, has no
    rounding step), and at least one step (eps) of ``magnitude``: the size of
    the terms that sum into ref, for a ref much smaller than its terms (dq of
    a row that sees one key is 0 in exact arithmetic, a difference of two dot
    products in the kernel; the dk of a few keys is a sum of dS q products
    rounded to 16 bits). For fp32, where both errors are a few ulps, a
    relative 1e-5 of ref's largest value or of ``magnitude``."""
    if not ref.numel():
        return 1e-5
    largest = ref.abs().max().item()
    # the rounding step (ulp) of dtype at the largest value: eps scaled to its binade
    step = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(largest)) if largest > 0 else 0.0
    floor = max(2 * step, 1e-5, torch.finfo(dtype).eps * magnitude)
    if dtype == torch.float32:
        floor = max(floor, 1e-5 * max(1.0, ref.abs().max().item(), magnitude))
    return floor


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_attention(fn, q, k, v, *, backward=True, fwd_factor=2.0, bwd_factor=3.0, bias=None, sinks=None,
                    ref_fn=attention_ref, **ref_kwargs):
    """Run ``fn(q, k, v)`` (flash_attn layout in and out; ``fn(q, k, v, bias)`` when a
    ``bias`` is given, ``fn(..., sinks=sinks)`` when ``sinks`` are) forward and backward
    and apply the accuracy rule against ``ref_fn(..., attn_bias=bias, sinks=sinks,
    **ref_kwargs)`` (``attention_ref`` unless given). A float bias that requires grad,
    and sinks, have their gradients checked too."""
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    inputs, names = [q, k, v], ["q", "k", "v"]
    if bias is not None:
        bias_grad = backward and bias.is_floating_point() and bias.requires_grad
        bias = bias.detach().requires_grad_(bias_grad)
        if bias_grad:
            inputs, names = inputs + [bias], names + ["bias"]
        ref_kwargs["attn_bias"] = bias
    call_kwargs = {}
    if sinks is not None:
        sinks = sinks.detach().requires_grad_(backward)
        if backward:
            inputs, names = inputs + [sinks], names + ["sinks"]
        ref_kwargs["sinks"] = call_kwargs["sinks"] = sinks
    out = fn(q, k, v, **call_kwargs) if bias is None else fn(q, k, v, bias, **call_kwargs)
    assert out.shape == (*q.shape[:-1], v.shape[-1]) and out.dtype == q.dtype
    assert not torch.isnan(out).any(), "NaN in output"
    ref = ref_fn(q, k, v, compute_dtype=torch.float64, **ref_kwargs)
    low = ref_fn(q, k, v, upcast=False, **ref_kwargs)
    err, base = max_err(out, ref), max_err(low, ref)
    assert err <= fwd_factor * base + rounding_floor(ref, q.dtype), f"forward error {err:.3e} vs pytorch {base:.3e}"
    if not backward:
        return
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    grads_ref = torch.autograd.grad(ref, inputs, dout)
    grads_low = torch.autograd.grad(low, inputs, dout)
    # the gradients are sums of products of the same terms: their common scale
    magnitude = max(gr.abs().max().item() for gr in grads_ref if gr.numel()) if any(g.numel() for g in grads_ref) else 0
    for name, g, gr, gl in zip(names, grads, grads_ref, grads_low):
        assert g.shape == gr.shape and g.dtype == gr.dtype
        assert not torch.isnan(g).any(), f"NaN in d{name}"
        err, base = max_err(g, gr), max_err(gl, gr)
        floor = rounding_floor(gr, q.dtype, magnitude)
        if name == "sinks":
            floor = max(floor, sinks_grad_floor(ref_fn, q, k, v, ref, dout, ref_kwargs))
        assert err <= bwd_factor * base + floor, f"d{name} error {err:.3e} vs pytorch {base:.3e}"


def sinks_grad_floor(ref_fn, q, k, v, ref, dout, ref_kwargs) -> float:
    """The rounding floor of the sinks' gradient, a sum over every row of a head of
    ``-P_sink * delta`` with ``delta = rowsum(dO * O)``: every kernel takes O as it stored
    it (in q's dtype), so its error is O's rounding carried through that sum, one rounding
    step (eps) of q's dtype times the root-sum-square of the terms (in fp64), largest over
    the heads. A single draw of PyTorch's own error in q's dtype is no measure of it: the
    errors of a few thousand rows add up or cancel by chance. ``P_sink = 1 - sum_j P_ij``
    from the reference with values of ones (dropped probabilities aside: a floor, not a
    result)."""
    with torch.no_grad():
        kw = {name: t.detach() if isinstance(t, torch.Tensor) else t for name, t in ref_kwargs.items()}
        ones = torch.ones_like(v[..., :1])
        seen = ref_fn(q.detach(), k.detach(), ones, compute_dtype=torch.float64, **kw)[..., 0]
        p_sink = (1 - seen).clamp(0, 1)  # (batch, seqlen_q, nheads)
        terms = p_sink * (dout.double() * ref.double()).sum(-1)
        return torch.finfo(q.dtype).eps * terms.pow(2).sum((0, 1)).sqrt().max().item()


def check_out_lse(out, lse, ref, ref_lse, low, low_lse, dtype) -> None:
    """The accuracy rule on a decoding call's output and (if not None) its LSE
    ``(batch, nheads, seqlen_q)``: ``ref`` the reference in high precision, ``low``
    PyTorch's attention in ``dtype`` (the baseline); rows without keys agree on -inf."""
    assert not torch.isnan(out).any()
    err, base = max_err(out, ref), max_err(low, ref)
    assert err <= 2 * base + rounding_floor(ref, dtype), f"error {err:.3e} vs pytorch {base:.3e}"
    if lse is not None:
        assert lse.shape == (out.shape[0], out.shape[2], out.shape[1]) and lse.dtype == torch.float32
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        err, base = max_err(lse[finite], ref_lse[finite]), max_err(low_lse[finite], ref_lse[finite])
        assert err <= 2 * base + 1e-4, f"LSE error {err:.3e} vs pytorch {base:.3e}"


def force_forward_config(monkeypatch, cfg) -> None:
    """Launch every forward kernel call with the LaunchConfig ``cfg``, whatever
    launch-table name it takes (e.g. to force the two-halves schedule)."""
    from flashtile.backends.triton.launch import attention as launch_attention
    from flashtile.backends.triton.launch import choose as launch_choose

    monkeypatch.setattr(launch_choose, "forced_configs", {name: cfg for name in launch_attention.FORWARD_NAMES})


def count_plan_replays(monkeypatch) -> list:
    """Launch plans run from now on (flashtile/backends/triton/launch/plans.py), each entry the names
    of the plan's kernels."""
    from flashtile.backends.triton.launch import plans as launch_plans

    runs = []
    real_run = launch_plans.LaunchPlan.run

    def counting_run(self, call):
        runs.append([step.kernel.__name__ for step, *_ in self.launches])
        real_run(self, call)

    monkeypatch.setattr(launch_plans.LaunchPlan, "run", counting_run)
    return runs


def set_switch(monkeypatch, name: str, value: str) -> None:
    """Set the environment switch ``name`` (FLASHTILE_FWD_TMA, ...) for this test; launch
    plans, which read the switches when made, start afresh and are restored afterwards."""
    from flashtile.backends.triton.launch import plans as launch_plans

    monkeypatch.setenv(name, value)
    monkeypatch.setattr(launch_plans, "_plans", {})


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def packed_ref(lens_q, lens_k, alibi_slopes=None, **kw):
    """attention_ref per sequence, concatenated: the oracle of a packed batch."""
    def ref(q, k, v, **ref_kw):
        outs, cq, ck = [], cu(lens_q).tolist(), cu(lens_k).tolist()
        for i in range(len(lens_q)):
            slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
            outs.append(attention_ref(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]], v[None, ck[i]:ck[i + 1]],
                                      alibi_slopes=slopes, **kw, **ref_kw)[0])
        return torch.cat(outs)
    return ref


def load_script(relative_path: str):
    """A script of the repository (e.g. ``benchmarks/fp8.py``) imported as a module, for the
    tests of benchmarks; a generator for module-scoped fixtures (removed from sys.modules after)."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location("script_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def poison(t: torch.Tensor, positions, value=float("nan")) -> torch.Tensor:
    """``t`` (seqlen on dim 1, or dim 0 for 3-D packed tensors) with ``value`` at ``positions``."""
    t = t.clone()
    dim = 1 if t.dim() == 4 else 0
    for p in positions:
        t.select(dim, p).fill_(value)
    return t


def check_rows(out: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> None:
    """The same rows are non-finite, and the finite rows meet the accuracy rule."""
    bad, bad_ref = ~out.isfinite(), ~ref.isfinite()
    assert torch.equal(bad.any(-1), bad_ref.any(-1)), (
        f"non-finite rows differ: {bad.any(-1).sum().item()} against the oracle's {bad_ref.any(-1).sum().item()}")
    keep = ~bad_ref.any(-1, keepdim=True).expand_as(ref)
    assert max_err(out[keep], ref[keep]) <= 2 * max_err(low[keep], ref[keep]) + rounding_floor(ref[keep], dtype)
