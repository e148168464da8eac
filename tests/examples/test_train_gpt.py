"""examples/train_gpt.py on the CPU: a tiny model learns (its loss goes down), the
JSON log holds what it promises, flashtile and eager attention train the same
model to the same losses, and bad arguments are argparse errors (exit code 2)
with nothing written."""

import importlib.util
import json
import statistics

import pytest
import torch

from flashtile.cli.train import load_example

TINY = ["--config", "tiny", "--device", "cpu", "--precision", "fp32", "--corpus-mb", "1"]


@pytest.fixture
def example(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors take the CPU path, as on a user's machine
    return load_example()


def _train(example, tmp_path, name, *args):
    log = tmp_path / f"{name}.json"
    assert example.main([*TINY, *args, "--log", str(log)]) == 0
    return json.loads(log.read_text())


def _tiny_parameters(layers: int, width: int) -> int:
    """GPT-2's parameters over bytes, the embedding tied to the output layer (counted once)."""
    attention = 3 * width * width + 3 * width + width * width + width
    mlp = 4 * width * width + 4 * width + 4 * width * width + width
    return 256 * width + layers * (attention + mlp + 2 * 2 * width) + 2 * width


def test_tiny_model_learns_and_logs(example, tmp_path):
    steps, batch, seq_len = 30, 4, 64
    plot = tmp_path / "loss.png"
    log = _train(example, tmp_path, "tiny", "--steps", str(steps), "--batch-size", str(batch), "--seq-len",
                 str(seq_len), "--eval-every", "10", "--eval-batches", "2", "--timing-warmup", "2", "--plot", str(plot))
    losses = log["loss"]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    # from ln(256) = 5.55 nats (uniform bytes); learning even the byte frequencies takes it below 4.5
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last < first - 0.5, (first, last)
    assert [v["step"] for v in log["val"]] == [10, 20, 30]
    assert log["val"][-1]["loss"] < log["val"][0]["loss"]

    assert log["status"] == "ok"
    assert log["settings"]["steps"] == steps and log["settings"]["attention"] == "flashtile"
    assert log["settings"]["seq_len"] == seq_len and log["settings"]["batch_size"] == batch
    model = log["model"]
    assert model["parameters"] == _tiny_parameters(model["layers"], model["width"])
    tokens = batch * seq_len
    assert log["tokens_per_step"] == tokens
    attention = 3.5 * 4 * batch * model["heads"] * seq_len**2 * model["head_dim"] / 2 * model["layers"]
    assert log["flops_per_step"] == pytest.approx(6 * model["parameters"] * tokens + attention)
    assert len(log["step_time_s"]) == steps and log["timed_steps"] == steps - 2
    assert log["step_time_median_s"] == pytest.approx(statistics.median(log["step_time_s"][2:]))
    assert log["tokens_per_s"] == pytest.approx(tokens / log["step_time_median_s"])
    assert log["peak_memory_mib"] > 0
    assert log["mfu"] is None and "CPU" in log["mfu_note"]
    if importlib.util.find_spec("matplotlib") is not None:  # the plot needs the bench extra
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not plot.exists()


@pytest.mark.parametrize("attention", ["eager", "sdpa-flash"])
def test_attention_backends_train_alike(example, tmp_path, attention):
    """Same seed, same data: the first steps' losses agree with flashtile's. In fp32 the
    attention outputs differ by rounding only (~1e-7 relative, another summation
    order); a few AdamW steps carry that into the losses, which have measured within
    ~1e-7 relative of each other. 1e-4 leaves room for other CPUs' kernels while an
    attention that differs (non-causal, wrong scale) moves the loss by far more."""
    args = ["--steps", "6", "--seq-len", "48", "--batch-size", "2"]
    ours = _train(example, tmp_path, "flashtile", *args)["loss"]
    theirs = _train(example, tmp_path, attention, *args, "--attention", attention)["loss"]
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours[-1] < ours[0]  # the steps compared did train


def test_transformers_gpt2_flashtile_and_eager_train_alike(example, tmp_path):
    """--model hf-gpt2: transformers' GPT-2 with attn_implementation "flashtile" and "eager"
    (same weights, same data) reach the same losses, as above."""
    pytest.importorskip("transformers")
    args = ["--model", "hf-gpt2", "--steps", "3", "--seq-len", "32", "--batch-size", "2"]
    ours = _train(example, tmp_path, "flashtile", *args)
    theirs = _train(example, tmp_path, "eager", *args, "--attention", "eager")
    assert ours["settings"]["model"] == "hf-gpt2" and ours["model"]["parameters"] > 0
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)


def test_a_wrong_attention_is_caught(example, tmp_path, monkeypatch):
    """The comparison above fails on an attention that sees the future."""
    def bidirectional(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    args = ["--steps", "3", "--seq-len", "48", "--batch-size", "2"]
    ours = _train(example, tmp_path, "flashtile", *args)["loss"]
    monkeypatch.setattr(example, "eager_attention", bidirectional)
    leaky = _train(example, tmp_path, "leaky", *args, "--attention", "eager")["loss"]
    assert ours != pytest.approx(leaky, rel=1e-4)


BAD = [
    (["--steps", "0"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "100000000"], "--seq-len"),  # longer than the held-out text
    (["--grad-accum", "0"], "--grad-accum"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--eval-batches", "0"], "--eval-batches"),
    (["--timing-warmup", "-2"], "--timing-warmup"),
    (["--peak-tflops", "0"], "--peak-tflops"),
    (["--corpus-mb", "0"], "--corpus-mb"),
    (["--config", "huge"], "--config"),
    (["--model", "bert"], "--model"),
    (["--attention", "nope"], "--attention"),
    (["--attention", "sdpa-cudnn"], "sdpa-cudnn"),  # no cuDNN on the CPU
    (["--attention", "flex"], "flex"),  # FlexAttention has no CPU backward
    (["--precision", "fp8"], "--precision"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--plot", "loss.jpg"], "--plot"),
]


@pytest.mark.parametrize("argv, named", BAD, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_bad_arguments_exit_2_and_write_nothing(example, argv, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("loss.jpg", str(tmp_path / "loss.jpg")) for a in argv]
    with pytest.raises(SystemExit) as exc:
        example.main(["--config", "tiny", "--corpus-mb", "1", *argv, "--log", str(tmp_path / "log.json")])
    assert exc.value.code == 2
    assert named in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_log_path_that_is_a_directory(example, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        example.main([*TINY, "--log", str(tmp_path)])
    assert exc.value.code == 2 and "--log" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
