"""`flashtile bench train`: the training example behind the command line, its
arguments forwarded; `flashtile bench` itself parses as before."""

import json

import pytest

from flashtile.cli import main


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert out.startswith("usage: flashtile bench train") and "--attention" in out and "--seq-len" in out


def test_bench_help_names_train(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0 and "flashtile bench train" in capsys.readouterr().out


def test_tiny_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    log = tmp_path / "train.json"
    assert main(["bench", "train", "--config", "tiny", "--device", "cpu", "--steps", "3", "--seq-len", "32",
                 "--batch-size", "2", "--corpus-mb", "1", "--log", str(log)]) == 0
    result = json.loads(log.read_text())
    assert result["status"] == "ok" and len(result["loss"]) == 3 and result["settings"]["seq_len"] == 32
    assert "tokens/s" in capsys.readouterr().out


def test_bad_argument_names_the_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "--steps", "-1", "--log", str(tmp_path / "train.json")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "flashtile bench train: error: argument --steps" in err
    assert list(tmp_path.iterdir()) == []


def test_train_is_only_a_mode_of_bench(tmp_path, capsys):
    """'train' elsewhere is not the training benchmark: bench's own parser rejects it."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--cpu", "train", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "train" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
