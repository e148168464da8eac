"""attn_implementation="flashtile" in Hugging Face transformers models (tiny
random-init models built from configs; no weights are downloaded).

Every family is checked against the same model in fp64 with eager attention
(the oracle) with the accuracy rule: flashtile's error at most 2x (logits) or
3x (gradients) the error of eager attention in the same dtype, plus a
rounding floor. On a CPU the models run the tiled path, as on a user's
CPU-only machine; with the ``gpu`` marker, on a GPU in bf16."""

import copy

import pytest
import torch
from helpers import rounding_floor

transformers = pytest.importorskip("transformers")
import flashtile.integrations.transformers  # noqa: E402,F401  registers "flashtile"

VOCAB = 128


def _config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16)
    if family == "mistral":  # a window shorter than the sequences
        return transformers.MistralConfig(**common, sliding_window=7)
    if family == "gemma2":  # softcapped scores, every other layer a sliding window
        return transformers.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                                         final_logit_softcapping=30.0, sliding_window=7)
    if family == "gpt_oss":  # attention sinks, a mixture of experts, every other layer a sliding window
        # (experts looped in plain PyTorch: the grouped matmuls take no fp64, which the oracle runs in)
        return transformers.GptOssConfig(**common, head_dim=16, sliding_window=7, num_local_experts=4,
                                         num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                                         experts_implementation="eager")
    if family == "deepseek_v3":  # multi-head latent attention: q/k head dim 24, v head dim 12
        return transformers.DeepseekV3Config(**(common | dict(num_key_value_heads=4)), moe_intermediate_size=32,
                                             n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                             first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
                                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                                             experts_implementation="eager")
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt2", "gpt_oss", "deepseek_v3"]


def _models(family: str, device: str, dtype: torch.dtype):
    """The same weights with flashtile, eager attention in ``dtype``, and eager in fp64 (the oracle)."""
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager").eval()
    for module in base.modules():
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            # sinks of every size, some larger than the scores (initialised near 0)
            torch.nn.init.normal_(module.sinks, std=2.0)
    models = {}
    for name, impl, dt in [("flashtile", "flashtile", dtype), ("eager", "eager", dtype), ("ref", "eager", torch.float64)]:
        model = copy.deepcopy(base).to(device, dt)
        model.set_attn_implementation(impl)
        models[name] = model
    assert models["flashtile"].config._attn_implementation == "flashtile"
    return models


def _batch(kind: str, device: str):
    """(input_ids, attention_mask, position_ids, segments): a padded batch (right and left
    padding, positions counted over the real tokens) or a packed row (three sequences,
    positions restarting, no padding); ``segments`` the (row, start, end) of each sequence."""
    gen = torch.Generator().manual_seed(1)
    if kind == "padded":
        ids = torch.randint(0, VOCAB, (3, 21), generator=gen)
        mask = torch.ones(3, 21, dtype=torch.long)
        mask[1, 15:] = 0
        mask[2, :9] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        segments = [(0, 0, 21), (1, 0, 15), (2, 9, 21)]
        return ids.to(device), mask.to(device), positions.to(device), segments
    lengths = [9, 14, 6]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    starts = [0, 9, 23, 29]
    return ids.to(device), None, positions.to(device), [(0, a, b) for a, b in zip(starts, starts[1:])]


def _segment_logits(model, ids, segments):
    """Logits of each sequence run on its own, no padding (the oracle's view of a batch)."""
    return [model(input_ids=ids[r:r + 1, a:b]).logits[0] for r, a, b in segments]


def _batch_logits(model, ids, mask, positions, segments):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return [logits[r, a:b] for r, a, b in segments]


def _loss(segment_logits, ids, segments):
    """Mean next-token loss over the pairs inside each sequence."""
    total = sum(torch.nn.functional.cross_entropy(lg[:-1].double(), ids[r, a + 1:b], reduction="sum")
                for lg, (r, a, b) in zip(segment_logits, segments))
    return total / sum(b - a - 1 for _, a, b in segments)


def _check(name, ours, low, ref, dtype, factor):
    err, base = (ours.double() - ref).abs().max().item(), (low.double() - ref).abs().max().item()
    floor = rounding_floor(ref, dtype, magnitude=ref.abs().max().item())
    assert err <= factor * base + floor, f"{name}: error {err:.3e} vs eager {base:.3e} (floor {floor:.1e})"


def _run_logits(family, kind, device, dtype):
    models = _models(family, device, dtype)
    ids, mask, positions, segments = _batch(kind, device)
    with torch.no_grad():
        ours = torch.cat(_batch_logits(models["flashtile"], ids, mask, positions, segments))
        low = torch.cat(_segment_logits(models["eager"], ids, segments))
        ref = torch.cat(_segment_logits(models["ref"], ids, segments))
    _check("logits", ours, low, ref, dtype, 2.0)


def _run_training_step(family, kind, device, dtype):
    models = _models(family, device, dtype)
    ids, mask, positions, segments = _batch(kind, device)
    grads = {}
    for name, model in models.items():
        model.train()
        model.zero_grad()
        logits = (_batch_logits(model, ids, mask, positions, segments) if name == "flashtile"
                  else _segment_logits(model, ids, segments))
        _loss(logits, ids, segments).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["flashtile"].keys() == grads["ref"].keys()
    for n in grads["ref"]:
        _check(f"d{n}", grads["flashtile"][n], grads["eager"][n], grads["ref"][n], dtype, 3.0)


def _run_generate(family, device, dtype):
    models = _models(family, device, dtype)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as generate() wants
    tokens = {name: models[name].generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                          pad_token_id=0)[:, 11:] for name in ("flashtile", "eager")}
    assert torch.equal(tokens["flashtile"], tokens["eager"])


@pytest.fixture
def tiled(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors: the tiled path, as a user's CPU runs it


@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits(tiled, family, kind):
    _run_logits(family, kind, "cpu", torch.float32)


@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step(tiled, family, kind):
    _run_training_step(family, kind, "cpu", torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate(tiled, family):
    _run_generate(family, "cpu", torch.float32)


def test_flash_attention_loader_finds_flashtile():
    # transformers' FlashAttention path loads an implementation's functions by name
    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

    import flashtile

    (dense, varlen, kvcache, _, _), _ = lazy_import_flash_attention("flashtile")
    # flashtile's functions, taking attention sinks by transformers' name for them (s_aux)
    assert (dense.__wrapped__, varlen.__wrapped__) == (flashtile.flash_attn_func, flashtile.flash_attn_varlen_func)
    assert kvcache is not None  # flashtile.flash_attn_with_kvcache, behind torch.compiler.disable


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_gpu(family, kind):
    _run_logits(family, kind, "cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gpu(family, kind):
    _run_training_step(family, kind, "cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_gpu(family):
    _run_generate(family, "cuda", torch.float32)
