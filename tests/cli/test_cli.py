"""The command line: argument errors (argparse's, exit code 2, nothing written),
--version, info, check (passes here, fails on a broken function), and a tiny
CPU benchmark."""

import json

import pytest

import flashtile
from flashtile.cli import main

BAD = [
    (["bench", "--providers", "nope"], "--providers"),
    (["bench", "--dtypes", "fp8"], "--dtypes"),
    (["bench", "--causal", "2"], "--causal"),
    (["bench", "--seqlens", "0"], "--seqlens"),
    (["bench", "--head-dims", "x"], "--head-dims"),
    (["bench", "--modes", "fwd,sideways"], "--modes"),
    (["bench", "--hidden", "-3"], "--hidden"),
    (["bench", "--cpu", "--hidden", "100", "--head-dims", "64"], "--hidden"),
    (["bench", "--cpu", "--providers", "sdpa_cudnn"], "sdpa_cudnn"),
    (["check", "--device", "tpu"], "tpu"),
    (["frobnicate"], "frobnicate"),
]


@pytest.mark.parametrize("argv, named", BAD, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_bad_arguments_exit_2_and_write_nothing(argv, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv + (["--out", str(tmp_path / "out")] if argv[0] == "bench" else []))
    err = capsys.readouterr().err
    assert exc.value.code == 2 or (argv[0] == "check" and "tpu" in str(exc.value.code)), exc.value.code
    assert named in err or named in str(exc.value.code)
    assert list(tmp_path.iterdir()) == []


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and flashtile.__version__ in capsys.readouterr().out


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "CPU tensors" in out and "launch configurations" in out


@pytest.mark.parametrize("choice, expected", [(None, "causal at head dim 64 from"), ("1", "FLASHTILE_GLUON=1"),
                                               ("0", "FLASHTILE_GLUON=0")])
def test_info_says_which_hopper_forward(monkeypatch, choice, expected):
    from flashtile.cli import info

    if choice is None:
        monkeypatch.delenv("FLASHTILE_GLUON", raising=False)
    else:
        monkeypatch.setenv("FLASHTILE_GLUON", choice)
    assert expected in info._gluon_line()


@pytest.mark.parametrize("choice, expected", [(None, "the Triton kernels (FLASHTILE_GLUON_BWD=1"),
                                               ("1", "dK/dV by the Gluon kernel")])
def test_info_says_which_hopper_backward(monkeypatch, choice, expected):
    from flashtile.cli import info

    if choice is None:
        monkeypatch.delenv("FLASHTILE_GLUON_BWD", raising=False)
    else:
        monkeypatch.setenv("FLASHTILE_GLUON_BWD", choice)
    assert expected in info._gluon_backward_line()


def test_check_passes_here(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU path, as `flashtile check` runs on a CPU machine
    assert main(["check", "--device", "cpu"]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_check_fails_on_a_wrong_result(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    real = flashtile.flash_attn_func
    monkeypatch.setattr(flashtile, "flash_attn_func", lambda *a, **kw: real(*a, **kw) * 1.01)
    assert main(["check", "--device", "cpu"]) == 1
    assert "FAIL flash_attn_func" in capsys.readouterr().out


def test_tiny_cpu_benchmark(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "out"
    assert main(["bench", "--cpu", "--seqlens", "64", "--head-dims", "16", "--hidden", "32", "--tokens", "64",
                 "--modes", "fwd", "--causal", "1", "--providers", "flashtile,sdpa", "--out", str(out)]) == 0
    results = json.loads((out / "bench.json").read_text())["results"]
    assert {r["provider"] for r in results} == {"flashtile", "sdpa"} and all(r["status"] == "ok" for r in results)
