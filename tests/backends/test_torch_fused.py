"""PyTorch's fused CPU kernel as flashtile's CPU backend (``backends/torch_fused.py``):
which calls it serves, and that those it serves in "masked" mode (windows, causal masks
of any alignment, boolean masks, varlen sequences; chunks of query rows with an additive
mask) are right, with the tiled path made unreachable."""

import pytest
import torch
from helpers import check_attention, cu, max_err

import flashtile
from flashtile.backends import torch_fused
from flashtile.ops import attention as ops_attention
from flashtile.ops.attention import attn_options
from flashtile.testing import attention_ref


@pytest.fixture
def fused_only(monkeypatch):
    """CPU tensors outside the interpreter, and the tiled path raising if it is taken."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def tiled(*args, **kwargs):
        raise AssertionError("the tiled path was taken")

    monkeypatch.setattr(ops_attention, "attention_tiled_forward", tiled)
    monkeypatch.setattr(ops_attention, "attention_tiled_backward", tiled)


def _mode(seqlen_q=64, seqlen_k=64, dtype=torch.float32, dv=32, bias=None, alibi=None, diag=0, window=(-1, -1),
          softcap=0.0, dropout=0.0, sinks=None, bias_grad=False):
    q = torch.randn(1, seqlen_q, 2, 32, dtype=dtype)
    k, v = torch.randn(1, seqlen_k, 2, 32, dtype=dtype), torch.randn(1, seqlen_k, 2, dv, dtype=dtype)
    opts = attn_options(q, k, bias, alibi, None, 0.2, diag, *window, softcap, dropout, False, sinks=sinks)
    return torch_fused.fused_mode(q, v, opts, bias_grad)


def test_which_calls_it_serves():
    assert _mode() == "plain"
    assert _mode(window=(-1, 0)) == "plain"  # causal, diagonal at the top-left corner
    assert _mode(seqlen_q=32, diag=32, window=(-1, 0)) == "masked"  # bottom-right
    assert _mode(window=(16, 0)) == "masked"
    assert _mode(window=(4, 4)) == "masked"
    assert _mode(bias=torch.rand(1, 1, 64, 64) > 0.5) == "masked"
    assert _mode(dtype=torch.bfloat16, window=(16, 0)) == "masked"
    assert _mode(bias=torch.randn(1, 1, 64, 64)) is None  # a float bias: the tiled path
    assert _mode(alibi=torch.rand(2)) is None
    assert _mode(softcap=5.0) is None
    assert _mode(dropout=0.1) is None
    assert _mode(sinks=torch.zeros(2)) is None
    assert _mode(dv=16) is None
    assert _mode(bias=torch.rand(1, 1, 64, 64) > 0.5, bias_grad=True) is None
    previous = flashtile.set_batch_invariant(True)
    try:
        assert _mode() is None
    finally:
        flashtile.set_batch_invariant(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [
    dict(seqlen_q=300, seqlen_k=517, causal=True),  # bottom-right, every row sees keys
    dict(seqlen_q=517, seqlen_k=300, causal=True),  # the first 217 rows see no key
    dict(seqlen_q=400, seqlen_k=400, window_size=(50, 7)),
    dict(seqlen_q=333, seqlen_k=700, causal=True, window_size=(20, -1)),
    dict(seqlen_q=200, seqlen_k=180, window_size=(0, 0)),  # a row past the last key sees nothing
], ids=str)
def test_masked_mode_matches_oracle(fused_only, monkeypatch, dtype, case):
    monkeypatch.setattr(torch_fused, "CHUNK_ROWS", 64)  # several chunks, some with no keys
    case = dict(case)
    seqlen_q, seqlen_k = case.pop("seqlen_q"), case.pop("seqlen_k")
    q = torch.randn(2, seqlen_q, 4, 48, dtype=dtype)
    k, v = (torch.randn(2, seqlen_k, 2, 48, dtype=dtype) for _ in range(2))
    check_attention(lambda q, k, v: flashtile.flash_attn_func(q, k, v, **case), q, k, v, **case)
    out, lse, _ = flashtile.flash_attn_func(q, k, v, return_attn_probs=True, **case)
    _, lse_ref = attention_ref(q, k, v, compute_dtype=torch.float64, return_lse=True, **case)
    assert torch.equal(lse.isfinite(), lse_ref.isfinite()), "rows without keys: LSE -inf"
    assert (out.transpose(1, 2)[~lse.isfinite()] == 0).all(), "rows without keys: zeros"
    finite = lse_ref.isfinite()
    assert max_err(lse[finite], lse_ref[finite]) <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_boolean_mask(fused_only, dtype):
    q = torch.randn(2, 150, 4, 32, dtype=dtype)
    k, v = (torch.randn(2, 170, 4, 32, dtype=dtype) for _ in range(2))
    mask = torch.rand(2, 1, 150, 170) > 0.4
    mask[:, :, 7] = False  # a row that sees nothing

    def fn(q, k, v, bias):
        out = flashtile.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     attn_mask=bias)
        return out.transpose(1, 2)

    check_attention(fn, q, k, v, bias=mask)


def test_sdpa_boolean_mask(fused_only):
    q, k, v = (torch.randn(2, 4, 130, 32, dtype=torch.float64).float() for _ in range(3))
    mask = torch.rand(1, 4, 130, 130) > 0.5
    out = flashtile.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert max_err(out, ref) <= 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_sequences(fused_only, causal):
    # each sequence one kernel call: plain where its lengths agree, else masked (bottom-right)
    lens_q, lens_k = [13, 0, 40, 7, 25, 30], [30, 12, 40, 0, 18, 30]
    q = torch.randn(sum(lens_q), 4, 32)
    k, v = (torch.randn(sum(lens_k), 2, 32) for _ in range(2))

    def fn(q, k, v):
        return flashtile.flash_attn_varlen_func(q[0], k[0], v[0], cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                                causal=causal)[None]

    def ref(q, k, v, **kw):
        cq, ck = cu(lens_q).tolist(), cu(lens_k).tolist()
        return torch.cat([attention_ref(q[:, cq[i]:cq[i + 1]], k[:, ck[i]:ck[i + 1]], v[:, ck[i]:ck[i + 1]],
                                        causal=causal, **kw) for i in range(len(lens_q))], 1)

    check_attention(fn, q[None], k[None], v[None], ref_fn=ref)
