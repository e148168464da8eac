"""A larger grid on a CUDA GPU with the compiled kernels (marker ``gpu``).

Run with ``FLASHTILE_TEST_GPU=1 pytest -m gpu`` on a machine with a GPU.
"""

import pytest
import torch

from flashtile import flash_attn_func, scaled_dot_product_attention
from flashtile.testing import attention_ref
from helpers import check_attention, count_plan_replays, force_forward_config

pytestmark = pytest.mark.gpu

HEAD_DIMS = [32, 59, 64, 96, 128, 192, 256]
SEQLENS = [(1, 4096), (4096, 4096), (1000, 3001), (2048, 512), (113, 203)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seqlens", SEQLENS, ids=str)
def test_flash_attn_gpu(dtype, causal, head_dim, seqlens):
    seqlen_q, seqlen_k = seqlens
    h, hk = 4, 2
    q = torch.randn(2, seqlen_q, h, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(2, seqlen_k, hk, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(2, seqlen_k, hk, head_dim, device="cuda", dtype=dtype)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_gpu_matches_torch(causal):
    q = torch.randn(4, 8, 1500, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 2, 1700, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(4, 2, 1700, 128, device="cuda", dtype=torch.bfloat16)
    out = scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                                           enable_gqa=True)
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert (out.double() - ref).abs().max() <= 2 * (low.double() - ref).abs().max() + 1e-2


def test_deterministic_backward_gpu():
    q, k, v = (torch.randn(2, 2048, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_long_sequence_memory_linear_gpu():
    # 64k tokens would need 16 GiB for one head's fp32 score matrix; here it must fit in a few MiB
    q, k, v = (torch.randn(1, 65536, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = flash_attn_func(q, k, v, causal=True)
    out.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 16 * q.numel() * q.element_size()
    assert torch.isfinite(q.grad).all()


# --- options of the flash_attn / SDPA APIs on the GPU --------------------------------------

FEATURES = {
    "window": dict(window_size=(300, 40)),
    "causal_window": dict(causal=True, window_size=(513, 0)),
    "softcap": dict(softcap=5.0),
    "alibi": dict(alibi_slopes="per_head"),
    "everything": dict(causal=True, window_size=(700, 0), softcap=8.0, alibi_slopes="per_batch"),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_flash_attn_options_gpu(dtype, head_dim, feature):
    kw = dict(FEATURES[feature])
    if kw.get("alibi_slopes") == "per_head":
        kw["alibi_slopes"] = torch.rand(8, device="cuda") * 0.1
    elif kw.get("alibi_slopes") == "per_batch":
        kw["alibi_slopes"] = torch.rand(2, 8, device="cuda") * 0.1
    q = torch.randn(2, 1500, 8, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, 2100, 2, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.parametrize("shape", [(2, 8, 1000, 1200), (1, 8, 1000, 1200), (2, 1, 1, 1200)], ids=str)
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_sdpa_mask_gpu(shape, kind):
    dtype = torch.bfloat16
    q = torch.randn(2, 1000, 8, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, 1200, 4, 128, device="cuda", dtype=dtype) for _ in range(2))
    if kind == "float":
        bias = torch.randn(shape, device="cuda", dtype=dtype).requires_grad_()
    else:
        bias = torch.rand(shape, device="cuda") > 0.2

    def fn(q, k, v, bias):
        return scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            attn_mask=bias, enable_gqa=True).transpose(1, 2)

    check_attention(fn, q, k, v, bias=bias, causal_align="top_left")


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_gpu(causal):
    q = torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 1300, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    torch.manual_seed(11)
    state = torch.get_rng_state()
    _, _, s_dmask = flash_attn_func(q, k, v, dropout_p=0.1, causal=causal, return_attn_probs=True)
    attended = s_dmask != 0  # causal leaves zeros (probability 0) that dropout does not see
    assert abs((s_dmask > 0).sum().item() / attended.sum().item() - 0.9) < 0.01

    def fn(q, k, v):
        torch.set_rng_state(state)
        return flash_attn_func(q, k, v, dropout_p=0.1, causal=causal)

    check_attention(fn, q, k, v, causal=causal, dropout_p=0.1, dropout_mask=s_dmask >= 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_gpu(causal, head_dim):
    from flashtile import flash_attn_varlen_func
    from flashtile.testing import attention_ref

    lens = [1, 700, 0, 2049, 128, 333]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lens), 8 if i == 0 else 2, head_dim, device="cuda", dtype=torch.bfloat16)
               for i in range(3))

    def ref(q, k, v, **kw):
        c = cu.tolist()
        return torch.cat([attention_ref(q[None, c[i]:c[i + 1]], k[None, c[i]:c[i + 1]], v[None, c[i]:c[i + 1]],
                                        causal=causal, **kw)[0] for i in range(len(lens))])

    check_attention(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=causal),
                    q, k, v, ref_fn=ref)


def test_unaligned_strides_take_the_pointer_path_gpu():
    # head dim 59 gives rows of 118 bytes: no tensor descriptors, the plain loads must serve
    q, k, v = (torch.randn(2, 777, 4, 59, device="cuda", dtype=torch.float16) for _ in range(3))
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=True), q, k, v, causal=True)


@pytest.mark.parametrize("config", ["256x64x8x3", "128x128x4x3"])
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "softcap"])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("seqlens", [(4096, 4096), (1000, 3001), (2048, 512)], ids=str)
def test_forward_two_halves_gpu(monkeypatch, config, feature, head_dim, seqlens):
    # the forward's query block as two halves, whatever launch-table entry the call takes
    from flashtile.backends.triton.launch.table import LaunchConfig

    force_forward_config(monkeypatch, LaunchConfig(*map(int, config.split("x")), halves=True))
    kw = dict(plain={}, causal=dict(causal=True), window=dict(window_size=(700, 50)), softcap=dict(softcap=20.0))
    kw = kw[feature]
    q = torch.randn(2, seqlens[0], 4, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, seqlens[1], 2, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, seqlens[1], 2, head_dim, device="cuda", dtype=torch.bfloat16)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, **kw), q, k, v, backward=False, **kw)


@pytest.mark.parametrize("case", ["dropout", "bias_grad", "causal_window"])
@pytest.mark.parametrize("head_dim", [128, 256])
def test_backward_in_two_launches_gpu(monkeypatch, case, head_dim):
    # dV and dK in launches of their own (the Hopper table's choice at head dim 256) against
    # one launch for both, and the bias gradient against the reference
    from helpers import set_switch

    q = torch.randn(2, 1000, 8, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 1300, 2, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bias = torch.randn(2, 8, 1000, 1300, device="cuda", dtype=torch.bfloat16) if case == "bias_grad" else None
    kw = dict(dropout=dict(dropout_p=0.2), causal_window=dict(causal=True, window_size=(500, 0))).get(case, {})

    def fn(q, k, v, bias=None):
        if bias is not None:
            return scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                attn_mask=bias, enable_gqa=True).transpose(1, 2)
        torch.manual_seed(3)  # one dropout mask for every call
        return flash_attn_func(q, k, v, **kw)

    dout = torch.randn_like(q)
    grads = {}
    for split in ("0", "1"):
        set_switch(monkeypatch, "FLASHTILE_BWD_SPLIT", split)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([] if bias is None else [bias.clone().requires_grad_()])
        fn(*leaves).backward(dout)
        grads[split] = [t.grad.float() for t in leaves]
    for name, joint, apart in zip("q k v bias".split(), grads["0"], grads["1"]):
        torch.testing.assert_close(apart, joint, rtol=1e-2, atol=1e-2 * joint.abs().max().item(), msg=f"d{name}")
    if case != "dropout":
        check_attention(fn, q, k, v, bias=None if bias is None else bias.requires_grad_(),
                        causal_align="top_left" if bias is not None else "bottom_right", **kw)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_causal_longest_first_grid_gpu(head_dim):
    """Enough (batch, head) pairs that the causal grids have both sections: heads
    issued one after another, then the last waves block by block (program_tile)."""
    from flashtile import options
    from flashtile.backends.triton.launch import attention as launch_attention, choose as launch_choose, device as launch_device, plans as launch_plans

    q, k, v = (torch.randn(4, 1536, 24, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert 0 < launch_device.tail_heads(1536 // 128, 4 * 24, True, q.device) < 4 * 24
    assert 0 < launch_device.tail_heads(1536 // 64, 4 * 24, True, q.device) < 4 * 24
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=True), q, k, v, causal=True)


def test_bench_graph_timing_gpu():
    """``flashtile bench --graph``: every mode also timed as CUDA-graph replays."""
    from flashtile.cli.bench import Case, _gpu_measure

    case = Case("bf16", 64, True, 1024, 2, 4)
    for provider in ("flashtile", "sdpa_flash"):
        results = _gpu_measure(provider, case, ["fwd", "fwd_bwd"], graph=True)
        assert [r.status for r in results] == ["ok", "ok"]
        assert all(r.extra["graph_ms"] > 0 for r in results), [r.extra for r in results]


@pytest.mark.parametrize("case", ["d128_causal_1k_descriptors", "d64_short", "dropout", "varlen"])
def test_replayed_launches_gpu(monkeypatch, case):
    """Calls seen before replay their launch plans through the compiled launchers
    directly; fresh inputs each time, and a replay captured in a CUDA graph."""
    from flashtile import flash_attn_varlen_func

    runs = count_plan_replays(monkeypatch)
    d, s, kw = {"d128_causal_1k_descriptors": (128, 1024, dict(causal=True)), "d64_short": (64, 300, {}),
                "dropout": (64, 500, dict(dropout_p=0.2)), "varlen": (64, 700, dict(causal=True))}[case]

    cu = torch.tensor([0, 300, 700], device="cuda", dtype=torch.int32)

    def call(q, k, v):
        if case == "varlen":
            return flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 400, 400, **kw)[None]
        return flash_attn_func(q, k, v, **kw)

    # dropout: one seed for both rounds (plans replay only within a seed's specialisation class)
    state = torch.get_rng_state()
    for _ in range(2):
        q, k, v = (torch.randn(1 if case == "varlen" else 2, s, 4, d, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        if case == "dropout":  # same seed for the kernel and the reference's mask
            torch.set_rng_state(state)
            _, _, s_dmask = flash_attn_func(q, k, v, return_attn_probs=True, **kw)

            def fn(q, k, v):
                torch.set_rng_state(state)
                return call(q, k, v)

            check_attention(fn, q, k, v, dropout_p=0.2, dropout_mask=s_dmask >= 0)
        elif case == "varlen":
            rows = [slice(0, 300), slice(300, 700)]

            def ref(q, k, v, **ref_kw):
                return torch.cat([attention_ref(q[:, r], k[:, r], v[:, r], causal=True, **ref_kw) for r in rows], dim=1)

            check_attention(call, q, k, v, ref_fn=ref)
        else:
            check_attention(call, q, k, v, **kw)
    assert ["attn_fwd_kernel"] in runs and ["attn_bwd_dq_kernel", "attn_bwd_dkdv_kernel"] in runs
    if case != "dropout":
        eager = call(q, k, v)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call(q, k, v)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
