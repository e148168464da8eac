"""End-to-end training with each attention backend: GPT-2 small (``examples/train_gpt.py``)
trained at 1k, 4k and 16k context, the longest context each backend fits at
batch 1, and the same-seed loss curves, in one JSON, with a summary table.

    python benchmarks/train.py --out bench_results/train.json     # on a GPU: about 8 minutes on an H100
    python benchmarks/train.py --summary bench_results/train.json # the tables again, from the file

Every cell is a child process (``examples/train_gpt.py --log``), so running out
of memory in one leaves the next with a clean GPU. What each part runs, chosen
to fit the whole sweep in about 8 minutes of an H100:

- context: 16k tokens a step (batch = 16384 / context; 1k x 16, 4k x 4, 16k x 1),
  ``--warmup`` untimed + ``--steps`` timed steps; tokens/s, step time, MFU and
  peak memory are over the timed steps.
- longest: batch 1, the context doubled from the longest that fit in the context
  part at batch 1 (halved from the shortest that did not, if none did) until a
  step runs out of memory or the context passes ``--max-context``; 1 untimed + 2
  timed steps a try.
- curves: at the shortest context, that cell runs ``--curve-steps`` steps (same
  seed, same data for every backend), and its losses are compared with
  flashtile's step by step.

No ``torch.compile`` of the model by default (a compile per cell would cost more
than the cells): FlexAttention alone is compiled, as it must be. ``--compile``
compiles every model. A cell that does not finish within ``--cell-timeout`` seconds
is recorded as a timeout; after ``--budget`` seconds no cell starts (recorded as
over budget).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_gpt.py"
ATTENTIONS = ("flashtile", "sdpa-flash", "sdpa-cudnn", "eager", "flex")
EXIT_OOM = 3  # examples/train_gpt.py's exit code when out of GPU memory
MIN_CONTEXT = 64  # the halving search stops here


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of ints")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive ints")
    return values


def _attentions(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in ATTENTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(ATTENTIONS)}")
    return names


def _positive(text: str) -> int:
    value = _ints(text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not one positive int")
    return value[0]


def run_cell(args, attention: str, seq_len: int, batch_size: int, steps: int, warmup: int, workdir: Path) -> dict:
    """One training run in a child process; its log, or its status (oom, timeout, error)."""
    log = workdir / f"{attention}_{seq_len}_{batch_size}_{steps}.json"
    cmd = [sys.executable, str(EXAMPLE), "--config", args.config, "--attention", attention, "--seq-len", str(seq_len),
           "--batch-size", str(batch_size), "--steps", str(steps), "--timing-warmup", str(warmup),
           "--corpus-mb", str(args.corpus_mb), "--log", str(log), "--compile" if args.compile else "--no-compile"]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cell = {"attention": attention, "seq_len": seq_len, "batch_size": batch_size, "steps": steps}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.cell_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**cell, "status": "timeout", "wall_s": time.perf_counter() - start}
    cell["wall_s"] = time.perf_counter() - start
    if proc.returncode == 0 and log.exists():
        result = json.loads(log.read_text())
        keep = ("status", "tokens_per_s", "step_time_median_s", "peak_memory_mib", "mfu", "achieved_tflops",
                "device", "loss", "model")
        return {**cell, **{k: result.get(k) for k in keep}}
    if proc.returncode == EXIT_OOM or "out of memory" in proc.stderr.lower():
        return {**cell, "status": "oom"}
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    last = lines[-1] if lines else ""
    if proc.returncode == 2:  # an argument error: this backend cannot run here (the example says why)
        return {**cell, "status": f"unavailable: {last}"}
    return {**cell, "status": f"error (exit {proc.returncode}): {last}"[:300]}


def sweep(args) -> dict:
    """The three parts; writes ``--out`` after every cell (what is done survives an interruption)."""
    started = time.perf_counter()
    results = {"meta": {"config": args.config, "tokens_per_step": args.tokens, "warmup": args.warmup,
                        "steps": args.steps, "curve_steps": args.curve_steps, "compile": args.compile,
                        "max_context": args.max_context},
               "cells": []}

    unavailable = {}  # attention -> why

    def cell(attention, seq_len, batch_size, steps, warmup, part):
        skip = {"attention": attention, "seq_len": seq_len, "batch_size": batch_size}
        if attention in unavailable:
            result = {**skip, "status": unavailable[attention]}
        elif time.perf_counter() - started > args.budget:
            result = {**skip, "status": "over budget"}
        else:
            result = run_cell(args, attention, seq_len, batch_size, steps, warmup, workdir)
        result["part"] = part
        if result["status"].startswith("unavailable"):
            unavailable[attention] = result["status"]
        results["cells"].append(result)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"{part:8s} {attention:10s} {batch_size:3d} x {seq_len:7d}: {result['status']}"
              + (f", {result['tokens_per_s']:,.0f} tokens/s" if result.get("tokens_per_s") else ""), flush=True)
        return result

    shortest = min(args.contexts)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for attention in args.attentions:
            for seq_len in args.contexts:
                steps = args.warmup + args.steps
                if seq_len == shortest:
                    steps = max(steps, args.curve_steps)
                cell(attention, seq_len, max(1, args.tokens // seq_len), steps, args.warmup, "context")
        for attention in args.attentions:
            at_batch_1 = {c["seq_len"]: c["status"] for c in results["cells"]
                          if c["attention"] == attention and c["batch_size"] == 1}
            fits = [s for s, status in at_batch_1.items() if status == "ok"]
            if fits:
                seq_len = 2 * max(fits)
                while seq_len <= args.max_context and cell(attention, seq_len, 1, 3, 1, "longest")["status"] == "ok":
                    seq_len *= 2
            elif "oom" in at_batch_1.values():
                seq_len = min(s for s, status in at_batch_1.items() if status == "oom") // 2
                while seq_len >= MIN_CONTEXT and cell(attention, seq_len, 1, 3, 1, "longest")["status"] == "oom":
                    seq_len //= 2
    results["meta"]["wall_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=1))
    return results


def longest_fit(results: dict, attention: str) -> tuple[int | None, int | None]:
    """(the longest context that trained at batch 1, the shortest that ran out of memory)."""
    at_batch_1 = [c for c in results["cells"] if c["attention"] == attention and c["batch_size"] == 1]
    ok = [c["seq_len"] for c in at_batch_1 if c["status"] == "ok"]
    oom = [c["seq_len"] for c in at_batch_1 if c["status"] == "oom"]
    return max(ok, default=None), min(oom, default=None)


def print_summary(results: dict) -> None:
    """Tables: throughput per context (and the ratio to eager attention), the longest
    context at batch 1, and the loss curves against flashtile's."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cells = [c for c in results["cells"] if c["part"] == "context"]
    attentions = list(dict.fromkeys(c["attention"] for c in results["cells"]))
    contexts = sorted({c["seq_len"] for c in cells})
    by_key = {(c["attention"], c["seq_len"]): c for c in cells}
    device = next((c["device"] for c in results["cells"] if c.get("device")), "?")

    def show(c, fmt):
        if c is None:
            return "-"
        return fmt(c) if c["status"] == "ok" else c["status"].split(":")[0]

    table = Table(title=f"{results['meta']['config']} model, {results['meta']['tokens_per_step']} tokens a step, "
                        f"{device}: tokens/s (MFU, peak GiB)")
    table.add_column("attention")
    for s in contexts:
        table.add_column(f"{s // 1024}k" if s % 1024 == 0 else str(s), justify="right")
    for a in attentions:
        table.add_row(a, *[show(by_key.get((a, s)), lambda c: f"{c['tokens_per_s']:,.0f} ("
                                + (f"{c['mfu']:.0%}, " if c.get("mfu") is not None else "")
                                + f"{c['peak_memory_mib'] / 1024:.1f})") for s in contexts])
    for a in attentions:
        if a == "eager":
            continue
        ratios = []
        for s in contexts:
            ours, eager = by_key.get((a, s)), by_key.get(("eager", s))
            ok = ours and eager and ours["status"] == eager["status"] == "ok"
            ratios.append(f"{ours['tokens_per_s'] / eager['tokens_per_s']:.2f}x" if ok else "-")
        if any(r != "-" for r in ratios):
            table.add_row(f"{a} / eager", *ratios, style="dim")
    console.print(table)

    longest = Table(title="longest context at batch 1")
    for column in ("attention", "trained", "out of memory at"):
        longest.add_column(column, justify="left" if column == "attention" else "right")
    cap = results["meta"]["max_context"]
    for a in attentions:
        ok, oom = longest_fit(results, a)
        capped = ok is not None and oom is None and 2 * ok > cap  # the search stopped at --max-context
        longest.add_row(a, "-" if ok is None else f"{ok:,}" + (" (cap)" if capped else ""),
                        "-" if oom is None else f"{oom:,}")
    console.print(longest)
    console.print(f"(cap): the search stopped at --max-context {cap:,}")

    curves = {c["attention"]: c["loss"] for c in cells if c["seq_len"] == min(contexts, default=0) and c.get("loss")}
    if "flashtile" in curves:
        ref = curves["flashtile"]
        table = Table(title=f"same-seed losses at {min(contexts)} tokens, against flashtile's")
        for column in ("attention", "steps", "first loss", "last loss", "largest |difference|"):
            table.add_column(column, justify="left" if column == "attention" else "right")
        for a, losses in curves.items():
            n = min(len(losses), len(ref))
            diff = max(abs(x - y) for x, y in zip(losses[:n], ref[:n]))
            table.add_row(a, str(n), f"{losses[0]:.4f}", f"{losses[n - 1]:.4f}", f"{diff:.2e}")
        console.print(table)


def save_plot(results: dict, path: Path) -> None:
    """The same-seed loss curves (the context part's shortest context) and tokens/s per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in results["cells"] if c["part"] == "context"]
    contexts = sorted({c["seq_len"] for c in cells})
    device = next((c["device"] for c in results["cells"] if c.get("device")), "?")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for c in cells:
        if c["seq_len"] == min(contexts, default=0) and c.get("loss"):
            left.plot(range(1, len(c["loss"]) + 1), c["loss"], label=c["attention"], linewidth=1)
    left.set(xlabel="step", ylabel="training loss", title=f"same seed and data, {min(contexts, default=0)} tokens")
    left.legend()
    attentions = list(dict.fromkeys(c["attention"] for c in cells))
    width = 0.8 / max(len(attentions), 1)
    for i, a in enumerate(attentions):
        rates = [next((c["tokens_per_s"] / 1e3 for c in cells if c["attention"] == a and c["seq_len"] == s
                       and c["status"] == "ok"), 0) for s in contexts]
        right.bar([j + i * width for j in range(len(contexts))], rates, width, label=a)
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(contexts))], [f"{s // 1024}k" for s in contexts])
    right.set(xlabel="context", ylabel="thousand tokens/s (0: out of memory)", ylim=(0, None),
              title=f"{results['meta']['config']} model, {results['meta']['tokens_per_step']} tokens a step")
    right.legend(fontsize=8)
    fig.suptitle(f"Training throughput and loss, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_results/train.json"), help="the JSON of every cell")
    p.add_argument("--summary", type=Path, default=None, help="print the tables of this JSON and stop")
    p.add_argument("--plot", type=Path, default=None, help="also draw the loss curves and tokens/s in this PNG")
    p.add_argument("--attentions", type=_attentions, default=list(ATTENTIONS), help="comma list")
    p.add_argument("--contexts", type=_ints, default=[1024, 4096, 16384], help="comma list of context lengths")
    p.add_argument("--tokens", type=_positive, default=16384, help="tokens a step in the context part")
    p.add_argument("--warmup", type=_positive, default=3, help="untimed steps a cell")
    p.add_argument("--steps", type=_positive, default=10, help="timed steps a cell")
    p.add_argument("--curve-steps", type=_positive, default=100, help="steps of the loss curves")
    p.add_argument("--max-context", type=_positive, default=131072, help="the longest context tried")
    p.add_argument("--config", choices=("tiny", "small", "medium"), default="small")
    p.add_argument("--device", default=None, help="passed to the example (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--corpus-mb", type=float, default=8.0, help="passed to the example (8 MB: a held-out split "
                                                                 "of 400 KB, longer than any context tried)")
    p.add_argument("--cell-timeout", type=_positive, default=150, help="seconds a cell may take")
    p.add_argument("--budget", type=_positive, default=420, help="seconds after which no cell starts")
    args = p.parse_args(argv)
    if args.corpus_mb <= 0 or args.corpus_mb * 2**20 * 0.05 <= max(args.max_context, *args.contexts):
        p.error(f"argument --corpus-mb: {args.corpus_mb} MB holds out 5% for validation, which must be longer "
                "than every context tried")
    if args.summary is not None:
        if not args.summary.is_file():
            p.error(f"argument --summary: {str(args.summary)!r} is not a file")
        results = json.loads(args.summary.read_text())
        print_summary(results)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results = sweep(args)
        print_summary(results)
        print(f"wrote {args.out}")
    if args.plot is not None:
        save_plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
