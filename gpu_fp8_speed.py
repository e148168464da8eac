import json, os, sys, torch, triton
from flashtile import flash_attn_func
from flashtile.options import FP8_MAX, FP8_SCALE_BLOCK
rows = []
print(torch.cuda.get_device_name())
for causal in (False, True):
    for seqlen in (1024, 2048, 4096, 8192, 16384):
        d, h = 128, 16
        b = 16384 // seqlen
        q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * b * h * seqlen * seqlen * d / (2 if causal else 1)
        t_bf16 = triton.testing.do_bench(lambda: flash_attn_func(q, k, v, causal=causal), warmup=50, rep=200)
        row = dict(causal=causal, seqlen=seqlen, bf16=flops / t_bf16 / 1e9)
        for blocks in (False, True):
            def quant(x):
                amax = x.float().abs().amax((1, 3)) if not blocks else x.float().abs().reshape(b, seqlen // FP8_SCALE_BLOCK, FP8_SCALE_BLOCK, h, d).amax((2, 4)).transpose(1, 2)
                ds = (amax / FP8_MAX).contiguous()
                sc = ds[:, None, :, None] if not blocks else ds.transpose(1, 2).repeat_interleave(FP8_SCALE_BLOCK, 1)[..., None]
                return (x.float() / sc).to(torch.float8_e4m3fn), ds
            (q8, qd), (k8, kd) = quant(q), quant(k)
            blocks_v = blocks; blocks = False; v8, vd = quant(v); blocks = blocks_v
            try:
                out = flash_attn_func(q8, k8, v8, causal=causal, q_descale=qd, k_descale=kd, v_descale=vd)
                ref = flash_attn_func(q, k, v, causal=causal)
                err = (out.float() - ref.float()).abs().max().item()
                t = triton.testing.do_bench(lambda: flash_attn_func(q8, k8, v8, causal=causal, q_descale=qd, k_descale=kd, v_descale=vd), warmup=50, rep=200)
                row["fp8_block" if blocks else "fp8_head"] = flops / t / 1e9
                row["err_" + ("block" if blocks else "head")] = err
            except Exception as e:
                row["error"] = repr(e)[:300]
        print(row, flush=True)
        rows.append(row)
json.dump(rows, open(os.environ.get("OUT", ".") + "/fp8_speed.json", "w"))
