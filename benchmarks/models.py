"""A transformers Llama trained with attn_implementation="sdpa": PyTorch's own flash
kernels against flashtile's behind SDPA's flash backend (activated), and with
attn_implementation="flashtile"; beside them the attention alone at the model's
shapes, from which the expected model speed-up follows (Amdahl: the attention's
share of the step, sped up by the kernel ratio).

    python benchmarks/models.py --seqlen 4096 --batch 2 --layers 8 --out bench_results/models.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib

import torch
from triton.testing import do_bench

import flashtile  # noqa: F401  registers "flashtile" with torch.nn.attention
import flashtile.integrations.transformers  # noqa: F401  and with transformers


def model_step(impl: str, args, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // args.head_dim,
                         num_key_value_heads=args.hidden // args.head_dim // args.group,
                         max_position_embeddings=args.seqlen)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).to("cuda", dtype)
    ids = torch.randint(0, 32000, (args.batch, args.seqlen), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    return step, config


def attention_step(args, dtype):
    heads = args.hidden // args.head_dim
    q = torch.randn(args.batch, heads, args.seqlen, args.head_dim, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(args.batch, heads // args.group, args.seqlen, args.head_dim, device="cuda", dtype=dtype,
                        requires_grad=True) for _ in range(2))

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(torch.ones_like(out))

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=4, help="query heads per kv head")
    ap.add_argument("--out", default="bench_results/models.json")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtile.integrations.sdpa_flash import enabled

    dtype = torch.bfloat16
    rows = {}
    for name, impl, activate in [("sdpa, PyTorch flash", "sdpa", False), ("sdpa, flashtile activated", "sdpa", True),
                                 ("attn_implementation=flashtile", "flashtile", False)]:
        step, _ = model_step(impl, args, dtype)
        with enabled() if activate else contextlib.nullcontext(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            rows[name] = do_bench(step, warmup=3, rep=20, return_mode="median")
        torch.cuda.empty_cache()
    attn = attention_step(args, dtype)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        attn_torch = do_bench(attn, warmup=5, rep=50, return_mode="median")
        with enabled():
            attn_ours = do_bench(attn, warmup=5, rep=50, return_mode="median")
    base = rows["sdpa, PyTorch flash"]
    share = args.layers * attn_torch / base  # the attention's share of the step with PyTorch's kernels
    ratio = attn_torch / attn_ours
    expected = 1 / (1 - share + share / ratio)
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, args=vars(args), step_ms=rows,
                  attention_ms=dict(pytorch_flash=attn_torch, flashtile=attn_ours), attention_share=share,
                  kernel_ratio=ratio, expected_speedup=expected,
                  measured_speedup={k: base / v for k, v in rows.items()})
    print(json.dumps(result, indent=1))
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
