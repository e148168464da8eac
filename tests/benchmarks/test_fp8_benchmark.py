"""benchmarks/fp8.py: the accuracy part at its smallest sizes on the CPU (where
flash_attn_func has an FP8 forward), and its message where it has none."""

import importlib.util
import inspect
import json
import pathlib
import sys

import pytest
import torch

import flashtile

PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "fp8.py"
AVAILABLE = "q_descale" in inspect.signature(flashtile.flash_attn_func).parameters


@pytest.fixture(scope="module")
def driver():
    spec = importlib.util.spec_from_file_location("benchmarks_fp8", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.skipif(not AVAILABLE, reason="flash_attn_func has no FP8 forward (q_descale) in this build")
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


@pytest.mark.skipif(AVAILABLE, reason="the FP8 forward is there")
def test_missing_fp8_forward_is_named(driver, tmp_path):
    with pytest.raises(SystemExit) as exc:
        driver.main(["--device", "cpu", "--small", "--out", str(tmp_path / "fp8.json")])
    assert "no FP8 forward" in str(exc.value.code)
    assert not (tmp_path / "fp8.json").exists()


def test_outlier_inputs(driver):
    q, _, v = driver.make_inputs("outliers", 1, 8, 2, 16, "cpu", n_outliers=3)
    n, _, _ = driver.make_inputs("normal", 1, 8, 2, 16, "cpu")
    ratio = (q.float().abs().amax((0, 1, 2)) / n.float().abs().amax((0, 1, 2)))
    assert (ratio > 9).sum() == 3 and torch.equal(v, driver.make_inputs("normal", 1, 8, 2, 16, "cpu")[2])


def test_accuracy_with_a_stand_in_forward(driver, tmp_path, monkeypatch):
    """The whole accuracy part against a stand-in for the FP8 forward (dequantise,
    then fp64 attention), so the script runs before the real forward exists."""
    from fp8_stand_in import install_stand_in

    install_stand_in(monkeypatch)
    out = tmp_path / "fp8.json"
    assert driver.main(["--device", "cpu", "--small", "--seqlen", "64", "--heads", "1", "--head-dim", "16",
                        "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["accuracy"]
    assert len(rows) == 4
    for row in rows:
        for name in driver.VARIANTS:
            assert 0 < row[name]["rel_rmse"] < 0.2, (name, row)
