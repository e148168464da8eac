"""flash_attn_with_kvcache and KVCache: attention against a contiguous or paged
cache, new keys appended in place, rotary embeddings, split-KV merging."""

import math

import pytest
import torch
from helpers import check_out_lse, rounding_floor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashtile
from flashtile import KVCache, flash_attn_func, flash_attn_with_kvcache, merge_attention_states
from flashtile.testing import attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rotary_ref(x, angles, positions, interleaved):
    """Rotary embedding through complex multiplication, in fp64: x (b, s, h, d),
    angles (seqlen_ro, r/2), positions (b, s)."""
    half = angles.shape[1]
    xr = x[..., :2 * half].double()
    if interleaved:
        z = torch.complex(xr[..., 0::2], xr[..., 1::2])
    else:
        z = torch.complex(xr[..., :half], xr[..., half:])
    z = z * torch.polar(torch.ones_like(angles.double()), angles.double())[positions][:, :, None, :]
    rot = torch.stack([z.real, z.imag], -1).flatten(-2) if interleaved else torch.cat([z.real, z.imag], -1)
    return torch.cat([rot.to(x.dtype), x[..., 2 * half:]], -1)


class Case:
    """Random cache, lengths and new tokens; the expected cache after the append and
    the reference attention of every sequence over its keys."""

    def __init__(self, *, batch=2, seqlen_q=1, nheads=8, nheads_k=2, head_dim=64, capacity=200, page_size=None,
                 seqlen_new=0, dtype=torch.float32, rotary=None, leftpad=False, batch_idx=False, alibi=None,
                 lengths=None, device=DEVICE):
        self.dtype, self.page_size = dtype, page_size
        opts = dict(device=device, dtype=dtype)
        self.q = torch.randn(batch, seqlen_q, nheads, head_dim, **opts)
        lengths = lengths or torch.randint(0, capacity - seqlen_new + 1, (batch,)).tolist()
        self.cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
        self.k_new = torch.randn(batch, seqlen_new, nheads_k, head_dim, **opts) if seqlen_new else None
        self.v_new = torch.randn_like(self.k_new) if seqlen_new else None
        batch_cache = batch + 2 if batch_idx else batch
        # logical caches (batch_cache, capacity, nheads_k, d); the paged one is a shuffled view of them
        self.k_logical = torch.randn(batch_cache, capacity, nheads_k, head_dim, **opts)
        self.v_logical = torch.randn_like(self.k_logical)
        self.batch_idx = torch.randperm(batch_cache, device=device)[:batch].int() if batch_idx else None
        rows = self.batch_idx.long() if batch_idx else torch.arange(batch, device=device)
        if page_size is None:
            self.k_cache, self.v_cache, self.block_table = self.k_logical.clone(), self.v_logical.clone(), None
        else:
            pages_per_seq = math.ceil(capacity / page_size)
            num_pages = batch_cache * pages_per_seq + 3
            order = torch.randperm(num_pages, device=device)[:batch_cache * pages_per_seq]
            self.block_table = order.reshape(batch_cache, pages_per_seq).int()
            padded = torch.zeros(batch_cache, pages_per_seq * page_size, nheads_k, head_dim, **opts)
            self.k_cache = torch.randn(num_pages, page_size, nheads_k, head_dim, **opts)
            self.v_cache = torch.randn_like(self.k_cache)
            for cache, logical in ((self.k_cache, self.k_logical), (self.v_cache, self.v_logical)):
                padded[:, :capacity] = logical
                cache[order.long()] = padded.reshape(-1, page_size, nheads_k, head_dim)
        self.leftpad = None
        if leftpad:
            self.leftpad = torch.tensor([torch.randint(0, n + seqlen_new + 1, ()).item() for n in lengths],
                                        dtype=torch.int32, device=device)
        self.alibi = None
        if alibi == "per_head":
            self.alibi = torch.rand(nheads, device=device)
        elif alibi == "per_batch":
            self.alibi = torch.rand(batch, nheads, device=device)
        self.rotary = rotary
        if rotary:
            rotary_dim = head_dim // 2 if head_dim % 4 == 0 else head_dim - 1 - (head_dim - 1) % 2
            self.angles = torch.rand(capacity + seqlen_q, rotary_dim // 2, device=device, dtype=torch.float64) * 6.3
            self.cos, self.sin = self.angles.cos().to(dtype), self.angles.sin().to(dtype)
        # the expected logical cache of each sequence after the append
        self.expected_k = self.k_logical[rows].clone()
        self.expected_v = self.v_logical[rows].clone()
        self.q_ref = self.q
        positions = self.cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=device)[None, :]
        if seqlen_new:
            k_new = self.k_new
            if rotary:
                k_new = rotary_ref(k_new, self.angles, positions, rotary == "interleaved")
            for b in range(batch):
                self.expected_k[b, lengths[b]:lengths[b] + seqlen_new] = k_new[b]
                self.expected_v[b, lengths[b]:lengths[b] + seqlen_new] = self.v_new[b]
        self.lengths = [n + seqlen_new for n in lengths]

    def kwargs(self, **extra):
        args = dict(cache_seqlens=self.cache_seqlens, cache_batch_idx=self.batch_idx, cache_leftpad=self.leftpad,
                    block_table=self.block_table, alibi_slopes=self.alibi)
        if self.rotary:
            args.update(rotary_cos=self.cos, rotary_sin=self.sin, rotary_interleaved=self.rotary == "interleaved")
        return args | extra

    def run(self, **extra):
        return flash_attn_with_kvcache(self.q, self.k_cache, self.v_cache, self.k_new, self.v_new,
                                       **self.kwargs(**extra))

    def reference(self, causal=False, window_size=(-1, -1), softcap=0.0, **ref_kwargs):
        """(out, lse) per sequence from attention_ref over keys [leftpad, length)."""
        outs, lses = [], []
        seqlen_q = self.q.shape[1]
        local = causal or window_size != (-1, -1)
        for b, length in enumerate(self.lengths):
            first = 0 if self.leftpad is None else int(self.leftpad[b])
            q = self.q[b:b + 1]
            if self.rotary:
                # the rotation itself is checked against rotary_ref (fp64) in check_cache and
                # test_apply_rotary_emb_matches_complex_rotation; here the attention sees the
                # same rounded inputs as the kernel
                steps = int(self.cache_seqlens[b]) + torch.arange(seqlen_q, device=q.device) * int(local)
                q = flashtile.ops.rotary.rotate_torch(q, self.cos, self.sin, steps[None, :], self.rotary == "interleaved")
            alibi = None
            if self.alibi is not None:
                alibi = self.alibi[b] if self.alibi.dim() == 2 else self.alibi
            k = self.stored(self.k_cache, b)[None, first:length]
            v = self.stored(self.v_cache, b)[None, first:length]
            out, lse = attention_ref(q, k, v, causal=causal, window_size=window_size, softcap=softcap,
                                     alibi_slopes=alibi, return_lse=True, **ref_kwargs)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)

    def stored(self, cache, b):
        """What the cache holds for sequence b, (length, nheads_k, d)."""
        return flashtile.ops.decode.cache_rows(cache, b, self.lengths[b], self.batch_idx, self.block_table)

    def check_cache(self):
        """The cache holds the old keys and the appended ones (rotated in fp64, up to one
        rounding step), nothing else changed."""
        atol = rounding_floor(self.expected_k, self.dtype) if self.rotary else 0.0
        for b in range(self.q.shape[0]):
            length = self.lengths[b]
            torch.testing.assert_close(self.stored(self.k_cache, b), self.expected_k[b, :length], atol=atol, rtol=0)
            assert torch.equal(self.stored(self.v_cache, b), self.expected_v[b, :length])

    def check(self, out, lse=None, **options):
        if self.k_new is not None:
            self.check_cache()
        assert out.shape == self.q.shape and out.dtype == self.q.dtype
        ref, ref_lse = self.reference(compute_dtype=torch.float64, **options)
        low, low_lse = self.reference(upcast=False, **options)
        check_out_lse(out, lse, ref, ref_lse, low, low_lse, self.dtype)


LAYOUTS = [None, 16, 64, 256]


@pytest.mark.parametrize("rotary,num_splits", [(None, 1), ("interleaved", 0), ("halves", 3)])
@pytest.mark.parametrize("nheads,nheads_k", [(32, 8), (8, 1)], ids=["gqa32_8", "mqa"])
@pytest.mark.parametrize("seqlen_q", [1, 7])
@pytest.mark.parametrize("page_size", LAYOUTS, ids=lambda p: "contiguous" if p is None else f"page{p}")
def test_cache_append_rotary_splits(page_size, seqlen_q, nheads, nheads_k, rotary, num_splits):
    causal = seqlen_q > 1
    case = Case(seqlen_q=seqlen_q, nheads=nheads, nheads_k=nheads_k, head_dim=32, capacity=300,
                page_size=page_size, seqlen_new=seqlen_q, rotary=rotary)
    out, lse = case.run(causal=causal, num_splits=num_splits, return_softmax_lse=True)
    case.check(out, lse, causal=causal)


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("options", [
    dict(window_size=(40, 0)),
    dict(causal=True, softcap=3.0, alibi="per_head"),
    dict(window_size=(25, 3), alibi="per_batch", leftpad=True),
    dict(causal=True, leftpad=True, batch_idx=True),
], ids=["window", "softcap_alibi", "window_alibi_leftpad", "leftpad_batch_idx"])
def test_options(page_size, options):
    options = dict(options)
    case = Case(batch=3, seqlen_q=5, nheads=6, nheads_k=2, head_dim=48, capacity=160, page_size=page_size,
                seqlen_new=2, leftpad=options.pop("leftpad", False), batch_idx=options.pop("batch_idx", False),
                alibi=options.pop("alibi", None))
    for num_splits in (1, 4):
        k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
        out, lse = case.run(num_splits=num_splits, return_softmax_lse=True, **options)
        case.check(out, lse, **options)
        case.k_cache.copy_(k_cache), case.v_cache.copy_(v_cache)  # the same append again for the next split count


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [59, 128])
def test_dtypes_and_head_dims(dtype, head_dim):
    case = Case(seqlen_q=2, nheads=4, nheads_k=2, head_dim=head_dim, capacity=130, page_size=32, seqlen_new=1,
                dtype=dtype, rotary="halves")
    out = case.run(causal=True, num_splits=2)
    case.check(out, causal=True)


def test_rows_that_see_no_key():
    # sequence 0 has an empty cache; in sequence 1 (2 keys, 3 causal queries) query 0 sees nothing
    case = Case(batch=2, seqlen_q=3, capacity=64, lengths=[0, 2])
    out, lse = case.run(causal=True, return_softmax_lse=True, num_splits=3)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0])) and torch.isneginf(lse[1, :, 0]).all()
    case.check(out, lse, causal=True)


@pytest.mark.parametrize("num_splits", [4, 8, 16], ids=["merged", "merged_8", "combine_kernel"])
def test_split_merges(num_splits, monkeypatch):
    """The split kernel's last program of a block merges the splits of its rows; past
    MERGE_MAX_VALUES the combine kernel does. The merge counters are left zero for the
    next call (here a replay of the launch plan)."""
    from flashtile.backends.triton.launch import decode
    from flashtile.backends.triton.launch import plans as launch_plans
    monkeypatch.setattr(decode, "MERGE_MAX_VALUES", 8 * 8 * 64)  # lowered so that few splits reach each case
    launch_plans.clear_caches()
    case = Case(batch=2, seqlen_q=3, nheads=4, nheads_k=2, head_dim=64, capacity=16 * 32, page_size=16,
                lengths=[16 * 32 - 5, 100])
    for _ in range(2):
        out, lse = case.run(causal=True, num_splits=num_splits, return_softmax_lse=True)
        case.check(out, lse, causal=True)
    assert all(int(reserve.count_nonzero()) == 0 for reserve, _ in decode._reserves.values())
    launch_plans.clear_caches()


def test_merging_two_parts_of_the_cache():
    """Attention over keys [0, m) merged with attention over [m, n) (leftpad = m) is attention over [0, n)."""
    case = Case(batch=2, seqlen_q=4, nheads=4, nheads_k=2, capacity=150, page_size=16, lengths=[150, 97])
    out, lse = case.run(return_softmax_lse=True)
    middle = torch.tensor([61, 30], dtype=torch.int32, device=DEVICE)
    part_a = flash_attn_with_kvcache(case.q, case.k_cache, case.v_cache, cache_seqlens=middle,
                                     block_table=case.block_table, return_softmax_lse=True)
    part_b = flash_attn_with_kvcache(case.q, case.k_cache, case.v_cache, cache_seqlens=case.cache_seqlens,
                                     cache_leftpad=middle, block_table=case.block_table, return_softmax_lse=True)
    merged, merged_lse = merge_attention_states(*part_a, *part_b)
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_lse, lse, atol=1e-5, rtol=1e-5)


def test_apply_rotary_emb_matches_complex_rotation():
    x = torch.randn(2, 5, 3, 20, dtype=torch.float64)
    angles = torch.rand(12, 8, dtype=torch.float64)
    offsets = torch.tensor([0, 4])
    positions = offsets[:, None] + torch.arange(5)[None, :]
    for interleaved in (True, False):
        got = flashtile.apply_rotary_emb(x, angles.cos(), angles.sin(), interleaved, seqlen_offsets=offsets)
        torch.testing.assert_close(got, rotary_ref(x, angles, positions, interleaved))
    with pytest.raises(ValueError, match="position"):
        flashtile.apply_rotary_emb(x, angles.cos(), angles.sin(), seqlen_offsets=8)


@pytest.mark.parametrize("page_size", [None, 16])
def test_kvcache_helper_prefill_then_decode(page_size):
    """Prefill and decoding steps through KVCache give causal attention over the whole sequence."""
    batch, nheads, nheads_k, d, steps = 2, 4, 2, 32, 3
    cache = KVCache(batch, 64, nheads_k, d, page_size=page_size, dtype=torch.float32, device=DEVICE)
    q = torch.randn(batch, 20 + steps, nheads, d, device=DEVICE)
    k = torch.randn(batch, 20 + steps, nheads_k, d, device=DEVICE)
    v = torch.randn_like(k)
    outs = [cache.attend(q[:, :20], k[:, :20], v[:, :20], causal=True)]
    for t in range(20, 20 + steps):
        outs.append(cache.attend(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], causal=True))
    ref = flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-5, rtol=1e-5)
    assert cache.lengths == [20 + steps] * batch and cache.cache_seqlens.tolist() == cache.lengths
    keys, values = cache.gather()
    assert torch.equal(keys, k) and torch.equal(values, v)
    cache.reset(0)
    cache.append(k[:, :5], v[:, :5])
    assert cache.lengths == [5, 28]
    with pytest.raises(ValueError, match="does not fit"):
        cache.append(torch.randn(batch, 40, nheads_k, d, device=DEVICE), torch.randn(batch, 40, nheads_k, d, device=DEVICE))


def test_kvcache_helper_runs_out_of_pages():
    cache = KVCache(2, 64, 1, 16, page_size=16, num_pages=5, dtype=torch.float32, device=DEVICE)
    kv = torch.randn(2, 40, 1, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.append(kv, kv)


def test_tiled_cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = Case(batch=3, seqlen_q=3, nheads=4, nheads_k=2, capacity=90, page_size=16, seqlen_new=3,
                rotary="interleaved", leftpad=True, alibi="per_head", device="cpu")
    out, lse = case.run(causal=True, softcap=4.0, return_softmax_lse=True)
    case.check(out, lse, causal=True, softcap=4.0)


def test_compile_fullgraph_decode_step():
    case = Case(batch=2, seqlen_q=1, nheads=4, nheads_k=2, head_dim=16, capacity=40, page_size=16, seqlen_new=1,
                rotary="halves")

    def step(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cos, sin):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens=cache_seqlens,
                                       block_table=block_table, rotary_interleaved=False) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, case.cache_seqlens,
                   case.block_table, case.cos, case.sin)
    case.check(out / 2.0)
    args = (case.q, case.k_cache, case.v_cache, case.cache_seqlens, None, case.block_table, None, None, 1, 0.25,
            -1, -1, 0.0, 2)
    torch.library.opcheck(torch.ops.flashtile.attn_decode.default, args)


def test_bad_arguments():
    q = torch.randn(2, 1, 4, 16)
    cache = torch.randn(2, 32, 2, 16)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens.float())
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens[:1])
    with pytest.raises(ValueError, match="more than the cache holds"):
        flash_attn_with_kvcache(q, cache, cache, torch.randn(2, 30, 2, 16), torch.randn(2, 30, 2, 16),
                                cache_seqlens=lens)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        flash_attn_with_kvcache(torch.randn(2, 1, 3, 16), cache, cache, cache_seqlens=lens)
    with pytest.raises(ValueError, match="pass both k and v"):
        flash_attn_with_kvcache(q, cache, cache, k=torch.randn(2, 1, 2, 16), cache_seqlens=lens)
    with pytest.raises(ValueError, match="cache_seqlens is needed"):
        flash_attn_with_kvcache(q, cache, cache, torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16))
    with pytest.raises(ValueError, match="block_table names page"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens,
                                block_table=torch.tensor([[0], [7]], dtype=torch.int32))
    with pytest.raises(TypeError, match="block_table must be int32"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, block_table=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="cache_batch_idx must be < 2"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens,
                                cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="rotary_cos/rotary_sin have 4 positions"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, rotary_cos=torch.ones(4, 4),
                                rotary_sin=torch.ones(4, 4))
    with pytest.raises(ValueError, match="num_splits"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, num_splits=-1)
    with pytest.raises(TypeError, match="dtype"):
        flash_attn_with_kvcache(q, cache.half(), cache.half(), cache_seqlens=lens)
    with pytest.raises(ValueError, match="cache_leftpad"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens,
                                cache_leftpad=torch.tensor([4, 0], dtype=torch.int32))


# --- on the GPU: long caches, every layout ------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("page_size", LAYOUTS, ids=lambda p: "contiguous" if p is None else f"page{p}")
@pytest.mark.parametrize("seqlen_q,num_splits", [(1, 0), (1, 1), (7, 0), (64, 0)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_decode_gpu(dtype, page_size, seqlen_q, num_splits, head_dim):
    case = Case(batch=3, seqlen_q=seqlen_q, nheads=32, nheads_k=8, head_dim=head_dim, capacity=5000,
                page_size=page_size, seqlen_new=seqlen_q, dtype=dtype, rotary="halves" if seqlen_q > 1 else None,
                leftpad=seqlen_q == 7)
    out, lse = case.run(causal=True, num_splits=num_splits, return_softmax_lse=True)
    case.check(out, lse, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 16], ids=lambda p: "contiguous" if p is None else f"page{p}")
@pytest.mark.parametrize("seqlen_q,num_splits", [(1, 0), (1, 37), (9, 5), (1, 100)])
def test_decode_gpu_ragged_splits(page_size, seqlen_q, num_splits):
    # one long and one short sequence: most splits of the short one see no key; repeated
    # calls replay the launch plan. 100 splits: merged by the combine kernel
    case = Case(batch=2, seqlen_q=seqlen_q, nheads=32, nheads_k=8, head_dim=128, capacity=20000,
                page_size=page_size, dtype=torch.bfloat16, lengths=[19000, 777])
    for _ in range(3):
        out, lse = case.run(causal=True, num_splits=num_splits, return_softmax_lse=True)
        case.check(out, lse, causal=True)


@pytest.mark.gpu
def test_decode_gpu_graphs_and_streams():
    """Split decoding replayed from a CUDA graph, and run on two streams at once (each
    stream has its own merge counters)."""
    cases = [Case(batch=1, seqlen_q=1, nheads=32, nheads_k=8, head_dim=128, capacity=16384, dtype=torch.bfloat16,
                  lengths=[16000 - 1000 * i]) for i in range(2)]
    for case in cases:
        case.run(num_splits=16)  # compile and plan outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = cases[0].run(num_splits=16)
    for _ in range(3):
        graph_out.zero_()
        graph.replay()
        cases[0].check(graph_out)
    streams = [torch.cuda.Stream() for _ in cases]
    outs = [None] * len(cases)
    torch.cuda.synchronize()
    for _ in range(20):
        for i, (case, stream) in enumerate(zip(cases, streams)):
            with torch.cuda.stream(stream):
                outs[i] = case.run(num_splits=16)
    torch.cuda.synchronize()
    for case, out in zip(cases, outs):
        case.check(out)


@pytest.mark.gpu
def test_decode_gpu_compiled_with_cuda_graphs():
    """Split decoding under torch.compile with CUDA graph trees (mode "reduce-overhead"),
    whose pool may hold no memory the trees do not know about: replays agree with the
    reference."""
    case = Case(batch=1, seqlen_q=1, nheads=32, nheads_k=8, head_dim=128, capacity=16384, dtype=torch.bfloat16,
                lengths=[16000])

    def step(q):
        return flash_attn_with_kvcache(q, case.k_cache, case.v_cache, cache_seqlens=case.cache_seqlens,
                                       num_splits=16)

    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(4):
        case.check(compiled(case.q).clone())


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [None, 16], ids=lambda p: "contiguous" if p is None else f"page{p}")
@pytest.mark.parametrize("seqlen_q,num_splits", [(1, 0), (7, 1)])
def test_decode_gpu_fp32(page_size, seqlen_q, num_splits):
    # fp32 dot products run as three TF32 products on tensor-core GPUs: still within the accuracy rule
    case = Case(batch=3, seqlen_q=seqlen_q, nheads=32, nheads_k=8, head_dim=128, capacity=5000,
                page_size=page_size, seqlen_new=seqlen_q, dtype=torch.float32)
    out, lse = case.run(causal=True, num_splits=num_splits, return_softmax_lse=True)
    case.check(out, lse, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(window_size=(700, 0), softcap=20.0), dict(alibi="per_batch", causal=True)])
def test_decode_gpu_options_mqa(options):
    options = dict(options)
    case = Case(batch=4, seqlen_q=3, nheads=16, nheads_k=1, head_dim=128, capacity=9000, page_size=16,
                seqlen_new=3, dtype=torch.bfloat16, alibi=options.pop("alibi", None), batch_idx=True)
    out = case.run(**options)
    case.check(out, **options)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_index_statistics_kernel_matches_torch(monkeypatch, data):
    # the one-launch statistics behind the value checks against the PyTorch reductions
    # of the CPU path, on index tensors with bad entries (negative, too large) and
    # block-table entries that no sequence uses (which must not count)
    from flashtile.backends.triton.launch import index_stats as kvcache

    batch = data.draw(st.integers(1, 5))
    page_size = data.draw(st.sampled_from([0, 1, 16]))
    max_pages = data.draw(st.integers(1, 9))
    ints = st.integers(-3, 40)
    seqlens = torch.tensor(data.draw(st.lists(ints, min_size=batch, max_size=batch)), dtype=torch.int32)
    leftpad = data.draw(st.none() | st.just(torch.tensor(data.draw(st.lists(ints, min_size=batch, max_size=batch)),
                                                          dtype=torch.int32)))
    batch_idx = data.draw(st.none() | st.just(torch.randint(-2, 9, (batch,), dtype=torch.int32)))
    table = None if not page_size else torch.randint(-5, 30, (batch, max_pages + 3), dtype=torch.int32)[:, :max_pages]
    seqlen_new = data.draw(st.integers(0, 3))
    args = (seqlens, seqlen_new, leftpad, batch_idx, table, page_size)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    expected = kvcache.index_stats(*args)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kvcache.index_stats(*args) == expected


def test_kvcache_names_its_own_dtype():
    cache = KVCache(1, 32, 2, 16)  # bf16 by default
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(TypeError, match="KVCache.attend's q is torch.float32.*cache holds torch.bfloat16"):
        cache.attend(q, q[:, :, :2], q[:, :, :2])
