"""The Triton kernels against attention_ref: under the interpreter on a CPU, and a larger
grid with the compiled kernels on a CUDA GPU (marker ``gpu``, ``FLASHTILE_TEST_GPU=1 pytest -m gpu``)."""

import pytest
import torch
import triton
import triton.language as tl
from helpers import check_attention, force_forward_config, set_switch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashtile import flash_attn_func, scaled_dot_product_attention
from flashtile.backends.triton.kernels.tiles import program_tile

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (seqlen_q, seqlen_k, headdim): ragged lengths, cross attention, odd head dims
SHAPES = [(1, 77, 40), (113, 203, 59), (128, 64, 96), (77, 113, 128), (64, 93, 256), (203, 113, 16)]
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (3, 1)}


# every shape in bf16; fp16 and fp32 (other casts, fp32's dot precision) on two of them, and on
# random shapes in test_random_shapes: the interpreter's time goes where the kernels differ
DTYPE_SHAPES = [(torch.bfloat16, shape) for shape in SHAPES] + [
    (dtype, shape) for dtype in (torch.float16, torch.float32) for shape in SHAPES[:2]]


@pytest.mark.parametrize("dtype, shape", DTYPE_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", list(HEADS), ids=str)
def test_flash_attn_func(dtype, causal, heads, shape):
    seqlen_q, seqlen_k, d = shape
    h, hk = HEADS[heads]
    q = torch.randn(2, seqlen_q, h, d, dtype=dtype)
    k = torch.randn(2, seqlen_k, hk, d, dtype=dtype)
    v = torch.randn(2, seqlen_k, hk, d, dtype=dtype)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, causal=causal)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2), seqlen_q=st.integers(1, 150), seqlen_k=st.integers(1, 150),
    group=st.sampled_from([1, 2, 3]), nheads_k=st.integers(1, 2), head_dim=st.integers(1, 160),
    dtype=st.sampled_from(DTYPES), causal=st.booleans(), scale=st.floats(0.05, 2.0),
)
def test_random_shapes(batch, seqlen_q, seqlen_k, group, nheads_k, head_dim, dtype, causal, scale):
    q = torch.randn(batch, seqlen_q, nheads_k * group, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen_k, nheads_k, head_dim, dtype=dtype)
    v = torch.randn(batch, seqlen_k, nheads_k, head_dim, dtype=dtype)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, softmax_scale=scale),
                    q, k, v, causal=causal, softmax_scale=scale)


@pytest.mark.parametrize("mode", ["1", "2"], ids=["in_kernel", "host"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_tensor_descriptors(monkeypatch, mode, dtype, causal):
    # the forward kernel reading K/V through tensor descriptors (the default on Hopper); head dim
    # 40 gives 16-byte aligned rows and 150 keys are enough rows, so K/V go through tensor descriptors
    set_switch(monkeypatch, "FLASHTILE_FWD_TMA", mode)
    q = torch.randn(2, 77, 4, 40, dtype=dtype)
    k = torch.randn(2, 150, 2, 40, dtype=dtype)
    v = torch.randn(2, 150, 2, 40, dtype=dtype)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, causal=causal, backward=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_tensor_descriptors(monkeypatch, dtype, causal):
    # dK/dV reading Q/dO and dQ reading K/V through tensor descriptors, with GQA
    set_switch(monkeypatch, "FLASHTILE_BWD_TMA", "1")
    q = torch.randn(1, 130, 4, 40, dtype=dtype)
    k = torch.randn(1, 150, 2, 40, dtype=dtype)
    v = torch.randn(1, 150, 2, 40, dtype=dtype)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, causal=causal)


def test_descriptors_only_where_they_apply(monkeypatch):
    from flashtile.backends.triton.launch import attention as launch_attention

    monkeypatch.setenv("FLASHTILE_FWD_TMA", "1")
    aligned = torch.randn(1, 200, 2, 64, dtype=torch.float16)
    assert launch_attention._descriptor_mode("FLASHTILE_FWD_TMA", 1, 200, 2048, 200, aligned) == 1
    assert launch_attention._descriptor_mode("FLASHTILE_FWD_TMA", 1, 200, 2048, 1, aligned) == 0     # too few rows
    odd = torch.randn(1, 200, 2, 59, dtype=torch.float16)                                   # 118-byte rows
    assert launch_attention._descriptor_mode("FLASHTILE_FWD_TMA", 1, 200, 2048, 200, odd) == 0
    monkeypatch.delenv("FLASHTILE_FWD_TMA")
    assert launch_attention._descriptor_mode("FLASHTILE_FWD_TMA", 1, 4096, 2048, 4096, aligned) == 0  # not a Hopper GPU


def test_forward_descriptors_by_row_length_on_hopper(monkeypatch):
    """Without the override, Hopper's forward reads K/V through descriptors from
    1k keys per row."""
    from flashtile.backends.triton.launch import attention as launch_attention
    from flashtile.backends.triton.launch import device as launch_device

    monkeypatch.delenv("FLASHTILE_FWD_TMA", raising=False)
    monkeypatch.setattr(launch_device, "ASSUMED_CAPABILITY", (9, 0))
    for head_dim, keys, expected in [(128, 1024, 1), (128, 1023, 0), (256, 1024, 1), (64, 1024, 1), (64, 1023, 0)]:
        q = torch.randn(1, 256, 2, head_dim, dtype=torch.bfloat16)
        assert launch_attention._forward_features(q, q, q, keys)["KV_DESC"] == expected, (head_dim, keys)


def test_launch_table_falls_back_to_the_base_kernel():
    from flashtile.backends.triton.launch import table as configs

    hopper = (9, 0)
    # a variant with an entry for this head dim takes it; one without, its base kernel's
    assert configs.launch_configs("dkdv_tma_causal", 64, 2, hopper)[0] == configs._SM90["dkdv_tma_causal"][64][0]
    assert configs.launch_configs("dkdv_tma_causal", 128, 2, hopper)[0] == configs._SM90["dkdv"][128][0]
    assert configs.launch_configs("dkdv_tma", 64, 2, hopper)[0] == configs._SM90["dkdv_tma"][64][0]
    assert configs.launch_configs("dq_causal", 256, 2, hopper)[0] == configs._SM90["dq"][256][0]
    assert configs.launch_configs("fwd_tma", 128, 2, (8, 0))[0] == configs._GENERIC["fwd"][128][0]
    assert configs.launch_configs("dq_tma_causal", 64, 2, None) == [configs._INTERPRETER]
    short = configs._SM90["fwd_tma_causal_short"][128][0]
    assert configs.launch_configs("fwd_tma_causal_short", 128, 2, hopper)[0] == short
    assert configs.launch_configs("fwd_tma_causal_short", 64, 2, hopper)[0] == configs._SM90["fwd_tma"][64][0]
    assert configs.launch_configs("fwd_causal_short", 128, 2, hopper)[0] == configs._SM90["fwd_causal"][128][0]
    # dK and dV apart: their own entries where the table splits, else the joint kernel's
    assert configs.launch_configs("dk_tma_causal", 256, 2, hopper)[0] == configs._SM90["dk"][256][0]
    assert configs.launch_configs("dv_tma", 128, 2, hopper)[0] == configs._SM90["dkdv"][128][0]
    assert configs.launch_configs("dv_causal", 64, 2, (8, 0))[0] == configs._GENERIC["dkdv"][64][0]
    assert configs.launch_configs("dk", 128, 4, hopper)[0] == configs._SM90_FP32["dkdv"][128][0]
    assert configs.split_dkdv(256, 2, hopper) and configs.split_dkdv(192, 2, hopper)
    assert not (configs.split_dkdv(128, 2, hopper) or configs.split_dkdv(256, 4, hopper)
                or configs.split_dkdv(256, 2, (8, 0)) or configs.split_dkdv(256, 2, None))


@pytest.mark.parametrize("seqlen, causal, window, expected", [
    (256, True, (-1, -1), "fwd_causal_short"), (256, False, (-1, -1), "fwd_short"),
    (256, False, (16, 0), "fwd_window"), (4200, True, (-1, -1), "fwd_causal"), (8192, False, (-1, -1), "fwd")])
def test_forward_launch_names(monkeypatch, seqlen, causal, window, expected):
    from flashtile.backends.triton.launch import attention as launch_attention
    from flashtile.ops import attention as ops

    names = []
    monkeypatch.setattr(launch_attention, "launch_kernel", lambda name, *args, **kwargs: names.append(name))
    monkeypatch.setattr(launch_attention, "plan_key", lambda *args: None)  # nothing launched: nothing to plan
    # causal rows see seqlen / 2 keys on average: "_short" below 2k; full attention below 8k
    q = torch.randn(1, seqlen, 1, 16)
    left, right = (-1, 0) if causal else window
    opts = ops.attn_options(q, q, None, None, None, 0.25, 0, left, right, 0.0, 0.0, False)
    launch_attention.attention_forward(q, q, q, opts)
    assert names == [expected]


def test_fp32_dot_precision(monkeypatch):
    from flashtile.backends.triton.launch import device as launch_device

    monkeypatch.delenv("FLASHTILE_FP32_DOT", raising=False)
    cpu = torch.device("cpu")
    assert launch_device.dot_precision(torch.bfloat16, cpu) == "ieee"
    assert launch_device.dot_precision(torch.float32, cpu) == "ieee"  # no tensor cores here
    # on a tensor-core GPU: three TF32 products, or TF32 when PyTorch allows it
    monkeypatch.setattr(launch_device, "ASSUMED_CAPABILITY", (9, 0))
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert launch_device.dot_precision(torch.float32, cpu) == "tf32x3"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert launch_device.dot_precision(torch.float32, cpu) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    monkeypatch.setenv("FLASHTILE_FP32_DOT", "ieee")
    assert launch_device.dot_precision(torch.float32, cpu) == "ieee"
    monkeypatch.setenv("FLASHTILE_FP32_DOT", "fast")
    with pytest.raises(ValueError, match="FLASHTILE_FP32_DOT"):
        launch_device.dot_precision(torch.float32, cpu)


HALVES_CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(40, 7)),
    "softcap_alibi": dict(softcap=5.0, alibi=True),
}


@pytest.mark.parametrize("case", list(HALVES_CASES), ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_two_halves(monkeypatch, case, dtype, backward):
    # the forward's query block as two halves (LaunchConfig.halves, the Hopper table's choice
    # at head dims 64 and 128), alone or with the gradients from its output and LSE: ragged
    # lengths so that the second half, or both, run past the rows
    from flashtile.backends.triton.launch.table import LaunchConfig

    kw = dict(HALVES_CASES[case])
    force_forward_config(monkeypatch, LaunchConfig(64, 32, 4, 1, halves=True))
    q = torch.randn(2, 77, 4, 40, dtype=dtype)
    k = torch.randn(2, 113, 2, 40, dtype=dtype)
    v = torch.randn(2, 113, 2, 40, dtype=dtype)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(4) * 0.3
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, **kw), q, k, v, backward=backward, **kw)


@triton.jit
def _order_kernel(Out, seqlen, tail_bh, BLOCK: tl.constexpr, HEAVY_LAST: tl.constexpr):
    blk, bh = program_tile(seqlen, BLOCK, HEAVY_LAST, tail_bh)
    tl.store(Out + 2 * tl.program_id(0), blk)
    tl.store(Out + 2 * tl.program_id(0) + 1, bh)


@pytest.mark.parametrize("num_blocks, num_bh, tail_bh", [(4, 6, 0), (4, 6, 2), (3, 5, 5), (1, 3, 3), (5, 1, 1)])
@pytest.mark.parametrize("heavy_last", [False, True])
def test_program_tile_order(num_blocks, num_bh, tail_bh, heavy_last):
    """Every (block, head) pair gets exactly one program; the first heads go head by
    head, the last ``tail_bh`` heads block by block, heaviest block first."""
    out = torch.full((num_blocks * num_bh, 2), -1, dtype=torch.int32)
    _order_kernel[(num_blocks * num_bh,)](out, num_blocks * 16 - 3, tail_bh, BLOCK=16, HEAVY_LAST=heavy_last)
    pairs = [tuple(p) for p in out.tolist()]
    assert sorted(pairs) == [(blk, bh) for blk in range(num_blocks) for bh in range(num_bh)]
    head_major = (num_bh - tail_bh) * num_blocks
    heavy = (lambda blk: num_blocks - 1 - blk) if heavy_last else (lambda blk: blk)
    assert [bh for _, bh in pairs[:head_major]] == sorted(bh for _, bh in pairs[:head_major])
    assert [heavy(blk) for blk, _ in pairs[head_major:]] == sorted(heavy(blk) for blk, _ in pairs[head_major:])
    assert {bh for _, bh in pairs[head_major:]} == set(range(num_bh - tail_bh, num_bh))


SPLIT_CASES = {
    "causal_gqa": dict(causal=True),
    "window": dict(window_size=(40, 7)),
    "softcap_alibi": dict(softcap=5.0, alibi=True),
    "dropout": dict(dropout_p=0.3),
    "bias_grad": dict(bias=True),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES), ids=str)
def test_backward_in_two_launches(monkeypatch, case):
    # dV and dK each in a launch of its own (the dK/dV kernel's PART switch, Hopper's choice at
    # head dim 256): the same gradients as the joint launch, and the reference's where it has one
    from flashtile import scaled_dot_product_attention

    kw = dict(SPLIT_CASES[case])
    q = torch.randn(2, 77, 4, 40, dtype=torch.bfloat16)
    k = torch.randn(2, 113, 2, 40, dtype=torch.bfloat16)
    v = torch.randn(2, 113, 2, 40, dtype=torch.bfloat16)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(4) * 0.3
    bias = torch.randn(1, 4, 77, 113, dtype=torch.bfloat16) if kw.pop("bias", False) else None
    dout = torch.randn_like(q)

    def run(q, k, v, bias=None):
        if bias is not None:
            return scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                attn_mask=bias, enable_gqa=True).transpose(1, 2)
        torch.manual_seed(7)  # the same dropout mask in every call
        return flash_attn_func(q, k, v, **kw)

    grads = {}
    for split in ("0", "1"):
        set_switch(monkeypatch, "FLASHTILE_BWD_SPLIT", split)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([bias.clone().requires_grad_()] if bias is not None
                                                                    else [])
        run(*leaves).backward(dout)
        grads[split] = [t.grad for t in leaves]
    for name, joint, apart in zip("q k v bias".split(), grads["0"], grads["1"]):
        torch.testing.assert_close(apart, joint, rtol=0, atol=0, msg=f"d{name}")
    if "dropout_p" not in kw:
        check_attention(run, q, k, v, bias=None if bias is None else bias.requires_grad_(), **kw)


# --- on a CUDA GPU with the compiled kernels (marker ``gpu``) ---------------------------

GPU_HEAD_DIMS = [32, 59, 64, 96, 128, 192, 256]


GPU_SEQLENS = [(1, 4096), (4096, 4096), (1000, 3001), (2048, 512), (113, 203)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", GPU_HEAD_DIMS)
@pytest.mark.parametrize("seqlens", GPU_SEQLENS, ids=str)
def test_flash_attn_gpu(dtype, causal, head_dim, seqlens):
    seqlen_q, seqlen_k = seqlens
    h, hk = 4, 2
    q = torch.randn(2, seqlen_q, h, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(2, seqlen_k, hk, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(2, seqlen_k, hk, head_dim, device="cuda", dtype=dtype)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, causal=causal)


@pytest.mark.gpu
def test_deterministic_backward_gpu():
    q, k, v = (torch.randn(2, 2048, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
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


@pytest.mark.gpu
def test_unaligned_strides_take_the_pointer_path_gpu():
    # head dim 59 gives rows of 118 bytes: no tensor descriptors, the plain loads must serve
    q, k, v = (torch.randn(2, 777, 4, 59, device="cuda", dtype=torch.float16) for _ in range(3))
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=True), q, k, v, causal=True)


@pytest.mark.gpu
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


@pytest.mark.gpu
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


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_causal_longest_first_grid_gpu(head_dim):
    """Enough (batch, head) pairs that the causal grids have both sections: heads
    issued one after another, then the last waves block by block (program_tile)."""
    from flashtile.backends.triton.launch import device as launch_device

    q, k, v = (torch.randn(4, 1536, 24, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert 0 < launch_device.tail_heads(1536 // 128, 4 * 24, True, q.device) < 4 * 24
    assert 0 < launch_device.tail_heads(1536 // 64, 4 * 24, True, q.device) < 4 * 24
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=True), q, k, v, causal=True)

