"""A character-level (byte-level) autoregressive transformer with cosine-similarity
attention, trained on the Python standard library's source text.

Every attention layer is ``flashtile.flash_cosine_sim_attention`` (causal, fixed
scale, l2-normalised queries and keys: no running row max in the kernel).
Defaults: dim 512, depth 8, 8 heads of 64, sequences of 8192 bytes.

    # GPU (bf16 autocast)
    python examples/train_cosine_sim.py --steps 300 --out results/train_cosine_sim
    # CPU smoke test
    python examples/train_cosine_sim.py --seqlen 128 --dim 64 --depth 2 --batch 2 --steps 5 --out /tmp/tcs

The corpus is every ``*.py`` file under ``sysconfig.get_paths()['stdlib']``,
concatenated in sorted path order, bytes as tokens (256 symbols); the last 5%
is held out for validation. With ``--out DIR`` the loss curve goes to
``DIR/loss.json`` and (if matplotlib is installed) ``DIR/loss.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from flashtile import flash_cosine_sim_attention

# the same corpus as the GPT example beside this file
from train_gpt import load_corpus


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, scale: float):
        super().__init__()
        self.heads, self.scale = heads, scale
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (b, h, n, d)
        out = flash_cosine_sim_attention(q, k, v, scale=self.scale, causal=True)       # (b, h, n, d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, scale: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, scale)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, max_seqlen: int, scale: float):
        super().__init__()
        self.tok = nn.Embedding(256, dim)
        self.pos = nn.Embedding(max_seqlen, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, scale) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batches(data: torch.Tensor, batch: int, seqlen: int, device, generator):
    starts = torch.randint(0, len(data) - seqlen - 1, (batch,), generator=generator)
    seq = torch.stack([data[s:s + seqlen + 1] for s in starts.tolist()]).long().to(device)
    return seq[:, :-1], seq[:, 1:]


@torch.no_grad()
def generate(model, prime: torch.Tensor, length: int, seqlen: int, autocast, temperature: float = 0.8):
    tokens = prime[None]
    for _ in range(length):
        with autocast():
            logits = model(tokens[:, -seqlen:])[:, -1].float()
        nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)
        tokens = torch.cat([tokens, nxt], dim=1)
    return bytes(tokens[0, len(prime):].tolist()).decode("utf-8", errors="replace")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--scale", type=float, default=8.0, help="fixed attention temperature")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-batches", type=int, default=4)
    p.add_argument("--generate", type=int, default=512, help="bytes to sample at the end")
    p.add_argument("--corpus-mb", type=float, default=64.0, help="read at most this much source text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for loss.json and loss.png")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    data = load_corpus(int(args.corpus_mb * 2**20))
    split = int(len(data) * 0.95)
    train, val = data[:split], data[split:]
    print(f"corpus: {len(data) / 2**20:.1f} MiB of Python source ({len(train)} train / {len(val)} val bytes)")

    model = Transformer(args.dim, args.depth, args.heads, args.seqlen, args.scale).to(device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, dim {args.dim}, "
          f"depth {args.depth}, heads {args.heads} x {args.dim // args.heads}, seqlen {args.seqlen}, {device}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, min(100, args.steps // 10))

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))))

    gen_train, gen_val = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    val_set = [batches(val, args.batch, args.seqlen, device, gen_val) for _ in range(args.val_batches)]

    @torch.no_grad()
    def val_loss():
        model.eval()
        losses = []
        for x, y in val_set:
            with autocast():
                losses.append(F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).item())
        model.train()
        return sum(losses) / len(losses)

    history = dict(args=vars(args), device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   train=[], val=[])
    start = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = batches(train, args.batch, args.seqlen, device, gen_train)
        with autocast():
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        history["train"].append((step, loss.item()))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  train loss {loss.item():.4f}  ({loss.item() / math.log(2):.3f} bits/byte)  "
                  f"{time.time() - start:.1f}s")
        if (step + 1) % args.val_every == 0 or step == args.steps - 1:
            vl = val_loss()
            history["val"].append((step, vl))
            print(f"step {step:5d}  val loss {vl:.4f}  ({vl / math.log(2):.3f} bits/byte)")
    history["seconds"] = time.time() - start

    prime = val[:128].long().to(device)
    sample = generate(model, prime, args.generate, args.seqlen, autocast)
    print("-" * 80)
    print(bytes(prime.tolist()).decode("utf-8", errors="replace") + "|>>>|" + sample)
    print("-" * 80)
    history["sample"] = sample

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "loss.json"), "w") as f:
            json.dump(history, f, indent=1)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
        else:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.plot(*zip(*history["train"]), label="train", alpha=0.7)
            if history["val"]:
                ax.plot(*zip(*history["val"]), "o-", label="validation")
            ax.set_xlabel("step")
            ax.set_ylabel("cross-entropy (nats/byte)")
            ax.set_title(f"cosine-sim attention, seqlen {args.seqlen}, dim {args.dim}, depth {args.depth} "
                         f"({history['device']})", fontsize=9)
            ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(args.out, "loss.png"), dpi=120)
        print(f"wrote {args.out}/loss.json")


if __name__ == "__main__":
    main()
