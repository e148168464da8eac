"""benchmarks/cpu.py at a tiny size: every case and mode timed for flashtile and
PyTorch's SDPA (the options PyTorch lacks beside them), and the paired ratio kept."""

import json

from helpers import load_script


def test_small_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors: flashtile's CPU path, as the benchmark runs it
    out = tmp_path / "cpu.json"
    for module in load_script("benchmarks/cpu.py"):
        assert module.main(["--seqlens", "64", "--dtypes", "fp32", "--heads", "2", "--head-dim", "16",
                            "--rounds", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["causal"], r["mode"]) for r in rows} == {(c, m) for c in (False, True) for m in ("fwd", "fwd_bwd")}
    for row in rows:
        assert row["ratio"] > 0 and all(ms > 0 for ms in row["ms"].values())
        assert {"flashtile", "sdpa", "flashtile flash_attn layout"} <= row["ms"].keys()
        if row["causal"]:
            assert {"flashtile window 256", "flashtile window 256, tiled path", "flashtile softcap"} <= row["ms"].keys()
