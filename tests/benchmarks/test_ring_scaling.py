"""benchmarks/ring_scaling.py at its CPU size: it starts one and two gloo ranks of itself,
times ring attention's forward+backward and reports the scaling against one rank."""

import json

import pytest

from helpers import load_script


@pytest.fixture(scope="module")
def script():
    yield from load_script("benchmarks/ring_scaling.py")


@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_small_run(script, tmp_path, method):
    out = tmp_path / "ring_scaling.json"
    assert script.main(["--small", "--method", method, "--reps", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "gloo" and result["method"] == method
    rows = {row["world"]: row for row in result["rows"]}
    assert set(rows) == {1, 2}
    assert rows[1]["efficiency"] == pytest.approx(1.0)  # one rank against itself
    for row in rows.values():
        assert row["ms"] > 0 and row["tflops_per_rank"] > 0 and not row["one_rank_extrapolated"]
        assert row["ideal_ms"] == pytest.approx(rows[1]["ms"] / row["world"])


def test_one_rank_time_extrapolated_from_the_longest_held(script):
    ms, extrapolated = script._one_rank_ms({1024: 2.0, 2048: 8.0, 4096: None}, 4096)
    assert extrapolated and ms == pytest.approx(32.0)
    assert script._one_rank_ms({1024: 2.0}, 1024) == (2.0, False)
    assert script._one_rank_ms({1024: None}, 1024) == (None, False)


@pytest.mark.parametrize("argv, message", [(["--worlds", "2,x"], "--worlds"), (["--tokens", "0"], "--tokens")])
def test_bad_arguments(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
