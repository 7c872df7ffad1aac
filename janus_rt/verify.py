"""`janus-rt verify MODEL_DIR`: janus_rt and transformers' Janus side by side on fixed inputs, per-path errors.

For a transformers-layout folder the reference is loaded by transformers itself (independent of our loader).
For the official or janus_rt layouts transformers cannot read the folder, so the reference is a transformers
model built from the weights janus_rt loaded (mapped back through the same name table): that checks the forward
passes, not the loader.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from janus_rt.loading import _part_slice, read_config, rename

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def hf_janus():
    """transformers' Janus modeling module (JanusForConditionalGeneration, JanusConfig, ...), imported so that this
    repository's kernels/ folder cannot stand in for Hugging Face's `kernels` package: transformers >= 5.25 imports
    that top-level package, and kernels/ (installed as janus_rt.kernels) shadows it wherever the repository root is
    on sys.path (`python -m ...` or pytest from the root, the bench scripts)."""
    import importlib

    ours = lambda folder: (folder / "paged_attention.py").is_file()  # a kernels/ folder of janus_rt's (any checkout)
    shadow = sys.modules.get("kernels")
    if shadow is not None and ours(Path(getattr(shadow, "__file__", None) or "/").parent):
        del sys.modules["kernels"]  # imported as a top-level package by mistake: let the real one load
    saved = list(sys.path)
    sys.path[:] = [e for e in saved if not ours(Path(e or ".") / "kernels")]
    try:
        return importlib.import_module("transformers.models.janus.modeling_janus")
    finally:
        sys.path[:] = saved


def hf_config(cfg):
    """transformers' JanusConfig for a janus_rt JanusConfig."""
    JanusConfig = hf_janus().JanusConfig

    l, v, q = cfg.llm, cfg.vision, cfg.vq
    text = dict(model_type="llama", vocab_size=l.vocab_size, hidden_size=l.hidden_size,
                intermediate_size=l.intermediate_size, num_hidden_layers=l.num_layers,
                num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads, head_dim=l.head_dim,
                max_position_embeddings=l.max_position, rms_norm_eps=l.rms_eps, rope_theta=l.rope_theta,
                tie_word_embeddings=l.tie_word_embeddings, bos_token_id=cfg.tokens.bos_id,
                eos_token_id=cfg.tokens.eos_id, pad_token_id=cfg.tokens.pad_id)
    vision = dict(hidden_size=v.width, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                  image_size=v.image_size, patch_size=v.patch_size, mlp_ratio=v.mlp_dim / v.width,
                  layer_norm_eps=v.ln_eps, projection_dim=cfg.aligner.out_dim, num_image_tokens=q.num_tokens)
    vq = dict(embed_dim=q.codebook_dim, num_embeddings=q.codebook_size, base_channels=q.ch,
              channel_multiplier=list(q.ch_mult), latent_channels=q.z_channels, num_res_blocks=q.num_res_blocks,
              projection_dim=cfg.gen_aligner.out_dim, image_token_embed_dim=cfg.gen_head.in_dim)
    c = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=cfg.tokens.image_id,
                    tie_word_embeddings=l.tie_word_embeddings)
    c._attn_implementation = "eager"
    return c


def image_generate_compat(ref):
    """`ref` (a transformers JanusForConditionalGeneration) made able to generate images on transformers versions
    whose Janus generate calls GenerationMixin._prepare_static_cache without its required `prefill_chunk_size`
    (5.17, the GPU machines' version: a TypeError before the first token; 5.24 passes it): the instance's method
    gets that argument's default, None. Where Janus passes it, nothing changes. Returns ref."""
    import inspect

    method = getattr(type(ref), "_prepare_static_cache", None)
    param = inspect.signature(method).parameters.get("prefill_chunk_size") if method else None
    if param is not None and param.default is inspect.Parameter.empty:
        bound = ref._prepare_static_cache

        def prepare(*args, prefill_chunk_size=None, **kwargs):
            return bound(*args, prefill_chunk_size=prefill_chunk_size, **kwargs)

        ref._prepare_static_cache = prepare
    return ref


def to_transformers(model):
    """A transformers JanusForConditionalGeneration holding `model`'s weights."""
    JanusForConditionalGeneration = hf_janus().JanusForConditionalGeneration

    from janus_rt.models.packed_linear import require_unpacked

    require_unpacked(model, "a transformers copy of the model")

    ref = JanusForConditionalGeneration(hf_config(model.cfg)).to(model.dtype).eval()
    ours = model.state_dict()
    sd = {}
    for key, t in ref.state_dict().items():
        name, part = rename(key, "transformers")
        src = ours[name]
        if part is not None:
            start, length = _part_slice(name, part, model.cfg)
            src = src.narrow(0, start, length)
        if key.endswith("position_embedding.weight"):
            src = src.reshape(t.shape)
        sd[key] = src
    ref.load_state_dict(sd, strict=True)
    # the ids transformers' image generate reads (boi) and those it has no field for (eoi), so that a copy saved with
    # save_pretrained reads back with model's special ids
    ref.generation_config.generation_kwargs = {"boi_token_id": model.cfg.tokens.boi_id,
                                               "eoi_token_id": model.cfg.tokens.eoi_id}
    return image_generate_compat(ref)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def compare(ours, ref, seed: int = 0) -> dict[str, float]:
    """Per-path errors of `ours` (janus_rt) against `ref` (transformers) on fixed seeded inputs."""
    cfg = ours.cfg
    dev, dt = ours.device, ours.dtype
    g = torch.Generator().manual_seed(seed)
    v = min(cfg.llm.vocab_size, cfg.tokens.bos_id if cfg.tokens.bos_id > 32 else cfg.llm.vocab_size) - 1
    ids = torch.randint(0, v, (1, 24), generator=g).to(dev)
    ids[0, 0] = cfg.tokens.bos_id
    n_img = cfg.vision.num_patches
    img = torch.full((1, n_img), cfg.tokens.image_id, device=dev)
    mm = torch.cat([ids[:, :4], img, ids[:, 4:]], 1)
    s = cfg.vision.image_size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
    pixels = torch.stack([xx, yy, xx * yy])[None].to(dev, dt)  # a smooth test image
    vq_s = cfg.vq.image_size
    vq_pixels = F.interpolate(pixels.float(), size=(vq_s, vq_s), mode="bilinear").to(dt)
    tokens = torch.randint(0, cfg.vq.codebook_size, (1, cfg.num_image_tokens), generator=g).to(dev)

    out = {}
    out["text_logits"] = _rel(ours.text_logits(ids), ref(input_ids=ids).logits)
    out["text_logits+image"] = _rel(ours.text_logits(mm, pixels), ref(input_ids=mm, pixel_values=pixels).logits)
    t, n = ids.shape[1], tokens.shape[1]
    emb = torch.cat([ref.get_input_embeddings()(ids), ref.prepare_embeddings_for_image_generation(tokens[:, :-1])], 1)
    h = ref.model.language_model(inputs_embeds=emb).last_hidden_state
    out["image_logits"] = _rel(ours.image_logits(ids, tokens), ref.model.generation_head(h[:, t - 1 : t - 1 + n]))
    out["decode_image_tokens"] = _rel(ours.decode_image_tokens(tokens), ref.model.vqmodel.decode(tokens))
    vq = ref.model.vqmodel
    z = vq.quant_conv(vq.encoder(vq_pixels)).float()
    z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
    e = F.normalize(vq.quantize.embedding.weight.float(), dim=-1)
    d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()  # [tokens, codes] squared distances
    want = d.argmin(1)
    got = ours.encode_images(vq_pixels).flatten()
    out["encode_images (mismatch fraction)"] = (got != want).float().mean().item()
    # how much farther (in the reference's own squared distances of unit vectors, 0..4) our codes are than its best:
    # 0 where they agree; a near-tie that reduced precision decides otherwise costs little, a wrong code O(0.1-1)
    out["encode_images (distance excess)"] = (d.gather(1, got[:, None]) - d.gather(1, want[:, None])).max().item()
    return out


def verify(model_dir, dtype=torch.float32, device="cpu") -> bool:
    from janus_rt import Janus

    try:
        import transformers  # noqa: F401
    except ImportError:
        print("janus-rt verify needs transformers (pip install 'janus_rt[test]')", file=sys.stderr)
        return False
    path = Path(model_dir)
    _, layout = read_config(path)  # a CheckpointError / ConfigError names what is wrong with the folder
    print(f"loading janus_rt model from {path} ({layout} layout, {dtype}, {device}) ...", flush=True)
    ours = Janus.from_pretrained(path, device=device, dtype=dtype)
    if layout == "transformers":
        JanusForConditionalGeneration = hf_janus().JanusForConditionalGeneration

        print("loading transformers' JanusForConditionalGeneration from the same folder ...", flush=True)
        ref = JanusForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="eager")
        ref = ref.to(device).eval()
    else:
        print("transformers cannot read this layout: building its Janus from the weights janus_rt loaded",
              flush=True)
        ref = to_transformers(ours).to(device)
    errs = compare(ours, ref)
    tol = TOLERANCE[dtype]
    ok = True
    print(f"\n{'path':<36} {'error':>12}  tolerance")
    for k, e in errs.items():
        if k == "encode_images (mismatch fraction)" and dtype != torch.float32:
            # in reduced precision near-ties may fall either way: judged by the distance excess below
            print(f"{k:<36} {e:>12.3e}  {'-':>5}  (near-ties: see the distance excess)")
            continue
        limit = 0.0 if k.startswith("encode") and dtype == torch.float32 else tol
        good = e <= limit
        ok &= good
        print(f"{k:<36} {e:>12.3e}  {limit:.0e}  {'ok' if good else 'FAIL'}")
    print("\nPASS: janus_rt matches transformers" if ok else "\nFAIL: see the paths marked FAIL above")
    return ok
