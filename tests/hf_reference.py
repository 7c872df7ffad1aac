"""Builders for transformers' JanusForConditionalGeneration with random weights, and writers of both real
checkpoint layouts (transformers' save_pretrained, and the official DeepSeek names/config/.bin)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from janus_rt.verify import hf_janus

SMALL_CONFIGS = {
    # name: (text, vision, vq) overrides. Vary widths, heads, head_dim, layers, vocab, codebook, image size.
    "a": dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=4, inter=96, v_width=64, v_layers=2, v_heads=2,
              image=32, patch=8, vq_ch=32, vq_mult=(1, 1, 2, 2), codebook=128, z=32, tie=False),
    "b": dict(vocab=700, hidden=96, layers=3, heads=2, kv_heads=2, inter=160, v_width=96, v_layers=1, v_heads=3,
              image=48, patch=8, vq_ch=32, vq_mult=(1, 2, 2, 2), codebook=300, z=64, tie=True),
    "c": dict(vocab=384, hidden=128, layers=1, heads=8, kv_heads=8, inter=64, v_width=32, v_layers=2, v_heads=1,
              image=32, patch=4, vq_ch=64, vq_mult=(1, 2, 2), codebook=64, z=32, tie=False),
}


def hf_config(c: dict):
    JanusConfig = hf_janus().JanusConfig

    grid = c["image"] // c["patch"]
    text = dict(model_type="llama", vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                tie_word_embeddings=c["tie"], bos_token_id=c["vocab"] - 8, eos_token_id=c["vocab"] - 7,
                pad_token_id=c["vocab"] - 6)
    vision = dict(hidden_size=c["v_width"], num_hidden_layers=c["v_layers"], num_attention_heads=c["v_heads"],
                  image_size=c["image"], patch_size=c["patch"], projection_dim=c["hidden"],
                  num_image_tokens=grid * grid)
    vq = dict(embed_dim=8, num_embeddings=c["codebook"], base_channels=c["vq_ch"],
              channel_multiplier=list(c["vq_mult"]), latent_channels=c["z"], num_res_blocks=2,
              projection_dim=c["hidden"], image_token_embed_dim=c["hidden"])
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=c["vocab"] - 3,
                      tie_word_embeddings=c["tie"])
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(c: dict, seed: int = 0):
    """A random transformers Janus with every weight perturbed (no zero biases, no unit norms)."""
    JanusForConditionalGeneration = hf_janus().JanusForConditionalGeneration

    torch.manual_seed(seed)
    m = JanusForConditionalGeneration(hf_config(c)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = 0.1 if p.dim() == 1 else 1.0 / max(p[0].numel(), 1) ** 0.5
            if "embedding" in name or "embed_tokens" in name:
                scale = 1.0
            p.add_(scale * torch.randn(p.shape, generator=g))
    from janus_rt.verify import image_generate_compat

    return image_generate_compat(m)


def write_hf(m, out: Path, c: dict) -> Path:
    m.save_pretrained(out)
    gen = {"pad_token_id": c["vocab"] - 6, "bos_token_id": c["vocab"] - 8,
           "generation_kwargs": {"boi_token_id": c["vocab"] - 5}}
    (out / "generation_config.json").write_text(json.dumps(gen))
    tiny_tokenizer(c).save(out / "tokenizer.json")
    return out


# transformers name -> official name (the renames of the official layout; q/k/v fused separately)
_TO_OFFICIAL = [
    (r"model\.language_model\.(.+)", r"language_model.model.\1"),
    (r"lm_head\.weight", r"language_model.lm_head.weight"),
    (r"model\.vision_model\.embeddings\.patch_embedding\.(.+)", r"vision_model.vision_tower.patch_embed.proj.\1"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm(1|2)\.(.+)", r"vision_model.vision_tower.blocks.\1.norm\2.\3"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection_layer\.(.+)",
     r"vision_model.vision_tower.blocks.\1.attn.proj.\2"),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.(.+)", r"vision_model.vision_tower.blocks.\1.mlp.\2"),
    (r"model\.vision_model\.post_layernorm\.(.+)", r"vision_model.vision_tower.norm.\1"),
    (r"model\.aligner\.fc1\.(.+)", r"aligner.layers.0.\1"),
    (r"model\.aligner\.hidden_layers\.0\.(.+)", r"aligner.layers.2.\1"),
    (r"model\.generation_aligner\.fc1\.(.+)", r"gen_aligner.layers.0.\1"),
    (r"model\.generation_aligner\.hidden_layers\.0\.(.+)", r"gen_aligner.layers.2.\1"),
    (r"model\.generation_head\.proj_out\.(.+)", r"gen_head.output_mlp_projector.\1"),
    (r"model\.generation_head\.vision_head\.(.+)", r"gen_head.vision_head.\1"),
    (r"model\.generation_embeddings\.weight", r"gen_embed.weight"),
    (r"model\.vqmodel\.(encoder|decoder)\.(?:down|up)\.(\d+)\.block\.(.+)", r"gen_vision_model.\1.conv_blocks.\2.res.\3"),
    (r"model\.vqmodel\.(encoder|decoder)\.(?:down|up)\.(\d+)\.(attn|downsample|upsample)\.(.+)",
     r"gen_vision_model.\1.conv_blocks.\2.\3.\4"),
    (r"model\.vqmodel\.(encoder|decoder)\.mid\.block_1\.(.+)", r"gen_vision_model.\1.mid.0.\2"),
    (r"model\.vqmodel\.(encoder|decoder)\.mid\.attn_1\.(.+)", r"gen_vision_model.\1.mid.1.\2"),
    (r"model\.vqmodel\.(encoder|decoder)\.mid\.block_2\.(.+)", r"gen_vision_model.\1.mid.2.\2"),
    (r"model\.vqmodel\.(.+)", r"gen_vision_model.\1"),
]


def official_state_dict(m, c: dict) -> dict:
    """Rename a transformers Janus state dict to the official DeepSeek names (fused SigLIP qkv, pos_embed with a
    leading 1, unused attn_pool and codebook_used tensors present)."""
    sd = m.state_dict()
    out = {}
    qkv = {}
    for k, v in sd.items():
        if k == "lm_head.weight" and c["tie"]:
            continue
        mm = re.fullmatch(r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", k)
        if mm:
            qkv.setdefault((mm.group(1), mm.group(3)), {})[mm.group(2)] = v
            continue
        if k == "model.vision_model.embeddings.position_embedding.weight":
            out["vision_model.vision_tower.pos_embed"] = v[None].clone()
            continue
        for pat, rep in _TO_OFFICIAL:
            if re.fullmatch(pat, k):
                out[re.sub(pat, rep, k)] = v.clone()
                break
        else:
            raise KeyError(k)
    for (i, kind), parts in qkv.items():
        out[f"vision_model.vision_tower.blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    w = c["v_width"]
    out["vision_model.vision_tower.attn_pool.latent"] = torch.randn(1, 1, w)
    out["vision_model.vision_tower.attn_pool.q.weight"] = torch.randn(w, w)
    out["gen_vision_model.quantize.codebook_used"] = torch.zeros(c["codebook"])
    return out


def tiny_tokenizer(c: dict):
    """A byte-level tokenizer with the special tokens at the small config's ids (as checkpoints ship one)."""
    from janus_rt.config import TokenConfig
    from janus_rt.tokenizer import JanusTokenizer

    v = c["vocab"]
    return JanusTokenizer.byte_level(v, TokenConfig(bos_id=v - 8, eos_id=v - 7, pad_id=v - 6, boi_id=v - 5,
                                                    eoi_id=v - 4, image_id=v - 3))


def official_config(c: dict) -> dict:
    return {
        "language_config": {"vocab_size": c["vocab"], "hidden_size": c["hidden"], "intermediate_size": c["inter"],
                            "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"],
                            "num_key_value_heads": c["kv_heads"], "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                            "max_position_embeddings": 2048, "tie_word_embeddings": c["tie"]},
        "vision_config": {"cls": "CLIPVisionTower", "params": {"image_size": c["image"],
                                                              "model_name": "siglip_large_patch16_384",
                                                              "select_feature": "same", "select_layer": -1,
                                                              # small test tower: overrides of the arch table
                                                              "patch_size": c["patch"], "width": c["v_width"],
                                                              "layers": c["v_layers"], "heads": c["v_heads"],
                                                              "mlp_ratio": 4.0}},
        "aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": c["v_width"],
                                                             "n_embed": c["hidden"], "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": c["codebook"], "n_embed": 8,
                                                          "ch": c["vq_ch"], "encoder_ch_mult": list(c["vq_mult"]),
                                                          "z_channels": c["z"], "num_res_blocks": 2}},
        "gen_aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": 8, "n_embed": c["hidden"],
                                                                 "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "params": {"image_token_embed": c["hidden"],
                                                             "image_token_size": c["codebook"], "n_embed": c["hidden"]}},
    }
