"""Opt-in autotuning of launch configurations and its on-disk cache."""

import json

import pytest
import torch
import triton
from helpers import check_attention

import flashtile
from flashtile.backends.triton.launch import autotune
from flashtile.backends.triton.launch import choose as launch_choose
from flashtile.backends.triton.launch import device as launch_device
from flashtile.backends.triton.launch import plans as launch_plans
from flashtile.backends.triton.launch.table import LaunchConfig


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    """A fresh cache file, autotuning state restored afterwards."""
    path = tmp_path / "tuned" / "autotune.json"
    monkeypatch.setattr(autotune, "_enabled", None)
    monkeypatch.setattr(autotune, "_cache_file", path)
    monkeypatch.setattr(autotune, "_entries", {})
    monkeypatch.setattr(launch_choose, "_chosen", {})
    monkeypatch.setattr(launch_plans, "_plans", {})
    return path


A, B, C = LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 2), LaunchConfig(128, 128, 8, 3)


def test_tune_keeps_the_fastest_config_that_fits_and_caches_it(cache_file):
    costs = {A: 2.0, B: 1.5, C: 0.5}  # C is fastest but does not fit
    runs = []

    def run(cfg):
        runs.append(cfg)
        if cfg == C:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")

    def timer(fn):
        fn()
        return costs[runs[-1]]

    assert autotune.tune("gpu/fwd/d128", [A, B, C], run, timer=timer) == B
    assert json.loads(cache_file.read_text()) == {"gpu/fwd/d128": list(B)}
    assert autotune.lookup("gpu/fwd/d128") == B
    # a new process reads the file and runs nothing
    autotune._entries.clear()
    assert autotune.lookup("gpu/fwd/d128") == B
    assert autotune.lookup("gpu/fwd/d64") is None


def test_tune_keeps_the_table_choice_unless_clearly_beaten(cache_file):
    costs = {A: 1.0, B: 0.99, C: 0.5}
    launched = []

    def timer(fn):
        fn()
        return costs[launched[-1]]

    run = launched.append
    assert autotune.tune("k1", [A, B], run, timer=timer) == A  # 1% faster: noise
    assert autotune.tune("k2", [A, B, C], run, timer=timer) == C  # 2x faster: a real win


def test_tune_keeps_entries_other_processes_wrote(cache_file):
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(json.dumps({"other/key": list(A)}))
    autotune.tune("this/key", [B], lambda cfg: None, timer=lambda fn: 1.0)
    assert json.loads(cache_file.read_text()) == {"other/key": list(A), "this/key": list(B)}


def test_tune_raises_when_nothing_fits(cache_file):
    def run(cfg):
        raise triton.runtime.errors.OutOfResources(1, 0, "registers")

    with pytest.raises(RuntimeError, match="no launch configuration fits"):
        autotune.tune("k", [A, B], run, timer=lambda fn: 1.0)


def test_unreadable_cache_is_ignored_with_a_warning(cache_file):
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable autotune cache"):
        assert autotune.lookup("k") is None


def test_switches_and_defaults(cache_file, monkeypatch):
    monkeypatch.delenv("FLASHTILE_AUTOTUNE", raising=False)
    assert not autotune.enabled()
    monkeypatch.setenv("FLASHTILE_AUTOTUNE", "1")
    assert autotune.enabled()
    flashtile.set_autotune(False)
    assert not autotune.enabled()
    with pytest.raises(TypeError, match="enabled"):
        flashtile.set_autotune("yes")
    # table entries first (a tie keeps the table's choice), no duplicates
    space = autotune.search_space([C, A])
    assert space[:2] == [C, A] and len(space) == len(set(space))
    assert autotune.size_bucket(1) == 128 and autotune.size_bucket(1000) == 1024
    assert autotune.size_bucket(1024) == 1024 and autotune.size_bucket(10**6) == 65536


def test_autotune_is_a_no_op_without_a_gpu(cache_file):
    # under the interpreter (and on the CPU path) there is nothing to tune: results as usual
    flashtile.set_autotune(True, cache_file)
    device = "cuda" if torch.cuda.is_available() and not launch_device.interpreting() else "cpu"
    if device == "cuda":
        pytest.skip("covered by the GPU test")
    q, k, v = (torch.randn(1, 77, 2, 32) for _ in range(3))
    check_attention(lambda q, k, v: flashtile.flash_attn_func(q, k, v, causal=True), q, k, v, causal=True)
    assert not cache_file.exists()


@pytest.mark.gpu
def test_autotuned_launches_are_correct_and_cached_gpu(cache_file, monkeypatch):
    flashtile.set_autotune(True, cache_file)
    # a small search space keeps the test short; the real one is the table plus a grid
    monkeypatch.setattr(autotune, "search_space",
                        lambda table: list(dict.fromkeys([*table, LaunchConfig(64, 64, 4, 2),
                                                          LaunchConfig(64, 32, 4, 2)])))
    q, k, v = (torch.randn(2, 333, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    check_attention(lambda q, k, v: flashtile.flash_attn_func(q, k, v, causal=True), q, k, v, causal=True)
    entries = json.loads(cache_file.read_text())
    names = sorted(key.split("/")[3].split("-")[0] for key in entries)
    assert names == ["dkdv_causal", "dq_causal", "fwd_causal_short"], entries
    assert all(key.endswith("/512x512") for key in entries)
    # another sequence-length bucket tunes again; the same bucket reuses the choice
    launch_plans.clear_caches()
    autotune._entries.clear()
    q2 = torch.randn(2, 1500, 4, 64, device="cuda", dtype=torch.bfloat16)
    flashtile.flash_attn_func(q2, q2, q2, causal=True)
    assert len(json.loads(cache_file.read_text())) == 4
    flashtile.flash_attn_func(q[:, :300], k[:, :300], v[:, :300], causal=True)
    assert len(json.loads(cache_file.read_text())) == 4
