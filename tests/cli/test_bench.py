"""`flashtile bench`."""

import pytest

# --- on a CUDA GPU with the compiled kernels (marker ``gpu``) ---------------------------

@pytest.mark.gpu
def test_bench_graph_timing_gpu():
    """``flashtile bench --graph``: every mode also timed as CUDA-graph replays."""
    from flashtile.cli.bench import Case, _gpu_measure

    case = Case("bf16", 64, True, 1024, 2, 4)
    for provider in ("flashtile", "sdpa_flash"):
        results = _gpu_measure(provider, case, ["fwd", "fwd_bwd"], graph=True)
        assert [r.status for r in results] == ["ok", "ok"]
        assert all(r.extra["graph_ms"] > 0 for r in results), [r.extra for r in results]

