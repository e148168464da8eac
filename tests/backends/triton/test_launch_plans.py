"""Launch plans: a call whose shapes, strides, dtypes, alignment and options were
seen before replays the launches of the first such call with its own tensors
(flashtile/backends/triton/launch/plans.py). Every test of the suite also checks each replay against
the launch built the slow way (conftest: ``launch_plans.check_plans``); these tests make
sure replays happen, give correct results and keep nothing alive."""

import gc
import weakref

import pytest
import torch
from helpers import check_attention, count_plan_replays, cu, packed_ref

from flashtile import flash_attn_func, flash_attn_varlen_func, options
from flashtile.backends.triton.launch import choose as launch_choose
from flashtile.backends.triton.launch import plans as launch_plans
from flashtile.testing import attention_ref

pytestmark = pytest.mark.usefixtures("interpreted")


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(launch_plans, "_plans", {})
    monkeypatch.setattr(launch_choose, "_chosen", {})


@pytest.mark.parametrize("options", [
    dict(causal=True), dict(window_size=(9, 3), softcap=2.0), dict(alibi=True, causal=True)], ids=str)
def test_second_call_replays_and_is_exact(monkeypatch, options):
    runs = count_plan_replays(monkeypatch)
    options = dict(options)
    alibi = torch.rand(3) if options.pop("alibi", False) else None
    for _ in range(2):  # fresh inputs each time; the second forward and backward replay plans
        q = torch.randn(2, 45, 3, 32)
        k, v = (torch.randn(2, 70, 1, 32) for _ in range(2))
        check_attention(lambda q, k, v: flash_attn_func(q, k, v, alibi_slopes=alibi, **options), q, k, v,
                        alibi_slopes=alibi, **options)
    assert runs == [["attn_fwd_kernel"], ["attn_bwd_dq_kernel", "attn_bwd_dkdv_kernel"]]


def test_dropout_replays_with_each_calls_seed(monkeypatch):
    runs = count_plan_replays(monkeypatch)
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    torch.manual_seed(5)
    first = flash_attn_func(q, k, v, dropout_p=0.3)
    second = flash_attn_func(q, k, v, dropout_p=0.3)  # another seed: another mask (replayed if in the same class)
    torch.manual_seed(5)
    again = flash_attn_func(q, k, v, dropout_p=0.3)  # replays the first call's plan with its seed
    assert len(runs) >= 1
    assert not torch.equal(first, second)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_varlen_replays_with_new_offsets(monkeypatch):
    runs = count_plan_replays(monkeypatch)

    for lens in ([20, 33, 7], [7, 40, 13]):  # same totals and max length: one plan, other offsets
        q, k, v = (torch.randn(60, 2, 16) for _ in range(3))
        check_attention(lambda q, k, v, lens=lens: flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), 40, 40,
                                                                          causal=True),
                        q, k, v, ref_fn=packed_ref(lens, lens, causal=True))
    assert len(runs) == 2


def test_new_layout_or_alignment_takes_a_new_plan(monkeypatch):
    runs = count_plan_replays(monkeypatch)
    base = torch.randn(1, 50, 2, 40)
    flash_attn_func(base[..., :32], base[..., :32], base[..., :32])
    flash_attn_func(base[..., 1:33], base[..., 1:33], base[..., 1:33])  # 4 bytes further: not 16-byte aligned
    flash_attn_func(base[..., :32].contiguous(), base[..., :32], base[..., :32])  # other q strides
    flash_attn_func(base[..., :32], base[..., :32], base[..., :32], causal=True)
    assert runs == [] and len(launch_plans._plans) == 4
    out = flash_attn_func(base[..., 1:33], base[..., 1:33], base[..., 1:33])
    assert len(runs) == 1
    check_attention(lambda q, k, v: flash_attn_func(q, k, v), *(base[..., 1:33] for _ in range(3)), backward=False)
    assert out.shape == (1, 50, 2, 32)


def test_plans_keep_no_tensor_alive():
    q = torch.randn(1, 30, 2, 16, requires_grad=True)
    flash_attn_func(q, q, q).sum().backward()
    assert launch_plans._plans
    ref = weakref.ref(q)
    del q
    gc.collect()
    assert ref() is None


def test_forced_configs_are_not_planned(monkeypatch):
    from flashtile.backends.triton.launch.table import LaunchConfig

    monkeypatch.setattr(launch_choose, "forced_configs", {"fwd_short": LaunchConfig(32, 32, 4, 1)})
    q = torch.randn(1, 30, 2, 16)
    flash_attn_func(q, q, q)
    assert not launch_plans._plans


def test_seeds_replay_only_within_their_specialisation_class(monkeypatch):
    # Triton compiles an integer argument equal to 1 into the kernel and assumes one divisible
    # by 16 stays so: a plan made with such a seed must not replay another
    q = torch.randn(1, 30, 2, 16)
    opts = [launch_plans.plan_key("fwd", (q,), options.AttnOptions(0.25, dropout_p=0.1, seed=seed), ()) for seed in
            (1, 16, 17, 35)]
    assert opts[0] != opts[1] != opts[2] and opts[2] == opts[3]


@pytest.mark.parametrize("page_size, num_splits, merge_in_kernel, kernels", [
    (None, 3, True, ["attn_decode_kernel"]), (16, 2, False, ["attn_decode_kernel", "attn_combine_kernel"]),
    (16, 0, True, ["attn_decode_kernel"])], ids=str)  # 0: the heuristic (one split for 96 keys here)
def test_decoding_replays(monkeypatch, page_size, num_splits, merge_in_kernel, kernels):
    # the launches of a decoding step (the index checks' statistics, the split kernel and,
    # where it does not merge the splits itself, the combine kernel) replay with the next
    # step's tensors
    from flashtile import flash_attn_with_kvcache
    from flashtile.backends.triton.launch import decode

    monkeypatch.setattr(decode, "MERGE_IN_KERNEL", merge_in_kernel)
    launch_plans.clear_caches()
    runs = count_plan_replays(monkeypatch)

    def step(seed, lengths):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(2, 1, 8, 32, generator=gen)
        shape = (2, 96, 2, 32) if page_size is None else (12, page_size, 2, 32)
        k_cache, v_cache = (torch.randn(shape, generator=gen) for _ in range(2))
        table = None if page_size is None else torch.randperm(12, generator=gen).int().reshape(2, 6)
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                                       block_table=table, num_splits=num_splits, return_softmax_lse=True)

    step(0, [50, 90])
    replayed = step(1, [96, 7])  # other contents and lengths, same layout: replayed
    assert runs == [["index_stats_kernel"], kernels]  # the checks of the index tensors' contents too
    monkeypatch.setattr(launch_plans, "_plans", {})
    fresh = step(1, [96, 7])
    for a, b in zip(replayed, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    launch_plans.clear_caches()


# --- on a CUDA GPU with the compiled kernels (marker ``gpu``) ---------------------------

@pytest.mark.gpu
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

