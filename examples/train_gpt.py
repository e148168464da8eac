"""Train a GPT-2 style model end to end, with the attention of your choice, and
measure it: tokens/s, step time, peak memory, MFU, training and validation loss.

The model is GPT-2's shape (pre-LayerNorm blocks, GELU MLP of 4x width, tied
input/output embeddings) built on ``flashtile.nn.MultiheadAttention`` with
rotary positions (so the context is not bounded by a learned position table),
over bytes (256 tokens). ``--config small`` is GPT-2 small's 12 layers x 768
wide x 12 heads: 85M parameters here, as the byte vocabulary replaces GPT-2's
50,257-token embedding (38.6M of its 124M). ``--attention`` swaps only the
attention core (same weights, same data): flashtile, ``eager`` (softmax(QKᵀ)V
materialised in PyTorch, as transformers' eager path), PyTorch SDPA with its
flash or cuDNN backend forced, or FlexAttention. ``--model hf-gpt2|hf-llama``
trains transformers' GPT-2 or Llama instead, with the matching
``attn_implementation``.

The corpus is the Python standard library's source (every ``*.py`` file under
``sysconfig.get_paths()['stdlib']`` in sorted path order, bytes as tokens): it
exists on every machine without a download. The last 5% is held out for
validation. Batches are drawn from a generator seeded with ``--seed``, so
every attention backend sees the same data in the same order.

    # CPU, seconds
    python examples/train_gpt.py --config tiny --steps 30 --log /tmp/tiny.json
    # GPU: GPT-2 small at 4k context, bf16 autocast, torch.compile
    python examples/train_gpt.py --config small --seq-len 4096 --batch-size 4 --steps 200 \\
        --attention flashtile --log train.json --plot train.png

MFU counts the model's FLOPs as 6 x parameters x tokens plus the attention's
as flashtile's benchmarks count them (forward 4·b·h·s²·d per layer, halved
when causal, forward+backward 3.5x), against the GPU's dense bf16 peak (H100
SXM and H200: 989 TFLOP/s; ``--peak-tflops`` for other GPUs). Recomputation
by ``--checkpoint`` is not counted. On a CPU MFU is not applicable.

Exit codes: 0 done, 2 bad arguments (nothing written), 3 out of GPU memory
(the log records ``"status": "oom"``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import pathlib
import platform
import resource
import statistics
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import flashtile
from flashtile.nn import MultiheadAttention


@dataclass(frozen=True)
class Config:
    """A model size and its training defaults."""

    layers: int
    width: int
    heads: int
    seq_len: int
    batch_size: int
    lr: float


CONFIGS = {
    "tiny": Config(layers=2, width=64, heads=4, seq_len=128, batch_size=8, lr=3e-3),
    "small": Config(layers=12, width=768, heads=12, seq_len=1024, batch_size=8, lr=6e-4),
    "medium": Config(layers=24, width=1024, heads=16, seq_len=1024, batch_size=8, lr=3e-4),
}
ATTENTIONS = ("flashtile", "eager", "sdpa-flash", "sdpa-cudnn", "flex")
MODELS = ("gpt", "hf-gpt2", "hf-llama")
# transformers' attn_implementation for each --attention (SDPA's backend is forced around the model's call)
HF_ATTENTION = {"flashtile": "flashtile", "eager": "eager", "sdpa-flash": "sdpa", "sdpa-cudnn": "sdpa",
                "flex": "flex_attention"}
# dense bf16 peak of the GPU, TFLOP/s, from NVIDIA's datasheets (the sparse figures are twice these)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
VOCAB = 256
EXIT_OOM = 3
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


# ---------------------------------------------------------------- data

@functools.lru_cache(maxsize=1)
def load_corpus(limit_bytes: int) -> torch.Tensor:
    """The standard library's ``*.py`` files in sorted path order, concatenated, as a
    uint8 tensor of at least ``limit_bytes`` (whole files) or the whole library;
    read once per process."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        size += len(data)
        if size >= limit_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def sample_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator, device):
    """``batch_size`` random windows of ``data``: inputs and next-byte targets, int64
    ``(batch_size, seq_len)`` each."""
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long().to(device)
    return windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------- attention cores
# Each takes q, k, v as (batch, seqlen, heads, head_dim) and returns causal attention in that layout.

def eager_attention(q, k, v):
    """Standard attention, the score matrix materialised (as transformers' eager path):
    softmax in fp32, the products in the inputs' dtype."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    seq_len = q.shape[2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
    probs = torch.softmax(scores.float().masked_fill(future, float("-inf")), dim=-1).to(v.dtype)
    return (probs @ v).transpose(1, 2)


def _sdpa_backend(attention: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[attention]


def sdpa_attention(attention: str):
    """PyTorch's ``scaled_dot_product_attention`` with one backend forced (an error if
    that backend cannot run the call)."""
    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backend(attention)

    def attend(q, k, v):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
        return out.transpose(1, 2)
    return attend


def flex_causal_attention(seq_len: int, device, compile_it: bool):
    """FlexAttention with a causal block mask built once for ``seq_len``; compiled here
    unless the whole model is (FlexAttention is only fast compiled)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seq_len, seq_len,
                                   device=device)
    flex = torch.compile(flex_attention, dynamic=False) if compile_it else flex_attention

    def attend(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)
    return attend


def attention_core(attention: str, seq_len: int, device, model_compiled: bool):
    """The attention function for ``--attention`` (None: flashtile's own module forward)."""
    if attention == "flashtile":
        return None
    if attention == "eager":
        return eager_attention
    if attention == "flex":
        return flex_causal_attention(seq_len, device, compile_it=not model_compiled)
    return sdpa_attention(attention)


# ---------------------------------------------------------------- the model

class CausalSelfAttention(MultiheadAttention):
    """flashtile's ``MultiheadAttention`` (causal, rotary over the whole head); with
    ``core`` set, the same projections and rotary around another attention function."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads, causal=True, rotary_emb_dim=width // heads)
        self.core = None

    def forward(self, x):
        if self.core is None:
            return super().forward(x)
        q, k, v = self.Wqkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        q, k = self.rotary_emb(q, k)
        return self.out_proj(self.core(q, k, v).flatten(-2))


class Block(nn.Module):
    """A pre-LayerNorm transformer block (GPT-2)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """GPT-2 style decoder over bytes; ``forward(tokens)`` returns the logits."""

    def __init__(self, config: Config):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, config.width)
        self.blocks = nn.ModuleList(Block(config.width, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2
        self.checkpointing = False
        # GPT-2's initialisation: N(0, 0.02), the projections into the residual stream scaled by depth
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * config.layers) if name.endswith(("out_proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def set_attention(self, core) -> None:
        """Every layer's attention core (None: flashtile)."""
        for block in self.blocks:
            block.attn.core = core

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            # activation checkpointing: keep only each block's input, recompute the rest in backward
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing and self.training else block(x)
        return self.head(self.norm(x))


class HFCausalLM(nn.Module):
    """A transformers causal LM whose ``forward(tokens)`` returns the logits; SDPA's
    backend forced around the call for ``sdpa-flash`` / ``sdpa-cudnn``."""

    def __init__(self, model, attention: str):
        super().__init__()
        self.model = model
        self.backend = _sdpa_backend(attention) if attention.startswith("sdpa-") else None

    def forward(self, tokens):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.backend) if self.backend is not None else contextlib.nullcontext():
            return self.model(input_ids=tokens, use_cache=False).logits


def build_model(args) -> tuple[nn.Module, Config]:
    """The model of ``--model`` / ``--config`` (initialised on the CPU from ``--seed``, so
    every backend starts from the same weights), on ``--device``."""
    config = CONFIGS[args.config]
    torch.manual_seed(args.seed)
    if args.model == "gpt":
        model = GPT(config)
        model.checkpointing = args.checkpoint
        model.set_attention(attention_core(args.attention, args.seq_len, args.device, args.compile))
        return model.to(args.device), config
    import transformers

    if args.attention == "flashtile":
        import flashtile.integrations.transformers  # noqa: F401  registers attn_implementation="flashtile"
    if args.model == "hf-gpt2":
        hf_config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=args.seq_len, n_embd=config.width,
                                            n_layer=config.layers, n_head=config.heads, resid_pdrop=0.0,
                                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    else:
        hf_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=config.width,
                                             intermediate_size=4 * config.width, num_hidden_layers=config.layers,
                                             num_attention_heads=config.heads, max_position_embeddings=args.seq_len,
                                             tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation=HF_ATTENTION[args.attention])
    if args.checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return HFCausalLM(model, args.attention).to(args.device), config


# ---------------------------------------------------------------- FLOPs and MFU

def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_step(params: int, config: Config, batch_size: int, seq_len: int, grad_accum: int) -> float:
    """Model FLOPs of one optimizer step: 6 x params x tokens, plus causal attention's
    forward+backward per layer as flashtile's benchmarks count it
    (3.5 x 4·b·h·s²·d, halved for causal)."""
    tokens = batch_size * seq_len * grad_accum
    head_dim = config.width // config.heads
    attention = 3.5 * 4 * batch_size * config.heads * seq_len**2 * head_dim / 2 * config.layers * grad_accum
    return 6.0 * params * tokens + attention


def peak_tflops_of(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak (TFLOP/s) if it is one this example knows, else None."""
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: the most memory PyTorch's allocator held; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if platform.system() == "Darwin" else rss / 2**10


# ---------------------------------------------------------------- arguments

def _number(kind, minimum, strict: bool):
    """An argparse type: a ``kind`` value above (``strict``) or at least ``minimum``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n int' if kind is int else ' number'}")
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'above' if strict else 'at least'} {minimum}")
        return value
    return parse


positive_int = _number(int, 0, strict=True)
nonnegative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The example's arguments (``prog``: the name shown in usage and errors)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=tuple(CONFIGS), default="small",
                   help="model size: tiny (2x64, CPU seconds), small (GPT-2 small: 12x768), medium (24x1024)")
    p.add_argument("--model", choices=MODELS, default="gpt",
                   help="gpt: this file's model on flashtile.nn; hf-gpt2 / hf-llama: transformers' models")
    p.add_argument("--attention", choices=ATTENTIONS, default="flashtile",
                   help="the attention: flashtile, eager (materialised), sdpa-flash / sdpa-cudnn (SDPA with that "
                        "backend forced), flex (FlexAttention)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--steps", type=positive_int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=None, help="sequences per micro-batch "
                   "(default: the config's)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default: the config's)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the config's)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="bf16 autocast or fp32 (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA yes, on the CPU no)")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing, one block at a time")
    p.add_argument("--eval-every", type=nonnegative_int, default=0,
                   help="validation loss every N steps and after the last (0: none)")
    p.add_argument("--eval-batches", type=positive_int, default=4, help="held-out batches per validation")
    p.add_argument("--timing-warmup", type=nonnegative_int, default=2,
                   help="first steps left out of tokens/s and step time (compilation, allocator warm-up)")
    p.add_argument("--peak-tflops", type=positive_float, default=None,
                   help="the GPU's dense bf16 peak for MFU (default: known for H100, H200, A100)")
    p.add_argument("--corpus-mb", type=positive_float, default=32.0, help="read about this much source text (whole files, at most the whole library)")
    p.add_argument("--seed", type=int, default=0, help="weights and data order")
    p.add_argument("--log", type=pathlib.Path, default=None, help="write the run's JSON log here")
    p.add_argument("--plot", type=pathlib.Path, default=None, help="write the loss curve here (.png, .pdf or .svg; "
                                                                  "needs matplotlib)")
    return p


def _availability_error(attention: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why ``attention`` cannot train causal attention of ``dtype`` on ``device``, or None:
    a tiny call of it with inputs that require grad, as the model would make it."""
    if attention in ("flashtile", "eager"):
        return None
    q = torch.randn(1, 16, 1, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        if attention == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            with warnings.catch_warnings():  # uncompiled: a warning that it is slow, fine for a probe
                warnings.simplefilter("ignore")
                flex_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2))
        else:
            sdpa_attention(attention)(q, q, q)
    except (ImportError, RuntimeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = "FlexAttention" if attention == "flex" else f"PyTorch SDPA's {attention[5:]} backend"
        return f"{what} cannot train {str(dtype)[6:]} causal attention on {device.type}: {first}"
    return None


def resolve_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse and check every argument, filling the device-dependent defaults; a bad
    value is ``parser.error`` (exit code 2) before anything is written."""
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"argument --device: {args.device!r} is not a device (cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: {args.device!r} is not cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"argument --device: {args.device!r}, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {args.device!r}, but there are {torch.cuda.device_count()} GPUs")
    args.device = device
    config = CONFIGS[args.config]
    args.batch_size = args.batch_size or config.batch_size
    args.seq_len = args.seq_len or config.seq_len
    args.lr = args.lr or config.lr
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    if args.model != "gpt":
        try:
            import transformers  # noqa: F401
        except ImportError:
            parser.error(f"argument --model: {args.model} needs transformers (pip install flashtile[transformers])")
    if args.plot is not None and args.plot.suffix.lower() not in PLOT_SUFFIXES:
        parser.error(f"argument --plot: {str(args.plot)!r} must end in {', '.join(PLOT_SUFFIXES)}")
    for name in ("log", "plot"):
        path = getattr(args, name)
        if path is not None and path.is_dir():
            parser.error(f"argument --{name}: {str(path)!r} is a directory, not a file")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    reason = _availability_error(args.attention, device, dtype, config.width // config.heads)
    if reason:
        parser.error(f"argument --attention: {args.attention} is not available here: {reason}")
    return args


# ---------------------------------------------------------------- training

def _progress(enabled: bool):
    """A rich progress bar on a terminal; off a terminal, the caller prints lines."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"), transient=False, disable=not enabled)


def train(args, train_data: torch.Tensor, val_data: torch.Tensor) -> dict:
    """Run the training; returns the log (see the module docstring for its fields)."""
    device = args.device
    model, config = build_model(args)
    params = count_parameters(model)
    step_model = torch.compile(model) if args.compile else model
    # fused AdamW on CUDA: one kernel for all parameters
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    warmup = max(1, min(100, args.steps // 10))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))))

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    train_gen = torch.Generator().manual_seed(args.seed)
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val_set = [sample_batch(val_data, args.batch_size, args.seq_len, val_gen, device)
               for _ in range(args.eval_batches if args.eval_every else 0)]

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        losses = []
        for x, y in val_set:
            with autocast():
                losses.append(F.cross_entropy(step_model(x).float().flatten(0, 1), y.flatten()).item())
        model.train()
        return sum(losses) / len(losses)

    flops = flops_per_step(params, config, args.batch_size, args.seq_len, args.grad_accum)
    peak = args.peak_tflops or (peak_tflops_of(device) if device.type == "cuda" else None)
    settings = {k: str(v) if isinstance(v, (pathlib.Path, torch.device)) else v for k, v in vars(args).items()}
    log = {
        "settings": settings,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} "
                                                                                    "threads)",
        "versions": {"torch": torch.__version__, "flashtile": flashtile.__version__, "python": platform.python_version()},
        "model": {"layers": config.layers, "width": config.width, "heads": config.heads,
                  "head_dim": config.width // config.heads, "parameters": params},
        "tokens_per_step": args.batch_size * args.seq_len * args.grad_accum,
        "flops_per_step": flops,
        "peak_tflops": peak,
        "status": "running", "loss": [], "val": [], "step_time_s": [],
    }
    print(f"{args.model} {args.config}: {params / 1e6:.1f}M parameters, {args.attention} attention, "
          f"{args.batch_size} x {args.seq_len} tokens x {args.grad_accum}, {args.precision}, {log['device']}"
          f"{', compiled' if args.compile else ''}{', checkpointing' if args.checkpoint else ''}", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    interactive = sys.stdout.isatty()
    every = max(1, args.steps // 10)
    with _progress(interactive) as progress:
        task = progress.add_task("train", total=args.steps, status="")
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            sync()
            start = time.perf_counter()
            total = 0.0
            for _ in range(args.grad_accum):
                x, y = sample_batch(train_data, args.batch_size, args.seq_len, train_gen, device)
                with autocast():
                    loss = F.cross_entropy(step_model(x).float().flatten(0, 1), y.flatten()) / args.grad_accum
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            log["step_time_s"].append(time.perf_counter() - start)
            log["loss"].append(total)
            status = f"loss {total:.4f}  {log['tokens_per_step'] / log['step_time_s'][-1]:,.0f} tok/s"
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step == args.steps - 1):
                log["val"].append({"step": step + 1, "loss": val_loss()})
                status += f"  val {log['val'][-1]['loss']:.4f}"
            progress.update(task, advance=1, status=status)
            if not interactive and ((step + 1) % every == 0 or step == args.steps - 1):
                print(f"step {step + 1}/{args.steps}  {status}", flush=True)
    log["status"] = "ok"
    summarize(log, device, peak)
    return log


def summarize(log: dict, device: torch.device, peak: float | None) -> None:
    """Add throughput, step time, memory and MFU over the timed steps to ``log``."""
    warm = log["settings"]["timing_warmup"]
    timed = log["step_time_s"][warm:] or log["step_time_s"]
    step_time = statistics.median(timed) if timed else None
    log["timed_steps"] = len(timed)
    log["step_time_median_s"] = step_time
    log["tokens_per_s"] = log["tokens_per_step"] / step_time if step_time else None
    log["achieved_tflops"] = log["flops_per_step"] / step_time / 1e12 if step_time else None
    log["peak_memory_mib"] = peak_memory_mib(device)
    log["peak_memory_kind"] = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                               else "process peak resident set (ru_maxrss)")
    if device.type != "cuda":
        log["mfu"], log["mfu_note"] = None, "not applicable on a CPU"
    elif peak is None:
        log["mfu"], log["mfu_note"] = None, "unknown GPU peak: pass --peak-tflops"
    else:
        log["mfu"] = log["achieved_tflops"] / peak if step_time else None
        log["mfu_note"] = f"against {peak:g} TFLOP/s dense bf16"


def save_plot(log: dict, path: pathlib.Path) -> bool:
    """The loss curve (training per step, validation points); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = log["settings"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(log["loss"]) + 1), log["loss"], label="train", alpha=0.8)
    if log["val"]:
        ax.plot([v["step"] for v in log["val"]], [v["loss"] for v in log["val"]], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(f"{s['model']} {s['config']}, {s['attention']} attention, {s['batch_size']} x {s['seq_len']} "
                 f"({log['device']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _print_summary(log: dict) -> None:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)
    mfu = "n/a (" + log["mfu_note"] + ")" if log["mfu"] is None else f"{log['mfu']:.1%} ({log['mfu_note']})"
    print(f"done: {fmt(log['tokens_per_s'], ',.0f')} tokens/s, {fmt(log['step_time_median_s'], '.4f')} s/step "
          f"(median of {log['timed_steps']}), peak memory {log['peak_memory_mib']:,.0f} MiB, MFU {mfu}; "
          f"loss {log['loss'][0]:.4f} -> {log['loss'][-1]:.4f}"
          + (f", val {log['val'][-1]['loss']:.4f}" if log["val"] else ""), flush=True)


def _write(log: dict, args) -> None:
    if args.log is not None:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        args.log.write_text(json.dumps(log, indent=1))
        print(f"wrote {args.log}")
    if args.plot is not None and log["loss"]:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {args.plot}" if save_plot(log, args.plot) else "matplotlib not installed: no plot")


def main(argv=None, prog: str | None = None) -> int:
    """Parse ``argv``, train, write ``--log`` / ``--plot``; returns the exit code."""
    parser = build_parser(prog)
    args = resolve_args(parser, argv)
    data = load_corpus(int(args.corpus_mb * 2**20))
    split = int(len(data) * 0.95)
    train_data, val_data = data[:split], data[split:]
    if args.seq_len >= min(len(train_data), len(val_data)):
        parser.error(f"argument --seq-len: {args.seq_len} is not shorter than the held-out split "
                     f"({len(val_data)} bytes of {len(data)}): raise --corpus-mb")
    try:
        log = train(args, train_data, val_data)
    except torch.cuda.OutOfMemoryError as exc:
        settings = {k: str(v) if isinstance(v, (pathlib.Path, torch.device)) else v for k, v in vars(args).items()}
        log = {"settings": settings, "status": "oom", "error": str(exc).splitlines()[0] if str(exc) else "",
               "loss": []}
        print(f"out of GPU memory: {args.attention}, {args.batch_size} x {args.seq_len}", flush=True)
        _write(log, args)
        return EXIT_OOM
    _print_summary(log)
    _write(log, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
