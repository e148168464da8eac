"""benchmarks/fp8.py: the accuracy part at its smallest sizes on the CPU."""

import json

import pytest
import torch
from helpers import load_script


@pytest.fixture(scope="module")
def driver():
    yield from load_script("benchmarks/fp8.py")


def test_accuracy_on_cpu(driver, tmp_path):
    out = tmp_path / "fp8.json"
    assert driver.main(["--device", "cpu", "--small", "--seqlen", "64", "--heads", "1", "--head-dim", "16",
                        "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["accuracy"]
    assert {(r["inputs"], r["causal"]) for r in rows} == {(i, c) for i in ("normal", "outliers")
                                                          for c in (False, True)}
    for row in rows:
        for name in ("bf16", *driver.VARIANTS):
            assert 0 <= row[name]["rmse"] <= row[name]["max_abs_err"] < float("inf")
            assert row[name]["rel_rmse"] < 0.2, (name, row)


def test_outlier_inputs(driver):
    q, _, v = driver.make_inputs("outliers", 1, 8, 2, 16, "cpu", n_outliers=3)
    n, _, _ = driver.make_inputs("normal", 1, 8, 2, 16, "cpu")
    ratio = (q.float().abs().amax((0, 1, 2)) / n.float().abs().amax((0, 1, 2)))
    assert (ratio > 9).sum() == 3 and torch.equal(v, driver.make_inputs("normal", 1, 8, 2, 16, "cpu")[2])
