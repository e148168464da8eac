"""FP8 (float8_e4m3fn) key/value caches: flash_attn_with_kvcache with k_descale /
v_descale, new keys and values quantised when appended, KVCache(dtype=float8_e4m3fn)
and its scales. The kernel's accuracy is measured against attention_ref in fp64 on
the dequantised cache (the fp8 rounding of the cache is part of the input); what
the rounding itself costs is measured against the unquantised cache."""

import math

import pytest
import torch
from helpers import check_out_lse, max_err, rounding_floor

import flashtile
from flashtile import KVCache, flash_attn_func, flash_attn_with_kvcache
from flashtile.ops.decode import cache_rows
from flashtile.testing import attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
E4M3_REL = 2.0 ** -4  # half the spacing of e4m3's 3 mantissa bits, relative
E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10  # half the spacing of its subnormals (multiples of 2**-9)


def quantize(x, descale):
    """What the cache must hold: ``x / descale`` (descale (batch, nheads_k)) in fp32,
    clamped to +-448, rounded by torch's own cast."""
    return (x.float() / descale[:, None, :, None]).clamp(-448.0, 448.0).to(FP8)


def descales_of(x):
    """amax / 448 per (sequence, kv head) of x (batch, seqlen, nheads_k, d)."""
    return (x.float().abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-6)


@pytest.fixture(params=["interpreter", "tiled"])
def path(request, monkeypatch):
    """CPU tensors run the Triton kernel under the interpreter, or the tiled path."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "interpreter" else "0")
    return request.param


class Fp8Case:
    """A random fp8 cache (the quantised image of real values whose magnitude varies
    per sequence and kv head) with its descales, lengths and new tokens."""

    def __init__(self, *, batch=2, seqlen_q=1, nheads=8, nheads_k=2, head_dim=32, capacity=150, page_size=None,
                 seqlen_new=0, dtype=torch.float32, lengths=None, batch_idx=False, leftpad=False, rotary=None,
                 device=DEVICE):
        self.dtype = dtype
        opts = dict(device=device, dtype=dtype)
        self.q = torch.randn(batch, seqlen_q, nheads, head_dim, **opts)
        lengths = lengths or torch.randint(0, capacity - seqlen_new + 1, (batch,)).tolist()
        self.cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
        spread = lambda: torch.rand(batch, 1, nheads_k, 1, device=device) * 4 + 0.25  # noqa: E731
        # the real (unquantised) keys and values of each sequence of the call, and its descales
        self.k_real = (torch.randn(batch, capacity, nheads_k, head_dim, device=device) * spread()).to(dtype)
        self.v_real = (torch.randn(batch, capacity, nheads_k, head_dim, device=device) * spread()).to(dtype)
        self.k_descale, self.v_descale = descales_of(self.k_real), descales_of(self.v_real)
        self.k_new = self.v_new = None
        if seqlen_new:
            self.k_new = (torch.randn(batch, seqlen_new, nheads_k, head_dim, device=device) * spread()).to(dtype)
            self.v_new = (torch.randn(batch, seqlen_new, nheads_k, head_dim, device=device) * spread()).to(dtype)
            self.k_new[0, 0, 0, 0] = 1000 * self.k_descale[0, 0]  # saturates at 448
            self.v_new[-1, -1, -1, -1] = -1000 * self.v_descale[-1, -1]
        stored_k, stored_v = quantize(self.k_real, self.k_descale), quantize(self.v_real, self.v_descale)
        batch_cache = batch + 2 if batch_idx else batch
        self.batch_idx = torch.randperm(batch_cache, device=device)[:batch].int() if batch_idx else None
        rows = self.batch_idx.long() if batch_idx else torch.arange(batch, device=device)
        # the logical caches (batch_cache, capacity, nheads_k, d): sequence b in row rows[b]
        k_logical = torch.randn(batch_cache, capacity, nheads_k, head_dim, device=device).to(FP8)
        v_logical = torch.randn(batch_cache, capacity, nheads_k, head_dim, device=device).to(FP8)
        k_logical[rows], v_logical[rows] = stored_k, stored_v
        self.block_table = None
        if page_size is None:
            self.k_cache, self.v_cache = k_logical, v_logical
        else:
            pages_per_seq = math.ceil(capacity / page_size)
            num_pages = batch_cache * pages_per_seq + 3
            order = torch.randperm(num_pages, device=device)[:batch_cache * pages_per_seq]
            self.block_table = order.reshape(batch_cache, pages_per_seq).int()
            self.k_cache = torch.randn(num_pages, page_size, nheads_k, head_dim, device=device).to(FP8)
            self.v_cache = torch.randn(num_pages, page_size, nheads_k, head_dim, device=device).to(FP8)
            padded = torch.zeros(batch_cache, pages_per_seq * page_size, nheads_k, head_dim, device=device).to(FP8)
            for cache, logical in ((self.k_cache, k_logical), (self.v_cache, v_logical)):
                padded[:, :capacity] = logical
                cache[order.long()] = padded.reshape(-1, page_size, nheads_k, head_dim)
        self.leftpad = None
        if leftpad:
            self.leftpad = torch.tensor([torch.randint(0, n + seqlen_new + 1, ()).item() for n in lengths],
                                        dtype=torch.int32, device=device)
        self.rotary = rotary
        if rotary:
            self.angles = torch.rand(capacity + seqlen_q, head_dim // 4, device=device, dtype=torch.float64) * 6.3
            self.cos, self.sin = self.angles.cos().to(dtype), self.angles.sin().to(dtype)
        self.old_lengths = lengths
        self.lengths = [n + seqlen_new for n in lengths]

    def kwargs(self, **extra):
        args = dict(cache_seqlens=self.cache_seqlens, cache_batch_idx=self.batch_idx, cache_leftpad=self.leftpad,
                    block_table=self.block_table, k_descale=self.k_descale, v_descale=self.v_descale)
        if self.rotary:
            args.update(rotary_cos=self.cos, rotary_sin=self.sin, rotary_interleaved=self.rotary == "interleaved")
        return args | extra

    def run(self, **extra):
        return flash_attn_with_kvcache(self.q, self.k_cache, self.v_cache, self.k_new, self.v_new,
                                       **self.kwargs(**extra))

    def stored(self, cache, b):
        """The fp8 rows of sequence b, (length, nheads_k, d)."""
        return cache_rows(cache, b, self.lengths[b], self.batch_idx, self.block_table)

    def dequantised(self, b, dtype=torch.float64):
        k = self.stored(self.k_cache, b).to(dtype) * self.k_descale[b].to(dtype)[None, :, None]
        v = self.stored(self.v_cache, b).to(dtype) * self.v_descale[b].to(dtype)[None, :, None]
        return k, v

    def check_cache(self):
        """The old fp8 rows are unchanged and the appended ones are the new keys and values
        quantised with the sequence's descales (rotated keys: within one fp8 step)."""
        new = self.k_new.shape[1]
        for b, old in enumerate(self.old_lengths):
            k, v = self.stored(self.k_cache, b), self.stored(self.v_cache, b)
            assert torch.equal(k[:old].view(torch.uint8), quantize(self.k_real[b:b + 1, :old],
                                                                     self.k_descale[b:b + 1])[0].view(torch.uint8))
            expected_v = quantize(self.v_new[b:b + 1], self.v_descale[b:b + 1])[0]
            assert torch.equal(v[old:old + new].view(torch.uint8), expected_v.view(torch.uint8))
            k_new = self.k_new[b:b + 1]
            if self.rotary:
                positions = (old + torch.arange(new, device=k_new.device))[None, :]
                k_new = flashtile.ops.rotary.rotate_torch(k_new, self.cos, self.sin, positions,
                                                          self.rotary == "interleaved")
                expected_k = quantize(k_new, self.k_descale[b:b + 1])[0].float()
                step = E4M3_REL * 2 * expected_k.abs() + 2 * E4M3_SUBNORMAL_HALF_STEP
                assert ((k[old:old + new].float() - expected_k).abs() <= step).all()
            else:
                expected_k = quantize(k_new, self.k_descale[b:b + 1])[0]
                assert torch.equal(k[old:old + new].view(torch.uint8), expected_k.view(torch.uint8))
        if not self.rotary:  # the large new key saturated (not NaN)
            assert float(self.stored(self.k_cache, 0)[self.old_lengths[0], 0, 0]) == 448.0

    def reference(self, dtype=torch.float64, upcast=True, **options):
        """(out, lse) per sequence from attention_ref on the dequantised cache (in ``dtype``)."""
        outs, lses = [], []
        seqlen_q = self.q.shape[1]
        local = options.get("causal", False) or options.get("window_size", (-1, -1)) != (-1, -1)
        for b, length in enumerate(self.lengths):
            first = 0 if self.leftpad is None else int(self.leftpad[b])
            q = self.q[b:b + 1]
            if self.rotary:
                steps = int(self.cache_seqlens[b]) + torch.arange(seqlen_q, device=q.device) * int(local)
                q = flashtile.ops.rotary.rotate_torch(q, self.cos, self.sin, steps[None, :],
                                                      self.rotary == "interleaved")
            k, v = self.dequantised(b, dtype)
            opts = dict(options)
            if opts.get("alibi_slopes") is not None and opts["alibi_slopes"].dim() == 2:
                opts["alibi_slopes"] = opts["alibi_slopes"][b]
            out, lse = attention_ref(q, k[None, first:length], v[None, first:length], return_lse=True,
                                     upcast=upcast, **({"compute_dtype": torch.float64} if upcast else {}), **opts)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)

    def check(self, out, lse=None, **options):
        """The accuracy rule, the attention of PyTorch in q's dtype on the dequantised cache
        (rounded to q's dtype) as the baseline."""
        if self.k_new is not None:
            self.check_cache()
        assert out.shape == self.q.shape and out.dtype == self.q.dtype
        ref, ref_lse = self.reference(**options)
        low, low_lse = self.reference(dtype=self.dtype, upcast=False, **options)
        check_out_lse(out, lse, ref, ref_lse, low, low_lse, self.dtype)


@pytest.mark.parametrize("seqlen_q,num_splits", [(1, 1), (1, 3), (4, 2)])
@pytest.mark.parametrize("page_size", [None, 16, 64], ids=lambda p: "contiguous" if p is None else f"page{p}")
def test_fp8_cache_append_splits(path, page_size, seqlen_q, num_splits):
    """GQA 8/2, ragged lengths, the new tokens appended quantised, 1 and several splits."""
    case = Fp8Case(seqlen_q=seqlen_q, page_size=page_size, seqlen_new=seqlen_q, lengths=[77, 113])
    causal = seqlen_q > 1
    out, lse = case.run(causal=causal, num_splits=num_splits, return_softmax_lse=True)
    case.check(out, lse, causal=causal)


@pytest.mark.parametrize("page_size", [None, 16], ids=lambda p: "contiguous" if p is None else f"page{p}")
@pytest.mark.parametrize("options", [
    dict(window_size=(30, 0)),
    dict(causal=True, softcap=3.0, alibi=True),
    dict(causal=True, leftpad=True, batch_idx=True),
    dict(sinks=True, window_size=(20, 2)),
], ids=["window", "softcap_alibi", "leftpad_batch_idx", "sinks_window"])
def test_fp8_options(path, page_size, options):
    options = dict(options)
    case = Fp8Case(batch=3, seqlen_q=3, nheads=6, nheads_k=2, head_dim=40, capacity=130, page_size=page_size,
                   seqlen_new=2, leftpad=options.pop("leftpad", False), batch_idx=options.pop("batch_idx", False))
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(3, 6, device=DEVICE)
    if options.pop("sinks", False):
        options["sinks"] = torch.randn(6, device=DEVICE)
    for num_splits in (1, 4):
        k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
        out, lse = case.run(num_splits=num_splits, return_softmax_lse=True, **options)
        case.check(out, lse, **options)
        case.k_cache.copy_(k_cache), case.v_cache.copy_(v_cache)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_fp8_cache_query_dtypes_rotary(path, dtype):
    """q and the new k, v in each dtype; the rotary embedding before the quantisation."""
    case = Fp8Case(seqlen_q=2, nheads=4, nheads_k=2, head_dim=48, capacity=100, page_size=32, seqlen_new=2,
                   dtype=dtype, rotary="halves")
    out, lse = case.run(causal=True, num_splits=2, return_softmax_lse=True)
    case.check(out, lse, causal=True)


def test_fp8_bf16_queries_of_any_magnitude(path):
    """bf16 queries against an fp8 cache compute in fp16 on the GPU kernel, each row scaled
    by a power of two: rows from 1e-30 to 1e30 (bf16's range, far beyond fp16's) keep the
    accuracy rule, and a NaN or Inf query row leaves the rows it shares a program with
    (the other heads of its GQA group) as they are."""
    case = Fp8Case(batch=2, seqlen_q=2, nheads=8, nheads_k=2, head_dim=40, capacity=90, lengths=[77, 60],
                   dtype=torch.bfloat16)
    scales = torch.tensor([1e-30, 1e-6, 3e-3, 1.0, 7.0, 300.0, 7e4, 1e30])
    case.q = (case.q.float() * scales[None, None, :, None]).bfloat16()
    out, lse = case.run(return_softmax_lse=True)
    case.check(out, lse)
    clean = out.clone()
    case.q[0, 0, 1] = float("nan")
    case.q[1, 1, 4, 3] = float("inf")
    out = case.run()
    assert out[0, 0, 1].isnan().all() and not out[1, 1, 4].isfinite().all()
    keep = torch.ones(out.shape[:3], dtype=torch.bool)
    keep[0, 0, 1] = keep[1, 1, 4] = False
    assert torch.equal(out[keep], clean[keep])


def test_fp8_rows_that_see_no_key(path):
    case = Fp8Case(batch=2, seqlen_q=3, capacity=64, lengths=[0, 2])
    out, lse = case.run(causal=True, return_softmax_lse=True, num_splits=3)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0])) and torch.isneginf(lse[1, :, 0]).all()
    case.check(out, lse, causal=True)


def test_fp8_paths_agree():
    """The interpreted kernel and the tiled path on the same fp8 cache."""
    case = Fp8Case(batch=2, seqlen_q=2, capacity=120, page_size=16, lengths=[119, 40])
    outs = []
    for interpret in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", interpret)
            outs.append(case.run(causal=True, num_splits=2, return_softmax_lse=True))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fp8_error_is_what_e4m3_rounding_implies(path, dtype):
    """Against the fp64 attention of the unquantised keys and values, the fp8 cache's
    error stays within the bound that e4m3's relative precision (2**-4, and half a
    subnormal step) implies, and exceeds the error of a cache in q's dtype.

    Bound, per output element: each value moves by ``dv_j <= 2**-4 |v_j| + 2**-10
    v_descale``; each score by ``|ds_j| <= eps_j = scale * sum_d |q_d| (2**-4 |k_jd| +
    2**-10 k_descale)``, so each probability by a factor ``p'_j / p_j`` within
    ``exp(+-(eps_j + E))``, ``E = max_j eps_j``. With ``o' - o = sum_j p'_j (v'_j - v_j) +
    sum_j (p'_j - p_j) (v_j - o)``: ``|o' - o| <= sum_j p_j exp(eps_j + E) dv_j + sum_j p_j
    (exp(eps_j + E) - 1) |v_j - o|``, plus the output's rounding to q's dtype.
    """
    batch, nheads, nheads_k, d, length = 2, 4, 2, 32, 200
    q = torch.randn(batch, 1, nheads, d, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, length, nheads_k, d, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, length, nheads_k, d, device=DEVICE, dtype=dtype)
    kd, vd = descales_of(k), descales_of(v)
    k8, v8 = quantize(k, kd), quantize(v, vd)
    out8 = flash_attn_with_kvcache(q, k8, v8, k_descale=kd, v_descale=vd, num_splits=2)
    out_plain = flash_attn_with_kvcache(q, k, v, num_splits=2)
    ref = attention_ref(q, k, v, compute_dtype=torch.float64)
    group = nheads // nheads_k
    qd = q.double()[:, 0]  # (b, h, d)
    kk, vv = (t.double().repeat_interleave(group, dim=2).transpose(1, 2) for t in (k, v))  # (b, h, L, d)
    kdh, vdh = (t.double().repeat_interleave(group, dim=1)[:, :, None, None] for t in (kd, vd))
    p = torch.softmax(torch.einsum("bhd,bhld->bhl", qd, kk) * d ** -0.5, -1)
    eps = d ** -0.5 * torch.einsum("bhd,bhld->bhl", qd.abs(), E4M3_REL * kk.abs() + E4M3_SUBNORMAL_HALF_STEP * kdh)
    grow = torch.exp(eps + eps.amax(-1, keepdim=True))  # (b, h, L)
    dv = E4M3_REL * vv.abs() + E4M3_SUBNORMAL_HALF_STEP * vdh
    o = torch.einsum("bhl,bhld->bhd", p, vv)
    bound = torch.einsum("bhl,bhld->bhd", p * grow, dv) + \
        torch.einsum("bhl,bhld->bhd", p * (grow - 1), (vv - o[:, :, None]).abs())
    bound = bound[:, None]  # (b, 1, h, d), out's layout
    err8 = (out8.double() - ref.double()).abs()
    floor = rounding_floor(ref, dtype)
    assert (err8 <= bound + floor).all(), f"fp8 error {err8.max():.3e} beyond the e4m3 bound"
    assert err8.max().item() > max_err(out_plain, ref), "the fp8 cache's error is not above a 16/32-bit cache's"
    # the observed error is of the order of the rounding, not vanishingly small
    assert err8.max().item() > 0.01 * bound.max().item()


def test_appended_values_saturate_and_round_to_nearest_even(path):
    """k / descale in fp32, clamped to +-448, rounded as torch's cast rounds (ties to even)."""
    batch, nheads_k, d = 1, 1, 16
    descale = torch.full((batch, nheads_k), 0.5, device=DEVICE)
    # ties between e4m3 neighbours (1.0625 between 1.0 and 1.125, 1.1875 between 1.125 and 1.25),
    # values beyond 448, negative ones, subnormals
    real = torch.tensor([1.0625, 1.1875, 500.0, -1e4, -3.3, 0.001, 2.0 ** -9 * 1.5, 0.0, 17.0, 255.0, 300.0, -0.7,
                         0.3, 6.0, 7.5, 1e-3], device=DEVICE) * 0.5
    k = real.reshape(1, 1, 1, d).expand(batch, 1, nheads_k, d).contiguous()
    q = torch.randn(batch, 1, 2, d, device=DEVICE)
    k_cache = torch.zeros(batch, 8, nheads_k, d, device=DEVICE).to(FP8)
    v_cache = torch.zeros_like(k_cache)
    flash_attn_with_kvcache(q, k_cache, v_cache, k, k, cache_seqlens=3, k_descale=descale, v_descale=descale)
    expected = quantize(k, descale)[0, 0]
    assert torch.equal(k_cache[0, 3].view(torch.uint8), expected.view(torch.uint8))
    values = k_cache[0, 3, 0].float()
    assert values[0] == 1.0 and values[1] == 1.25 and values[2] == 448.0 and values[3] == -448.0


@pytest.mark.parametrize("page_size", [None, 16])
def test_kvcache_fp8_scales_from_the_prefill(page_size):
    batch, nheads, nheads_k, d, steps = 2, 4, 2, 32, 3
    cache = KVCache(batch, 64, nheads_k, d, page_size=page_size, dtype=FP8, device=DEVICE)
    q = torch.randn(batch, 20 + steps, nheads, d, device=DEVICE)
    k = torch.randn(batch, 20 + steps, nheads_k, d, device=DEVICE) * torch.tensor([1.0, 5.0], device=DEVICE)[:, None]
    v = torch.randn_like(k)
    outs = [cache.attend(q[:, :20], k[:, :20], v[:, :20], causal=True)]
    torch.testing.assert_close(cache.k_descale, descales_of(k[:, :20]), rtol=0, atol=0)
    torch.testing.assert_close(cache.v_descale, descales_of(v[:, :20]), rtol=0, atol=0)
    k[0, 21, 0, 0] = 1000.0  # a later key beyond the prefill's range: saturates
    for t in range(20, 20 + steps):
        outs.append(cache.attend(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], causal=True))
    torch.testing.assert_close(cache.k_descale[:, :], descales_of(k[:, :20]), rtol=0, atol=0)  # kept
    keys, values = cache.gather()  # dequantised, fp32
    assert keys.dtype == torch.float32 and keys.shape == k.shape
    torch.testing.assert_close(keys, quantize(k, cache.k_descale).float() * cache.k_descale[:, None, :, None])
    torch.testing.assert_close(values, quantize(v, cache.v_descale).float() * cache.v_descale[:, None, :, None])
    assert keys[0, 21, 0, 0] == 448.0 * cache.k_descale[0, 0]
    # the steps attended to the dequantised keys and values
    ref = flash_attn_func(q, keys, values, causal=True)
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-5, rtol=1e-5)
    # a reset sequence takes new scales from its next append; the other keeps its own
    cache.reset(0)
    old = cache.k_descale.clone()
    k2 = torch.randn(batch, 5, nheads_k, d, device=DEVICE) * 9
    cache.append(k2, k2)
    assert torch.equal(cache.k_descale[0], descales_of(k2)[0]) and torch.equal(cache.k_descale[1], old[1])


def test_kvcache_fp8_fixed_scales():
    batch, nheads_k, d = 2, 2, 16
    per_head = torch.tensor([0.01, 0.02])
    cache = KVCache(batch, 32, nheads_k, d, dtype=FP8, device=DEVICE, k_scale=per_head, v_scale=0.05)
    assert torch.equal(cache.k_descale, per_head.expand(batch, nheads_k).to(DEVICE))
    assert torch.equal(cache.v_descale, torch.full((batch, nheads_k), 0.05, device=DEVICE))
    k = torch.randn(batch, 6, nheads_k, d, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k) * 100  # beyond 448 * 0.05 = 22.4: saturates
    out = cache.attend(torch.randn(batch, 6, 4, d, device=DEVICE, dtype=torch.bfloat16), k, v, causal=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(cache.k_descale, per_head.expand(batch, nheads_k).to(DEVICE))  # not recalibrated
    keys, values = cache.gather()
    torch.testing.assert_close(keys, quantize(k, cache.k_descale).float() * cache.k_descale[:, None, :, None])
    assert values.abs().max() <= 22.4 + 1e-6


def test_fp8_bad_arguments():
    q = torch.randn(2, 1, 4, 16)
    cache = torch.randn(2, 32, 2, 16).to(FP8)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    d = torch.ones(2, 2)
    with pytest.raises(ValueError, match="needs k_descale"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens)
    with pytest.raises(ValueError, match="needs v_descale"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, k_descale=d)
    with pytest.raises(ValueError, match="k_descale is for float8_e4m3fn caches only"):
        flash_attn_with_kvcache(q, cache.float(), cache.float(), cache_seqlens=lens, k_descale=d, v_descale=d)
    with pytest.raises(ValueError, match=r"k_descale must have shape \(2, 2\) \(batch, nheads_k\), got \(2,\)"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, k_descale=d[0], v_descale=d)
    with pytest.raises(TypeError, match="v_descale must be float32, got torch.float16"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, k_descale=d, v_descale=d.half())
    with pytest.raises(TypeError, match="k_descale must be a torch.Tensor"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, k_descale=0.5, v_descale=d)
    with pytest.raises(ValueError, match="k_descale is on meta"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, k_descale=d.to("meta"), v_descale=d)
    e5m2 = cache.float().to(torch.float8_e5m2)
    with pytest.raises(TypeError, match="only torch.float8_e4m3fn"):
        flash_attn_with_kvcache(q, e5m2, e5m2, cache_seqlens=lens, k_descale=d, v_descale=d)
    with pytest.raises(TypeError, match="k_cache and v_cache must share one dtype"):
        flash_attn_with_kvcache(q, cache, cache.float(), cache_seqlens=lens, k_descale=d, v_descale=d)
    with pytest.raises(TypeError, match="q has dtype torch.float8_e4m3fn"):
        flash_attn_with_kvcache(q.to(FP8), cache, cache, cache_seqlens=lens, k_descale=d, v_descale=d)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        flash_attn_with_kvcache(q, cache, cache, torch.randn(2, 1, 2, 16).to(FP8), torch.randn(2, 1, 2, 16).to(FP8),
                                cache_seqlens=lens, k_descale=d, v_descale=d)
    with pytest.raises(TypeError, match="only float8_e4m3fn"):
        KVCache(1, 32, 2, 16, dtype=torch.float8_e5m2)
    with pytest.raises(ValueError, match="k_scale/v_scale are for dtype=torch.float8_e4m3fn"):
        KVCache(1, 32, 2, 16, dtype=torch.float32, k_scale=0.1)
    with pytest.raises(ValueError, match="k_scale must be a float or a tensor of shape"):
        KVCache(1, 32, 2, 16, dtype=FP8, k_scale=torch.ones(3))
    with pytest.raises(ValueError, match="v_scale must be positive"):
        KVCache(1, 32, 2, 16, dtype=FP8, v_scale=0.0)
    fp8_cache = KVCache(1, 32, 2, 16, dtype=FP8)
    with pytest.raises(TypeError, match="KVCache.attend's q is torch.float8_e4m3fn"):
        fp8_cache.attend(torch.randn(1, 1, 4, 16).to(FP8))


def test_decode_config_fp8_tiles():
    from flashtile.backends.triton.launch.table import decode_config

    hopper = (9, 0)
    assert decode_config(4, 128, 2, hopper, 0, kv_elem_size=1).block_n == 128
    assert decode_config(4, 256, 2, hopper, 0, kv_elem_size=1).block_n == 64
    assert decode_config(4, 256, 2, hopper, 0).block_n == 32  # 16-bit caches as before
    assert decode_config(4, 128, 2, hopper, 0) == decode_config(4, 128, 2, hopper, 0, kv_elem_size=2)
    assert decode_config(4, 128, 4, hopper, 0, kv_elem_size=1).block_n == 32  # fp32 compute: as fp32


def test_fp8_compiled_op():
    case = Fp8Case(batch=2, seqlen_q=1, nheads=4, nheads_k=2, head_dim=16, capacity=40, page_size=16, seqlen_new=1)

    def step(q, k_cache, v_cache, k, v, cache_seqlens, block_table, kd, vd):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                       block_table=block_table, k_descale=kd, v_descale=vd) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, case.cache_seqlens, case.block_table,
                   case.k_descale, case.v_descale)
    case.check(out / 2.0)


# --- on the GPU: long caches, every layout ------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("page_size", [None, 16, 256], ids=lambda p: "contiguous" if p is None else f"page{p}")
@pytest.mark.parametrize("seqlen_q,num_splits", [(1, 0), (1, 1), (7, 0), (1, 37)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_fp8_decode_gpu(dtype, page_size, seqlen_q, num_splits, head_dim):
    case = Fp8Case(batch=3, seqlen_q=seqlen_q, nheads=32, nheads_k=8, head_dim=head_dim, capacity=9000,
                   page_size=page_size, seqlen_new=seqlen_q, dtype=dtype, lengths=[8000, 777, 4321],
                   rotary="halves" if seqlen_q > 1 else None)
    out, lse = case.run(causal=True, num_splits=num_splits, return_softmax_lse=True)
    case.check(out, lse, causal=True)


@pytest.mark.gpu
def test_fp8_decode_gpu_error_and_graph():
    """A batch-1 step at 32k keys: the e4m3 bound against the unquantised cache, and a
    CUDA graph replay of the fp8 step."""
    batch, nheads, nheads_k, d, length = 1, 32, 8, 128, 32768
    q = torch.randn(batch, 1, nheads, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, length, nheads_k, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kd, vd = descales_of(k), descales_of(v)
    k8, v8 = quantize(k, kd), quantize(v, vd)
    out = flash_attn_with_kvcache(q, k8, v8, k_descale=kd, v_descale=vd)
    ref = attention_ref(q, k, v, compute_dtype=torch.float64)
    ref8 = attention_ref(q, k8.double() * kd.double()[:, None, :, None], v8.double() * vd.double()[:, None, :, None],
                         compute_dtype=torch.float64)
    low8 = attention_ref(q, (k8.float() * kd[:, None, :, None]).bfloat16(),
                         (v8.float() * vd[:, None, :, None]).bfloat16(), upcast=False)
    assert max_err(out, ref8) <= 2 * max_err(low8, ref8) + rounding_floor(ref8, torch.bfloat16)
    # random keys of 1/sqrt(d)-scaled scores: the rounding moves the output by well under 2**-4 max|v|
    assert max_err(out, ref) <= E4M3_REL * v.abs().max().item()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = flash_attn_with_kvcache(q, k8, v8, k_descale=kd, v_descale=vd)
    graph.replay()
    torch.testing.assert_close(graph_out, out, atol=0, rtol=0)
