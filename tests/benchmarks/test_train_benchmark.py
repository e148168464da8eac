"""benchmarks/train.py: the search for the longest context (doubling until out of
memory, halving when even the first try did not fit, stopping at the cap), and a
tiny sweep on the CPU through real child processes."""

import importlib.util
import json

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def driver():
    yield from load_script("benchmarks/train.py")


def test_longest_context_search(driver, tmp_path, monkeypatch):
    """A fake GPU on which each backend holds a fixed number of tokens (sdpa-cudnn: none
    there, its first cell says so and the others are not run)."""
    capacity = {"flashtile": 3000, "eager": 100, "sdpa-flash": 10**9}
    tried = []

    def fake_cell(args, attention, seq_len, batch_size, steps, warmup, workdir):
        tried.append((attention, seq_len, batch_size))
        cell = {"attention": attention, "seq_len": seq_len, "batch_size": batch_size}
        if attention == "sdpa-cudnn":
            return {**cell, "status": "unavailable: no cuDNN here"}
        if seq_len * batch_size > capacity[attention]:
            return {**cell, "status": "oom"}
        return {**cell, "status": "ok", "tokens_per_s": 1.0, "peak_memory_mib": 1.0, "mfu": None,
                "loss": [1.0] * steps}

    monkeypatch.setattr(driver, "run_cell", fake_cell)
    out = tmp_path / "train.json"
    assert driver.main(["--attentions", "flashtile,eager,sdpa-flash,sdpa-cudnn", "--contexts", "64,256",
                        "--tokens", "256",
                        "--max-context", "4096", "--corpus-mb", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert driver.longest_fit(results, "flashtile") == (2048, 4096)
    assert driver.longest_fit(results, "eager") == (64, 128)  # 256 at batch 1 did not fit: halved
    assert driver.longest_fit(results, "sdpa-flash") == (4096, None)  # stopped at the cap
    assert [s for a, s, b in tried if a == "sdpa-flash" and b == 1] == [256, 512, 1024, 2048, 4096]
    assert ("eager", 128, 1) in tried and ("eager", 32, 1) not in tried
    assert [t for t in tried if t[0] == "sdpa-cudnn"] == [("sdpa-cudnn", 64, 4)]
    assert {c["status"] for c in results["cells"] if c["attention"] == "sdpa-cudnn"} == {"unavailable: no cuDNN here"}


def test_tiny_sweep_on_cpu(driver, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the children run the CPU path
    out = tmp_path / "train.json"
    assert driver.main(["--device", "cpu", "--config", "tiny", "--attentions", "flashtile,eager",
                        "--contexts", "32", "--tokens", "64", "--warmup", "1", "--steps", "1", "--curve-steps", "3",
                        "--max-context", "32", "--corpus-mb", "1", "--out", str(out)]) == 0
    cells = json.loads(out.read_text())["cells"]
    status = {c["attention"]: c["status"] for c in cells}
    assert status["flashtile"] == status["eager"] == "ok", status
    losses = {c["attention"]: c["loss"] for c in cells if c["status"] == "ok"}
    assert len(losses["flashtile"]) == 3 and losses["flashtile"] == pytest.approx(losses["eager"], rel=1e-4)
    capsys.readouterr()
    assert driver.main(["--summary", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "flashtile / eager" in printed and "same-seed losses" in printed
    if importlib.util.find_spec("matplotlib") is not None:  # the plot needs the bench extra
        plot = tmp_path / "train.png"
        assert driver.main(["--summary", str(out), "--plot", str(plot)]) == 0
        assert plot.read_bytes().startswith(b"\x89PNG")


def test_bad_arguments(driver, tmp_path, capsys):
    for argv in (["--attentions", "math"], ["--contexts", "0"], ["--max-context", "1048576", "--corpus-mb", "1"]):
        with pytest.raises(SystemExit) as exc:
            driver.main([*argv, "--out", str(tmp_path / "train.json")])
        assert exc.value.code == 2 and argv[-2 if len(argv) > 2 else 0] in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
