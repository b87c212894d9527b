"""Tiny random MoE models built from the families' REAL transformers config classes.

For tests, examples and benchmarks: hidden 64, 2 layers, 8 experts, top-2 by default.
The config kwargs per family are the minimum each class needs to build at that size.
"""
from __future__ import annotations

import torch

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
_DEEPSEEK = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=4, topk_group=2,
                 first_k_dense_replace=0, n_shared_experts=1)

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(_DEEPSEEK, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=16)),
    "glm4_moe": ("Glm4MoeConfig", dict(_DEEPSEEK)),
    "dots1": ("Dots1Config", dict(_DEEPSEEK)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(num_local_experts=8, num_experts_per_tok=2,
                                                        shared_intermediate_size=32)),
    "phimoe": ("PhimoeConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "llama4_text": ("Llama4TextConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size_mlp=64,
                                             head_dim=16, interleave_moe_layer_step=1)),
    "minimax": ("MiniMaxConfig", dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(num_experts=8, moe_topk=2, head_dim=16)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32,
                                                moe_layer_start_index=0)),
}


def tiny_config(family: str, **overrides):
    import transformers

    class_name, kwargs = TINY_CONFIGS[family]
    return getattr(transformers, class_name)(**{**_COMMON, **kwargs, **overrides})


def build_tiny_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised causal LM of `family` (eval mode, float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    return model.eval()


# OLMoE-1B-7B's real width (hidden 2048, 64 experts of 1024, top-8, 16 heads), few layers, a small vocabulary
REAL_WIDTH = dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)


def build_real_width_checkpoint(out_dir, num_layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                                max_shard_size: str = "300MB", tokenizer_dir=None, layout: str = "hub", **overrides):
    """A random OLMoE at OLMoE-1B-7B's real width, saved as a sharded checkpoint in `dtype`.

    layout "hub": what save_pretrained writes (per-expert keys, as checkpoints on the Hub); "native": the
    model's own fused keys (as GRIP Studio saves runs). Uses the demo's tokenizer (vocabulary 1024) unless
    `tokenizer_dir` is given, so texts can be traced and probed. 1 layer: 0.42 B parameters, 0.85 GB in
    bfloat16; 2 layers: 0.84 B, 1.7 GB. Returns the output folder.
    """
    from pathlib import Path

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .load import DEMO_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or DEMO_MODEL_DIR), local_files_only=True)
    cfg = transformers.OlmoeConfig(**{**REAL_WIDTH, "num_hidden_layers": num_layers, "vocab_size": len(tok),
                                      "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                                      "bos_token_id": None, "tie_word_embeddings": False, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    out = Path(out_dir)
    if layout == "native":
        from .delta import save_native

        save_native(model, out, tok, max_shard_bytes=int(max_shard_size.rstrip("MB")) * 10**6)
    else:
        model.save_pretrained(out, max_shard_size=max_shard_size)
        tok.save_pretrained(out)
    del model
    return out


def perturb_checkpoint(src, dst, router_scale: float = 0.5, expert_rows: int = 1, seed: int = 0):
    """Copy checkpoint `src` to `dst`, then change its routers and expert 0 of every layer: an "unlearned" twin.

    Only the shards holding a changed tensor are rewritten (one shard in memory at a time); the
    others are copied byte for byte. Router weights get Gaussian noise of `router_scale` times their
    std; expert 0's first `expert_rows` rows of every expert tensor are negated. For tests of the
    in-place diagnose path at real width.
    """
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(dst.glob("*.safetensors")):
        tensors = load_file(str(shard))
        hit = False
        for key, t in tensors.items():
            if key.endswith("mlp.gate.weight"):                                   # the router (E, d)
                noise = torch.randn(t.shape, generator=gen) * float(t.float().std()) * router_scale
                tensors[key] = (t.float() + noise).to(t.dtype)
                hit = True
            elif ".experts.0." in key or (key.endswith(("gate_up_proj", "down_proj")) and ".experts." in key
                                          and t.dim() == 3):
                t = t.clone()
                (t[:expert_rows] if ".experts.0." in key else t[0, :expert_rows]).neg_()
                tensors[key] = t
                hit = True
        if hit:
            save_file(tensors, str(shard), metadata={"format": "pt"})
        del tensors
    return dst
