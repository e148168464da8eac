"""``flashtile check``: the main public functions on small random inputs against the
materialised oracle, on this machine's device, with the accuracy rule: the
error against fp64 at most 2x (outputs) or 3x (gradients) PyTorch's own error
in the input dtype, plus a rounding floor."""

from __future__ import annotations

import time

import torch


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def _floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    largest = ref.abs().max().item() if ref.numel() else 0.0
    return max(2 * torch.finfo(dtype).eps * max(largest, 1.0), 1e-5)


def _rule(ours, low, ref, factor=2.0) -> str | None:
    err, base = _err(ours, ref), _err(low, ref)
    if not err <= factor * base + _floor(ref, ours.dtype):
        return f"error {err:.2e} against PyTorch's {base:.2e}"
    return None


def _checks(device: str):
    import flashtile
    from flashtile.nn import MultiheadAttention
    from flashtile.testing import attention_ref, plain_cosine_sim_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(device, dt)

    q, k, v = randn(2, 77, 4, 64), randn(2, 113, 2, 64), randn(2, 113, 2, 64)

    def against_ref(fn, ref_kw, backward=True, q=q, k=k, v=v):
        leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
        out = fn(*leaves)
        ref = attention_ref(*(t.double() for t in leaves), **ref_kw)
        low = attention_ref(*leaves, upcast=False, **ref_kw)
        problem = _rule(out, low, ref)
        if problem or not backward:
            return problem
        dout = torch.randn(out.shape, generator=gen).to(device, out.dtype)
        for name, g, gl, gr in zip("qkv", torch.autograd.grad(out, leaves, dout),
                                   torch.autograd.grad(low, leaves, dout),
                                   torch.autograd.grad(ref, leaves, dout.double())):
            problem = _rule(g, gl, gr, 3.0)
            if problem:
                return f"d{name}: {problem}"
        return None

    def flash_attn_func():
        return against_ref(lambda q, k, v: flashtile.flash_attn_func(q, k, v, causal=True), dict(causal=True))

    def options():
        slopes = torch.rand(4, generator=gen).to(device)
        kw = dict(window_size=(20, 5), softcap=5.0, alibi_slopes=slopes)
        return against_ref(lambda q, k, v: flashtile.flash_attn_func(q, k, v, **kw), kw)

    def sinks_and_value_head_dim():
        sinks = (torch.randn(4, generator=gen) * 2).to(device)
        v_narrow = randn(2, 113, 2, 48)
        out = flashtile.flash_attn_func(q, k, v_narrow, causal=True, sinks=sinks)
        ref = attention_ref(q.double(), k.double(), v_narrow.double(), causal=True, sinks=sinks.double())
        low = attention_ref(q, k, v_narrow, causal=True, sinks=sinks, upcast=False)
        return _rule(out, low, ref)

    def paged_prefill():
        pages = torch.randperm(16, generator=gen).to(device).to(torch.int32).reshape(2, 8)
        k_cache, v_cache = randn(16, 16, 2, 64), randn(16, 16, 2, 64)
        cu_q = torch.tensor([0, 30, 77], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 100, 213], dtype=torch.int32, device=device)
        out = flashtile.flash_attn_varlen_func(q[0], k_cache, v_cache, cu_q, cu_k, 47, 113, causal=True,
                                               block_table=pages)
        for b, (rows, n) in enumerate([(slice(0, 30), 100), (slice(30, 77), 113)]):
            keys, values = (c[pages[b].long()].flatten(0, 1)[None, :n] for c in (k_cache, v_cache))
            ref = attention_ref(q[:1, rows].double(), keys.double(), values.double(), causal=True)[0]
            low = attention_ref(q[:1, rows], keys, values, causal=True, upcast=False)[0]
            problem = _rule(out[rows], low, ref)
            if problem:
                return problem
        return None

    def packed():
        qkv = randn(2, 77, 3, 4, 64)
        out = flashtile.flash_attn_qkvpacked_func(qkv, causal=True)
        expected = flashtile.flash_attn_func(*qkv.unbind(2), causal=True)
        return None if torch.equal(out, expected) else "qkvpacked differs from flash_attn_func"

    def sdpa():
        mask = torch.rand(1, 4, 77, 113, generator=gen).to(device) > 0.3
        return against_ref(lambda q, k, v: flashtile.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True).transpose(1, 2),
            dict(attn_bias=mask))

    def varlen():
        lengths = [30, 0, 47]
        cu = torch.tensor([0, 30, 30, 77], dtype=torch.int32, device=device)
        out = flashtile.flash_attn_varlen_func(q[0], k[0, :77], v[0, :77], cu, cu, 47, 47, causal=True)
        for a, n in zip([0, 30, 30], lengths):
            if n:
                ref = attention_ref(q[:1, a:a + n].double(), k[:1, a:a + n].double(), v[:1, a:a + n].double(),
                                    causal=True)[0]
                low = attention_ref(q[:1, a:a + n], k[:1, a:a + n], v[:1, a:a + n], causal=True, upcast=False)[0]
                problem = _rule(out[a:a + n], low, ref)
                if problem:
                    return problem
        return None

    def kvcache():
        cache = flashtile.KVCache(2, 256, 2, 64, page_size=16, dtype=dtype, device=device)
        cache.attend(q[:, :70], k[:, :70], v[:, :70], causal=True)
        out = cache.attend(q[:, 70:71], k[:, 70:71], v[:, 70:71], causal=True)
        ref = attention_ref(q[:, 70:71].double(), k[:, :71].double(), v[:, :71].double(), causal=True)
        low = attention_ref(q[:, 70:71], k[:, :71], v[:, :71], causal=True, upcast=False)
        return _rule(out, low, ref)

    def block_sparse():
        mask = flashtile.create_block_mask(lambda b, h, i, j: (i // 32 == j // 32) | (j < 16), None, None, 77, 113,
                                           block_size=16, device=device)
        dense = mask.to_dense()
        return against_ref(lambda q, k, v: flashtile.block_sparse_attn_func(q, k, v, mask), dict(attn_bias=dense))

    def cosine_sim():
        qc, kc, vc = randn(2, 4, 77, 32), randn(2, 4, 113, 32), randn(2, 4, 113, 32)
        out = flashtile.flash_cosine_sim_attention(qc, kc, vc, causal=True)
        ref = plain_cosine_sim_attention(qc, kc, vc, causal=True, compute_dtype=torch.float64)
        low = plain_cosine_sim_attention(qc, kc, vc, causal=True)
        return _rule(out, low, ref)

    def rotary():
        angles = torch.rand(128, 16, generator=gen, dtype=torch.float64).to(device)
        out = flashtile.apply_rotary_emb(q, angles.cos().float(), angles.sin().float(), seqlen_offsets=3)
        back = flashtile.apply_rotary_emb(out.float(), angles.cos().float(), (-angles.sin()).float(), seqlen_offsets=3)
        return None if _err(back, q) <= 4 * torch.finfo(dtype).eps * q.abs().max().item() else "rotation not undone"

    def merge():
        _, lse_a, _ = flashtile.flash_attn_func(q, k[:, :60], v[:, :60], return_attn_probs=True)
        _, lse_b, _ = flashtile.flash_attn_func(q, k[:, 60:], v[:, 60:], return_attn_probs=True)
        out_a = flashtile.flash_attn_func(q, k[:, :60], v[:, :60])
        out_b = flashtile.flash_attn_func(q, k[:, 60:], v[:, 60:])
        merged, _ = flashtile.merge_attention_states(out_a, lse_a, out_b, lse_b)
        ref, low = attention_ref(q.double(), k.double(), v.double()), attention_ref(q, k, v, upcast=False)
        return _rule(merged.to(dtype), low, ref, 3.0)

    def module():
        layer = MultiheadAttention(64, 4, num_heads_kv=2, causal=True, rotary_emb_dim=16, device=device,
                                   dtype=dtype).eval()
        x = randn(2, 30, 64)
        with torch.no_grad():
            full = layer(x)
            cache = layer.kv_cache(2, 64)
            steps = torch.cat([layer(x[:, :25], kv_cache=cache)] +
                              [layer(x[:, t:t + 1], kv_cache=cache) for t in range(25, 30)], dim=1)
        tol = 8 * torch.finfo(dtype).eps * max(1.0, full.abs().max().item())
        return None if _err(steps, full) <= tol else f"decoding differs from the full forward by {_err(steps, full):.2e}"

    return [("flash_attn_func (causal, GQA, fwd+bwd)", flash_attn_func),
            ("flash_attn_func options (window, softcap, ALiBi)", options),
            ("flash_attn_func (sinks, a value head dim of its own)", sinks_and_value_head_dim),
            ("flash_attn_qkvpacked_func", packed),
            ("scaled_dot_product_attention (bool mask)", sdpa),
            ("flash_attn_varlen_func", varlen),
            ("flash_attn_varlen_func (paged KV cache)", paged_prefill),
            ("KVCache / flash_attn_with_kvcache (paged)", kvcache),
            ("block_sparse_attn_func", block_sparse),
            ("flash_cosine_sim_attention", cosine_sim),
            ("apply_rotary_emb", rotary),
            ("merge_attention_states", merge),
            ("nn.MultiheadAttention (decoding = full forward)", module)]


def run_checks(device: str | None = None) -> bool:
    """Print one line per check; True if every one passed."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise SystemExit(f"flashtile check: error: device {device!r} is not available here (cpu or cuda)")
    print(f"flashtile check on {torch.cuda.get_device_name() if device == 'cuda' else 'the CPU'}")
    failed = 0
    start = time.perf_counter()
    for name, fn in _checks(device):
        try:
            problem = fn()
        except Exception as exc:  # a crash is a failed check, reported as such
            problem = f"{type(exc).__name__}: {exc}"
        failed += problem is not None
        print(f"  {'ok  ' if problem is None else 'FAIL'} {name}" + ("" if problem is None else f": {problem}"))
    print(f"{'all checks passed' if not failed else f'{failed} check(s) failed'} "
          f"({time.perf_counter() - start:.1f} s)")
    return not failed
