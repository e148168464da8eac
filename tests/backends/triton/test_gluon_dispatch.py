"""The Gluon (Hopper) forward: when ``attention_forward`` takes it (by default
where it measured faster, FLASHTILE_GLUON=1/0 to force it, compute capability 9.0,
the options it implements) and
when it falls back to the Triton forward; its sm90 compilation on the host;
on a GPU, its accuracy and determinism against the reference."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import check_attention, check_rows, poison

from flashtile.backends.triton.launch import device as launch_device
from flashtile.backends.triton.launch import gluon as launch_gluon
from flashtile.options import AttnOptions
from flashtile.testing import attention_ref

ROOT = Path(__file__).resolve().parents[3]


def _qkv(seqlen_q=256, seqlen_k=256, heads=(16, 4), head_dim=128, dtype=torch.bfloat16, device="cpu"):
    q = torch.randn(2, seqlen_q, heads[0], head_dim, dtype=dtype, device=device)
    k = torch.randn(2, seqlen_k, heads[1], head_dim, dtype=dtype, device=device)
    v = torch.randn(2, seqlen_k, heads[1], head_dim, dtype=dtype, device=device)
    return q, k, v


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(launch_device, "ASSUMED_CAPABILITY", (9, 0))
    monkeypatch.setenv("FLASHTILE_GLUON", "1")


def _opts(head_dim=128, **kw):
    return AttnOptions(softmax_scale=head_dim ** -0.5, **kw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seqlen_k", [512, 1024, 4096, 8192])
def test_gluon_default_where_it_measured_faster(monkeypatch, causal, head_dim, seqlen_k):
    """Unset: full attention with rows of GLUON_MIN_KEYS keys or more, causal with
    GLUON_CAUSAL_MIN_KEYS; 1: always; 0: never."""
    q, k, v = _qkv(seqlen_q=64, seqlen_k=seqlen_k, heads=(2, 1), head_dim=head_dim)
    opts = _opts(head_dim, window_right=0 if causal else -1, diag_offset=seqlen_k - 64)
    monkeypatch.setattr(launch_device, "ASSUMED_CAPABILITY", (9, 0))
    monkeypatch.delenv("FLASHTILE_GLUON", raising=False)
    if causal:
        expected = seqlen_k >= launch_gluon.GLUON_CAUSAL_MIN_KEYS[head_dim]
    else:
        expected = seqlen_k >= launch_gluon.GLUON_MIN_KEYS[head_dim]
    assert launch_gluon.gluon_forward_supported(q, k, v, opts) == expected
    monkeypatch.setenv("FLASHTILE_GLUON", "0")
    assert not launch_gluon.gluon_forward_supported(q, k, v, opts)
    monkeypatch.setenv("FLASHTILE_GLUON", "1")
    assert launch_gluon.gluon_forward_supported(q, k, v, opts)


def test_no_gluon_without_gluon_in_triton(hopper, monkeypatch):
    monkeypatch.setattr(launch_gluon, "_gluon_importable", lambda: False)
    assert not launch_gluon.gluon_forward_supported(*_qkv(), _opts())


@pytest.mark.parametrize("capability", [None, (8, 0), (8, 9), (10, 0), (12, 0)])
def test_gluon_only_on_sm90(monkeypatch, capability):
    monkeypatch.setenv("FLASHTILE_GLUON", "1")
    monkeypatch.setattr(launch_device, "ASSUMED_CAPABILITY", capability)
    q, k, v = _qkv()
    assert not launch_gluon.gluon_forward_supported(q, k, v, _opts())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_takes_plain_and_causal(hopper, causal, head_dim, dtype):
    q, k, v = _qkv(seqlen_q=77, seqlen_k=1000, head_dim=head_dim, dtype=dtype)
    opts = _opts(head_dim, window_right=0 if causal else -1, diag_offset=1000 - 77)
    assert launch_gluon.gluon_forward_supported(q, k, v, opts)


def test_gluon_refuses_what_it_does_not_implement(hopper):
    q, k, v = _qkv()
    base = _opts()
    assert launch_gluon.gluon_forward_supported(q, k, v, base)
    refused = {
        "window": base._replace(window_left=64, window_right=0),
        "right window": base._replace(window_right=16),
        "left window only": base._replace(window_left=64),
        "softcap": base._replace(softcap=30.0),
        "alibi": base._replace(alibi=torch.ones(2, 16)),
        "bias": base._replace(bias=torch.zeros(2, 16, 256, 256)),
        "dropout": base._replace(dropout_p=0.1),
        "fixed_max": base._replace(fixed_max=10.0),
        "block_mask": base._replace(block_mask=object()),
        "sinks": base._replace(sinks=torch.zeros(16)),
    }
    for name, opts in refused.items():
        assert not launch_gluon.gluon_forward_supported(q, k, v, opts), name
    cu = torch.tensor([0, 256], dtype=torch.int32)
    extra = {
        "varlen": dict(cu_seqlens_q=cu, cu_seqlens_k=cu),
        "block-sparse": dict(sparse=object()),
        "seqused_k": dict(seqused_k=torch.full((2, ), 256, dtype=torch.int32)),
        "paged": dict(block_table=torch.zeros(2, 4, dtype=torch.int32)),
        "fp8": dict(fp8=(None, None, None, torch.bfloat16)),
    }
    for name, kw in extra.items():
        assert not launch_gluon.gluon_forward_supported(q, k, v, base, **kw), name
    # batch-invariant mode: the Triton forward's key tile for every call
    import flashtile

    previous = flashtile.set_batch_invariant(True)
    try:
        assert not launch_gluon.gluon_forward_supported(q, k, v, base)
    finally:
        flashtile.set_batch_invariant(previous)


def test_gluon_refuses_other_tensors(hopper):
    opts = _opts()
    q, k, v = _qkv()
    for name, (a, b, c) in {
            "fp32": (q.float(), k.float(), v.float()),
            "fp8": (q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)),
            "mixed dtypes": (q, k.half(), v.half()),
            "head dim 96": _qkv(head_dim=96),
            "head dim 256": _qkv(head_dim=256),
            "value head dim": (q, k, torch.randn(2, 256, 4, 64, dtype=torch.bfloat16)),
            "heads not a multiple": _qkv(heads=(16, 3)),
            "unaligned row stride": (q, torch.randn(2, 256, 4, 132, dtype=torch.bfloat16)[..., :128],
                                     torch.randn(2, 256, 4, 132, dtype=torch.bfloat16)[..., :128]),
            "unaligned base": (torch.randn(2 * 256 * 16 * 128 + 1, dtype=torch.bfloat16)[1:].view(2, 256, 16, 128),
                               k, v),
            "strided last dim": (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v),
    }.items():
        assert not launch_gluon.gluon_forward_supported(a, b, c, opts), name
    # free strides otherwise: (batch, heads, seqlen, dim) storage seen as (batch, seqlen, heads, dim)
    qt = torch.randn(2, 16, 256, 128, dtype=torch.bfloat16).transpose(1, 2)
    assert launch_gluon.gluon_forward_supported(qt, k, v, opts)


def test_attention_forward_dispatches_to_gluon(hopper, monkeypatch):
    """attention_forward returns the Gluon result when supported and falls back otherwise."""
    from flashtile.backends.triton.launch import attention as launch_attention

    calls = []
    marker = (torch.zeros(1), torch.zeros(1))

    def fake(q, k, v, opts):
        calls.append(opts)
        return marker

    monkeypatch.setattr(launch_attention, "gluon_attention_forward", fake)
    q, k, v = _qkv()
    assert launch_attention.attention_forward(q, k, v, _opts(window_right=0)) is marker
    assert len(calls) == 1
    # refused: not routed (the Triton path is not run here; its own tests cover it)
    monkeypatch.setattr(launch_attention, "run_planned", lambda *a, **kw: None)
    out, lse = launch_attention.attention_forward(q, k, v, _opts(softcap=5.0))
    assert len(calls) == 1 and out.shape == q.shape and lse.shape == (2, 16, 256)


def test_gluon_causal_alignment_is_bottom_right(monkeypatch):
    """The launcher passes flash_attn's bottom-right diagonal offset."""
    seen = {}

    def fake(q, k, v, scale, causal, diag_offset=None, kernel=None):
        seen.update(causal=causal, diag=diag_offset)
        return None, None

    monkeypatch.setattr(launch_gluon, "gluon_forward", fake)
    q, k, v = _qkv(seqlen_q=77, seqlen_k=1000)
    launch_gluon.gluon_attention_forward(q, k, v, _opts(window_right=0, diag_offset=923))
    assert seen == dict(causal=True, diag=923)


def _load_compile_tool():
    spec = importlib.util.spec_from_file_location("gluon_compile", ROOT / "benchmarks" / "tools" / "gluon_compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gluon_kernels_compile_for_sm90_on_the_host():
    """Both kernels, head dim 128, causal: compiled for sm90 without a GPU (about
    5 s on two CPU cores), no register spills, within Hopper's 227 KiB of shared memory."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("compiles for sm90; not under the interpreter")
    tool = _load_compile_tool()
    records = tool.compile_gluon(kernels=("simple", "ws"), head_dims=(128, ), causals=(True, ), seqlen=256)
    assert [name for name, _, _ in records] == ["gluon_fwd_simple", "gluon_fwd_ws"]
    for name, _, kernel in records:
        usage = tool.sm90_compile._resource_usage(kernel)
        assert "stack 0 B" in usage, (name, usage)
        assert kernel.metadata.shared <= 227 * 1024, name
        assert "wgmma.mma_async" in kernel.asm["ptx"], name
    assert "setmaxnreg" in records[1][2].asm["ptx"]


# --- GPU: accuracy against the reference and determinism (Hopper only) ---

def _on_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _lse_ref(q, k, scale, causal):
    """Natural-log LSE (batch, heads, seqlen_q) in float64, -inf for rows that see no key."""
    group = q.shape[2] // k.shape[2]
    kk = k.double().repeat_interleave(group, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), kk) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, -math.inf)
    return torch.logsumexp(s, dim=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", launch_gluon.KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", [(77, 77), (1000, 1000), (1500, 1500), (4096, 4096), (77, 1500), (1500, 77)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_forward_accuracy(kernel, causal, seqlens, head_dim, dtype):
    if not _on_hopper():
        pytest.skip("Gluon forward kernels are built for sm90")
    seqlen_q, seqlen_k = seqlens
    batch = 1 if max(seqlens) >= 4096 else 2
    q = torch.randn(batch, seqlen_q, 16, head_dim, dtype=dtype, device="cuda")
    k = torch.randn(batch, seqlen_k, 4, head_dim, dtype=dtype, device="cuda")
    v = torch.randn(batch, seqlen_k, 4, head_dim, dtype=dtype, device="cuda")
    scale = head_dim ** -0.5
    lse = {}

    def fn(q, k, v):
        out, lse["gluon"] = launch_gluon.gluon_forward(q, k, v, scale, causal, kernel=kernel)
        return out

    check_attention(fn, q, k, v, backward=False, causal=causal)
    ref = _lse_ref(q, k, scale, causal)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lse["gluon"]), finite)  # rows that see no key: -inf
    torch.testing.assert_close(lse["gluon"][finite].double(), ref[finite], atol=2e-3, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", launch_gluon.KERNELS)
def test_gluon_forward_rows_without_keys_and_strides(kernel):
    """Causal with seqlen_q > seqlen_k (the first rows see no key: output 0, LSE -inf)
    on (batch, heads, seqlen, dim) storage."""
    if not _on_hopper():
        pytest.skip("Gluon forward kernels are built for sm90")
    q = torch.randn(2, 16, 300, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    k = torch.randn(2, 4, 200, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    v = torch.randn(2, 4, 200, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    out, lse = launch_gluon.gluon_forward(q, k, v, 128 ** -0.5, True, kernel=kernel)
    assert torch.all(out[:, :100] == 0) and torch.all(lse[:, :, :100] == -math.inf)
    check_attention(lambda q, k, v: launch_gluon.gluon_forward(q, k, v, 128 ** -0.5, True, kernel=kernel)[0], q, k,
                    v, backward=False, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", launch_gluon.KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_forward_is_deterministic(kernel, causal):
    if not _on_hopper():
        pytest.skip("Gluon forward kernels are built for sm90")
    q, k, v = _qkv(seqlen_q=1500, seqlen_k=1500, device="cuda")
    first = launch_gluon.gluon_forward(q, k, v, 128 ** -0.5, causal, kernel=kernel)
    for _ in range(3):
        again = launch_gluon.gluon_forward(q, k, v, 128 ** -0.5, causal, kernel=kernel)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.gpu
def test_flash_attn_func_takes_gluon_when_opted_in(monkeypatch):
    if not _on_hopper():
        pytest.skip("Gluon forward kernels are built for sm90")
    import flashtile

    q, k, v = _qkv(seqlen_q=1000, seqlen_k=1000, device="cuda")
    monkeypatch.setenv("FLASHTILE_GLUON", "0")
    triton_out = flashtile.flash_attn_func(q, k, v, causal=True)
    monkeypatch.setenv("FLASHTILE_GLUON", "1")
    gluon_out = flashtile.flash_attn_func(q, k, v, causal=True)
    direct, _ = launch_gluon.gluon_forward(q, k, v, 128 ** -0.5, True)
    assert torch.equal(gluon_out, direct)
    torch.testing.assert_close(gluon_out, triton_out, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", launch_gluon.KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", [(1000, 1000), (300, 1000), (1000, 1037)])
def test_gluon_forward_nan_hygiene(kernel, causal, seqlens):
    """A key whose value is NaN (or Inf) reaches exactly the rows that see it: rows of
    the same diagonal tile before it stay finite, as in the oracle."""
    if not _on_hopper():
        pytest.skip("Gluon forward kernels are built for sm90")
    seqlen_q, seqlen_k = seqlens
    q = torch.randn(2, seqlen_q, 8, 128, dtype=torch.bfloat16, device="cuda")
    k = poison(torch.randn(2, seqlen_k, 2, 128, dtype=torch.bfloat16, device="cuda"), [seqlen_k - 300])
    v = poison(poison(torch.randn(2, seqlen_k, 2, 128, dtype=torch.bfloat16, device="cuda"), [seqlen_k - 300]),
               [seqlen_k - 700], float("inf"))
    out, _ = launch_gluon.gluon_forward(q, k, v, 128 ** -0.5, causal, kernel=kernel)
    kw = dict(causal=causal)
    check_rows(out, attention_ref(q, k, v, compute_dtype=torch.float64, **kw),
               attention_ref(q, k, v, upcast=False, **kw), torch.bfloat16)


# --- the Gluon dK/dV kernel of the backward (opt-in: FLASHTILE_GLUON_BWD=1) ---

def _bwd_supported(q, k, v, opts, **kw):
    lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1])
    return launch_gluon.gluon_backward_supported(q, k, v, torch.randn_like(q), lse, opts, **kw)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_backward_only_when_asked(monkeypatch, head_dim, dtype):
    q, k, v = _qkv(seqlen_q=77, seqlen_k=1000, heads=(4, 4), head_dim=head_dim, dtype=dtype)
    opts = _opts(head_dim)
    monkeypatch.setattr(launch_device, "ASSUMED_CAPABILITY", (9, 0))
    monkeypatch.delenv("FLASHTILE_GLUON_BWD", raising=False)
    assert not _bwd_supported(q, k, v, opts)
    monkeypatch.setenv("FLASHTILE_GLUON_BWD", "1")
    assert _bwd_supported(q, k, v, opts)
    monkeypatch.setattr(launch_device, "ASSUMED_CAPABILITY", (8, 0))
    assert not _bwd_supported(q, k, v, opts)


def test_gluon_backward_refuses_what_it_does_not_implement(monkeypatch):
    monkeypatch.setattr(launch_device, "ASSUMED_CAPABILITY", (9, 0))
    monkeypatch.setenv("FLASHTILE_GLUON_BWD", "1")
    q, k, v = _qkv(heads=(4, 4))
    base = _opts()
    assert _bwd_supported(q, k, v, base)
    assert _bwd_supported(q, k, v, base._replace(window_right=0))  # causal
    refused = {
        "window": (base._replace(window_left=64), {}),
        "window, causal": (base._replace(window_left=64, window_right=0), {}),
        "right window": (base._replace(window_right=16), {}),
        "softcap": (base._replace(softcap=30.0), {}),
        "alibi": (base._replace(alibi=torch.ones(2, 4)), {}),
        "dropout": (base._replace(dropout_p=0.1), {}),
        "sinks": (base._replace(sinks=torch.zeros(4)), {}),
        "bias gradient": (base, dict(bias_grad=True)),
        "varlen": (base, dict(varlen=True)),
        "block-sparse": (base, dict(sparse=object())),
        "seqused_k": (base, dict(seqused_k=torch.full((2, ), 256, dtype=torch.int32))),
    }
    for name, (opts, kw) in refused.items():
        assert not _bwd_supported(q, k, v, opts, **kw), name
    for name, (a, b, c) in {"heads not a multiple": _qkv(heads=(16, 3)),
                            "head dim 96": _qkv(heads=(4, 4), head_dim=96),
                            "fp32": tuple(t.float() for t in (q, k, v))}.items():
        assert not _bwd_supported(a, b, c, base), name
    assert _bwd_supported(*_qkv(heads=(16, 4)), base)  # GQA


def test_gluon_backward_kernel_compiles_for_sm90_on_the_host():
    """Head dims 64 and 128, full and causal, one key/value head per query head and GQA:
    within Hopper's shared memory; no register spills, but for a few scalars and the
    masked steps' registers at head dim 128 causal (at most 256 B of stack)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("compiles for sm90; not under the interpreter")
    tool = _load_compile_tool()
    records = tool.compile_gluon(kernels=("dkdv", "dkdv_ws"), head_dims=(64, 128), seqlen=256)
    assert [name for name, _, _ in records] == (["gluon_bwd_dkdv"] * 4 + ["gluon_bwd_dkdv_ws"] * 2) * 2
    for name, switches, kernel in records:
        usage = tool.sm90_compile._resource_usage(kernel)
        stack = int(usage.split("stack ")[1].split(" B")[0])
        # head dim 128: the simple kernel's causal masked loop, the warp-specialised one's consumers
        assert stack == 0 or (switches["HEAD_D"] == 128 and stack <= 256), (name, switches, usage)
        assert kernel.metadata.shared <= 227 * 1024, name
        assert "wgmma.mma_async" in kernel.asm["ptx"], name


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", launch_gluon.BWD_KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(6, 6), (8, 2)], ids=str)
@pytest.mark.parametrize("seqlens", [(77, 77), (1000, 1000), (1500, 1037), (77, 1500), (1500, 77)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gluon_backward_accuracy(monkeypatch, kernel, causal, heads, seqlens, head_dim, dtype):
    """flash_attn_func's gradients with dK and dV from the Gluon kernel, against the oracle
    (the warp-specialised kernel: full attention; causal calls take the simple one)."""
    if not _on_hopper():
        pytest.skip("the Gluon kernels are built for sm90")
    monkeypatch.setenv("FLASHTILE_GLUON_BWD_KERNEL", kernel)
    import flashtile
    from flashtile.backends.triton.launch import attention as launch_attention

    monkeypatch.setenv("FLASHTILE_GLUON_BWD", "1")
    taken = []
    real = launch_attention.gluon_backward_dkdv
    monkeypatch.setattr(launch_attention, "gluon_backward_dkdv", lambda *a: taken.append(1) or real(*a))
    seqlen_q, seqlen_k = seqlens
    q = torch.randn(2, seqlen_q, heads[0], head_dim, dtype=dtype, device="cuda")
    k = torch.randn(2, seqlen_k, heads[1], head_dim, dtype=dtype, device="cuda")
    v = torch.randn(2, seqlen_k, heads[1], head_dim, dtype=dtype, device="cuda")
    check_attention(lambda q, k, v: flashtile.flash_attn_func(q, k, v, causal=causal), q, k, v, causal=causal)
    assert taken  # the Gluon kernel computed dK and dV


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["q", "dout", "v"])
@pytest.mark.parametrize("seqlens", [(300, 300), (200, 500), (500, 200)], ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=str)
def test_gluon_backward_nan_hygiene(monkeypatch, where, seqlens, heads):
    """Causal: a NaN row of q or dO (query ``r``) reaches the dK and dV rows of exactly the
    keys that ``r`` sees; a NaN value row reaches every output row that sees it, so
    through delta = rowsum(dO * O) the dK rows of every key those rows see (here all),
    and no dV row. The finite rows agree with the Triton kernels'."""
    if not _on_hopper():
        pytest.skip("the Gluon kernels are built for sm90")
    import flashtile

    seqlen_q, seqlen_k = seqlens
    diag = seqlen_k - seqlen_q
    q = torch.randn(2, seqlen_q, heads[0], 128, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(2, seqlen_k, heads[1], 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    dout = torch.randn_like(q)
    at = {"q": seqlen_q // 3, "dout": seqlen_q // 3, "v": seqlen_k // 3}[where]
    tensors = dict(q=q, dout=dout, v=v)
    tensors[where] = poison(tensors[where], [at])
    keys = torch.arange(seqlen_k, device="cuda")
    if where == "v":
        expected = dict(dk=keys <= seqlen_q - 1 + diag, dv=torch.zeros_like(keys, dtype=torch.bool))
    else:
        expected = dict(dk=keys <= at + diag, dv=keys <= at + diag)

    def grads(flag):
        monkeypatch.setenv("FLASHTILE_GLUON_BWD", flag)
        qs, ks, vs = (t.clone().requires_grad_() for t in (tensors["q"], k, tensors["v"]))
        out = flashtile.flash_attn_func(qs, ks, vs, causal=True)
        return torch.autograd.grad(out, (ks, vs), tensors["dout"])

    for name, got, ref in zip(("dk", "dv"), grads("1"), grads("0")):
        bad_keys = (~got.isfinite()).any(-1).any(-1).any(0)
        assert torch.equal(bad_keys, expected[name]), (
            f"{name}: non-finite rows {bad_keys.nonzero().flatten().tolist()[:8]}.., expected up to key "
            f"{int(expected[name].sum()) - 1}")
        keep = got.isfinite() & ref.isfinite()
        torch.testing.assert_close(got[keep].float(), ref[keep].float(), atol=3e-2, rtol=3e-2)
