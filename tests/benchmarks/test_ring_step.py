"""benchmarks/ring_step.py at its CPU size: one rank's ring steps are planned, run and
timed, and every row carries the figures the cost model takes."""

import json

from helpers import load_script


def test_small_run(tmp_path):
    out = tmp_path / "ring_step.json"
    for module in load_script("benchmarks/ring_step.py"):
        assert module.main(["--small", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["causal"], r["step"]) for r in rows} == {(c, s) for c in (False, True) for s in (0, 1)}
    for row in rows:
        assert row["blocks"] >= 1 and row["forward_ms"] > 0 and row["fwd_bwd_ms"] > 0
        assert row["bytes_fwd_bwd"] > row["bytes_fwd"] > 0
        assert all(row[f"hide_{link}"] > 0 for link in module.LINKS)
