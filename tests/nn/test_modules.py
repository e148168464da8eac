"""flashtile.nn: MultiheadAttention against torch.nn.MultiheadAttention (same
weights) and against a PyTorch reference of the same layer (GQA, rotary, window,
softcap), for training (outputs and gradients), padded and packed batches, and
incremental decoding over a KVCache."""

import math

import pytest
import torch

from flashtile.nn import MultiheadAttention, RotaryEmbedding
from flashtile.testing import attention_ref


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _accuracy(ours, low, ref, factor, what):
    err, base = _err(ours, ref), _err(low, ref)
    floor = 2 * torch.finfo(ours.dtype).eps * max(1.0, ref.abs().max().item())
    assert err <= factor * base + floor, f"{what}: error {err:.3e} vs PyTorch {base:.3e}"


@pytest.mark.parametrize("case", ["plain", "causal", "padding"])
def test_matches_torch_multihead_attention(backend, case):
    torch.manual_seed(0)
    embed, heads, batch, seqlen = 48, 4, 3, 19
    ours = MultiheadAttention(embed, heads, causal=case == "causal")
    theirs = torch.nn.MultiheadAttention(embed, heads, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.Wqkv.weight)
        theirs.in_proj_bias.copy_(ours.Wqkv.bias)
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(batch, seqlen, embed)
    keep = torch.ones(batch, seqlen, dtype=torch.bool)
    if case == "padding":
        keep[1, 12:] = False
        keep[2, 5:] = False
    kw = {}
    if case == "causal":
        kw["attn_mask"] = torch.ones(seqlen, seqlen, dtype=torch.bool).triu(1)  # True = not attended
    if case == "padding":
        kw["key_padding_mask"] = ~keep

    def run(module, dtype):
        module = module.to(dtype)
        xi = x.to(dtype).requires_grad_()
        if module is ours:
            out = module(xi, key_padding_mask=keep if case == "padding" else None)
        else:
            out = module(xi, xi, xi, need_weights=False, **kw)[0]
        loss = (out * keep[..., None]).pow(2).sum()  # padded query rows are not compared
        grads = torch.autograd.grad(loss, [xi, *module.parameters()])
        return out[keep], grads

    out, grads = run(ours, torch.float32)
    low, grads_low = run(theirs, torch.float32)
    ref, grads_ref = run(theirs, torch.float64)
    _accuracy(out, low, ref, 2.0, "output")
    for i, (g, gl, gr) in enumerate(zip(grads, grads_low, grads_ref)):
        _accuracy(g, gl, gr, 3.0, f"gradient {i}")
    ours.float()


def _complex_rotation(x, angles, positions):
    half = angles.shape[1]
    pairs = torch.stack([x[..., :half], x[..., half:2 * half]], dim=-1).double()
    z = torch.view_as_complex(pairs.contiguous()) * torch.polar(torch.ones_like(angles), angles)[positions].unsqueeze(-2)
    r = torch.view_as_real(z)
    return torch.cat([r[..., 0], r[..., 1], x[..., 2 * half:].double()], dim=-1).to(x.dtype)


def reference_layer(module, x, positions, causal, window, softcap, upcast=True):
    """The same layer with PyTorch ops: projections, rotary through complex numbers,
    attention_ref (``upcast=False``: every step in x's dtype)."""
    b, s, _ = x.shape
    qkv = torch.nn.functional.linear(x, module.Wqkv.weight.to(x.dtype), module.Wqkv.bias.to(x.dtype))
    h, hk, d = module.num_heads, module.num_heads_kv, module.head_dim
    q, k, v = qkv.split([h * d, hk * d, hk * d], dim=-1)
    q, k, v = q.unflatten(-1, (h, d)), k.unflatten(-1, (hk, d)), v.unflatten(-1, (hk, d))
    if module.rotary_emb is not None:
        dim, base = module.rotary_emb.dim, module.rotary_emb.base
        inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim)
        angles = torch.outer(torch.arange(int(positions.max()) + 1, dtype=torch.float64, device=x.device), inv)
        q, k = _complex_rotation(q, angles, positions), _complex_rotation(k, angles, positions)
    out = attention_ref(q, k, v, causal=causal, window_size=window, softcap=softcap, upcast=upcast,
                        compute_dtype=torch.float64 if upcast else None)
    return torch.nn.functional.linear(out.flatten(-2), module.out_proj.weight.to(x.dtype),
                                      module.out_proj.bias.to(x.dtype))


@pytest.mark.parametrize("case", ["gqa_rotary_causal", "window_softcap", "mqa_partial_rotary"])
def test_matches_reference_layer(backend, case):
    torch.manual_seed(1)
    kw = dict(gqa_rotary_causal=dict(num_heads_kv=2, rotary_emb_dim=16, causal=True),
              window_softcap=dict(num_heads_kv=4, causal=True, window_size=(6, 0), softcap=3.0),
              mqa_partial_rotary=dict(num_heads_kv=1, rotary_emb_dim=8))[case]
    module = MultiheadAttention(64, 4, **kw)
    x = torch.randn(2, 23, 64)
    positions = torch.arange(23)[None, :].expand(2, 23)
    ref_kw = dict(causal=module.causal, window=module.window_size, softcap=module.softcap)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    out = module(xs[0])
    low = reference_layer(module, xs[1], positions, upcast=False, **ref_kw)
    ref = reference_layer(module, xs[2].double(), positions, **ref_kw)
    _accuracy(out, low, ref, 2.0, "output")
    g = torch.randn_like(out)
    grads = [torch.autograd.grad(o, xi, g.to(o.dtype))[0] for o, xi in zip((out, low, ref), xs)]
    _accuracy(grads[0], grads[1], grads[2], 3.0, "dx")


@pytest.mark.parametrize("page_size", [None, 8])
def test_incremental_decoding_equals_full_forward(backend, page_size):
    torch.manual_seed(2)
    module = MultiheadAttention(64, 4, num_heads_kv=2, rotary_emb_dim=16, causal=True).eval()
    x = torch.randn(2, 21, 64)
    with torch.no_grad():
        full = module(x)
        cache = module.kv_cache(2, 32, page_size=page_size)
        steps = [module(x[:, :15], kv_cache=cache)]  # prefill
        steps += [module(x[:, t:t + 1], kv_cache=cache) for t in range(15, 21)]  # one token a step
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_packed_and_padded_batches_equal_each_sequence_alone(backend):
    torch.manual_seed(3)
    module = MultiheadAttention(32, 2, rotary_emb_dim=8, causal=True)
    lengths = [5, 11, 8]
    seqs = [torch.randn(n, 32) for n in lengths]
    alone = [module(s[None])[0] for s in seqs]
    cu = torch.tensor([0, 5, 16, 24], dtype=torch.int32)
    packed = module(torch.cat(seqs), cu_seqlens=cu, max_seqlen=11)
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-4, atol=1e-5)
    padded = torch.zeros(3, 11, 32)
    keep = torch.zeros(3, 11, dtype=torch.bool)
    for i, s in enumerate(seqs):
        padded[i, :len(s)], keep[i, :len(s)] = s, True
    out = module(padded, key_padding_mask=keep)
    torch.testing.assert_close(out[keep], torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_cross_attention_with_key_padding(backend):
    torch.manual_seed(4)
    module = MultiheadAttention(32, 4, num_heads_kv=2, cross_attn=True)
    x, memory = torch.randn(2, 7, 32), torch.randn(2, 12, 32)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, 9:] = False
    out = module(x, memory, key_padding_mask=keep)
    q = module.Wq(x).unflatten(-1, (4, 8))
    k, v = module.Wkv(memory).unflatten(-1, (2, 2, 8)).unbind(-3)
    bias = keep[:, None, None, :]
    expected = module.out_proj(attention_ref(q, k, v, attn_bias=bias).flatten(-2))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_dropout_only_while_training():
    module = MultiheadAttention(32, 2, dropout=0.5)
    x = torch.randn(1, 9, 32)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    torch.manual_seed(0)
    first = module(x)
    torch.manual_seed(0)
    assert torch.equal(first, module(x))  # reproducible under the seed
    assert not torch.allclose(first, module.eval()(x))


def test_rotary_embedding_module_matches_definition():
    rotary = RotaryEmbedding(8, base=100.0)
    q, k = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 1, 8)
    rq, rk = rotary(q, k, seqlen_offset=3)
    inv = 1.0 / 100.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angles = torch.outer(torch.arange(9, dtype=torch.float64), inv)
    positions = torch.arange(6)[None, :] + 3
    torch.testing.assert_close(rq, _complex_rotation(q, angles, positions), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rk, _complex_rotation(k, angles, positions), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_heads_kv"):
        MultiheadAttention(32, 4, num_heads_kv=3)
    with pytest.raises(ValueError, match="embed_dim"):
        MultiheadAttention(30, 4)
    with pytest.raises(NotImplementedError, match="scale_base"):
        RotaryEmbedding(8, scale_base=512.0)
    with pytest.raises(ValueError, match="x_kv"):
        MultiheadAttention(32, 4, cross_attn=True)(torch.randn(1, 3, 32))


@pytest.mark.gpu
def test_layer_gpu():
    torch.manual_seed(5)
    module = MultiheadAttention(1024, 16, num_heads_kv=4, rotary_emb_dim=64, causal=True, device="cuda",
                                dtype=torch.bfloat16)
    x = torch.randn(2, 1500, 1024, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(1500, device="cuda")[None, :].expand(2, 1500)
    out = module(x)
    ref_kw = dict(causal=True, window=(-1, -1), softcap=0.0)
    low = reference_layer(module, x, positions, upcast=False, **ref_kw)
    ref = reference_layer(module, x.double(), positions, **ref_kw)
    _accuracy(out, low, ref, 2.0, "output")
    assert math.isfinite(out.float().abs().max().item())
