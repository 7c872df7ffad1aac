"""janus_rt's PyTorch model against transformers' JanusForConditionalGeneration, random weights, both layouts."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from hf_reference import SMALL_CONFIGS, hf_model, official_config, official_state_dict, tiny_tokenizer, write_hf  # noqa: E402

from janus_rt import Janus  # noqa: E402


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def official_tokens(hf, pixels):
    """The official VQ encode rule: L2-normalise latents and codebook, nearest by squared distance."""
    vq = hf.model.vqmodel
    z = vq.quant_conv(vq.encoder(pixels))
    b = z.shape[0]
    z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
    e = F.normalize(vq.quantize.embedding.weight, dim=-1)
    d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
    return d.argmin(1).view(b, -1)


def inputs(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = c["image"] // c["patch"]
    n_img = grid * grid
    ids = torch.randint(0, c["vocab"] - 10, (2, 11), generator=g)
    # two images in row 0, one in row 1: placeholders spliced in order
    img = torch.full((n_img,), c["vocab"] - 3)
    row0 = torch.cat([ids[0, :3], img, ids[0, 3:6], img, ids[0, 6:]])
    filler = torch.randint(0, c["vocab"] - 10, (n_img,), generator=g)
    row1 = torch.cat([ids[1, :5], img, ids[1, 5:], filler])
    mm_ids = torch.stack([row0, row1])
    pixels = torch.rand(3, 3, c["image"], c["image"], generator=g) * 2 - 1
    n_vq = (c["image"] // c["patch"]) ** 2
    tokens = torch.randint(0, c["codebook"], (2, n_vq), generator=g)
    return ids, mm_ids, pixels, tokens


@pytest.fixture(scope="module", params=sorted(SMALL_CONFIGS))
def pair(request, tmp_path_factory):
    c = SMALL_CONFIGS[request.param]
    hf = hf_model(c, seed=sorted(SMALL_CONFIGS).index(request.param))  # fixed: hash(str) changes from run to run
    path = write_hf(hf, tmp_path_factory.mktemp(f"hf_{request.param}"), c)
    ours = Janus.from_pretrained(path)
    return c, hf, ours


@torch.no_grad()
def test_text_logits(pair):
    c, hf, ours = pair
    ids, mm_ids, pixels, _ = inputs(c)
    assert rel_err(ours.text_logits(ids), hf(input_ids=ids).logits) <= 1e-4
    ref = hf(input_ids=mm_ids, pixel_values=pixels).logits
    out = ours.text_logits(mm_ids, pixel_values=pixels)
    assert rel_err(out, ref) <= 1e-4
    # the images really matter (a model that ignored pixel_values would fail the line above only by luck)
    assert rel_err(ours.text_logits(mm_ids), ref) > 1e-2


@torch.no_grad()
def test_image_logits(pair):
    c, hf, ours = pair
    ids, _, _, tokens = inputs(c)
    t, n = ids.shape[1], tokens.shape[1]
    emb = torch.cat([hf.get_input_embeddings()(ids), hf.prepare_embeddings_for_image_generation(tokens[:, :-1])], 1)
    h = hf.model.language_model(inputs_embeds=emb).last_hidden_state
    ref = hf.model.generation_head(h[:, t - 1 : t - 1 + n])
    out = ours.image_logits(ids, tokens)
    assert out.shape == (2, n, c["codebook"])
    assert rel_err(out, ref) <= 1e-4


@torch.no_grad()
def test_decode_image_tokens(pair):
    c, hf, ours = pair
    *_, tokens = inputs(c)
    ref = hf.model.vqmodel.decode(tokens)
    out = ours.decode_image_tokens(tokens)
    vq_size = c["image"] // c["patch"] * 2 ** (len(c["vq_mult"]) - 1)
    assert out.shape == (2, 3, vq_size, vq_size)
    assert rel_err(out, ref) <= 1e-4


@torch.no_grad()
def test_encode_images_official_rule(pair):
    c, hf, ours = pair
    _, _, pixels, _ = inputs(c)
    ref = official_tokens(hf, pixels)
    out = ours.encode_images(pixels)
    assert out.dtype == torch.int64
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["a", "b"])
@torch.no_grad()
def test_official_layout_matches_transformers_layout(name, tmp_path):
    import json

    c = SMALL_CONFIGS[name]
    hf = hf_model(c, seed=7)
    hf_dir = write_hf(hf, tmp_path / "hf", c)
    off_dir = tmp_path / "official"
    off_dir.mkdir()
    (off_dir / "config.json").write_text(json.dumps(official_config(c)))
    torch.save(official_state_dict(hf, c), off_dir / "pytorch_model.bin")
    tiny_tokenizer(c).save(off_dir / "tokenizer.json")
    a, b = Janus.from_pretrained(hf_dir), Janus.from_pretrained(off_dir)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids, mm_ids, pixels, tokens = inputs(c)
    assert torch.equal(a.text_logits(mm_ids, pixels), b.text_logits(mm_ids, pixels))
    assert torch.equal(a.decode_image_tokens(tokens), b.decode_image_tokens(tokens))


def test_bf16_error_within_2x_of_transformers(tmp_path):
    c = SMALL_CONFIGS["a"]
    hf = hf_model(c, seed=3)
    path = write_hf(hf, tmp_path / "hf", c)
    ours32 = Janus.from_pretrained(path)
    ours16 = Janus.from_pretrained(path, dtype=torch.bfloat16)
    ids, mm_ids, pixels, tokens = inputs(c)
    with torch.no_grad():
        ref32 = {"text": hf(input_ids=mm_ids, pixel_values=pixels).logits}
        emb = torch.cat([hf.get_input_embeddings()(ids), hf.prepare_embeddings_for_image_generation(tokens[:, :-1])], 1)
        t, n = ids.shape[1], tokens.shape[1]
        ref32["image"] = hf.model.generation_head(hf.model.language_model(inputs_embeds=emb).last_hidden_state[:, t - 1:t - 1 + n])
        ref32["decode"] = hf.model.vqmodel.decode(tokens)
        hf16 = hf.to(torch.bfloat16)
        emb16 = torch.cat([hf16.get_input_embeddings()(ids), hf16.prepare_embeddings_for_image_generation(tokens[:, :-1])], 1)
        ref16 = {
            "text": hf16(input_ids=mm_ids, pixel_values=pixels.bfloat16()).logits,
            "image": hf16.model.generation_head(hf16.model.language_model(inputs_embeds=emb16).last_hidden_state[:, t - 1:t - 1 + n]),
            "decode": hf16.model.vqmodel.decode(tokens),
        }
        out16 = {
            "text": ours16.text_logits(mm_ids, pixels.bfloat16()),
            "image": ours16.image_logits(ids, tokens),
            "decode": ours16.decode_image_tokens(tokens),
        }
        # sanity: fp32 paths agree, so the bf16 comparison measures precision alone
        assert rel_err(ours32.text_logits(mm_ids, pixels), ref32["text"]) <= 1e-4
    for k in ref32:
        ours_err, hf_err = rel_err(out16[k], ref32[k]), rel_err(ref16[k], ref32[k])
        assert hf_err > 0
        assert ours_err <= 2 * hf_err, (k, ours_err, hf_err)


def test_image_generate_compat_fills_the_missing_prefill_chunk_size():
    """verify.image_generate_compat: where _prepare_static_cache requires prefill_chunk_size and a caller leaves it
    out (transformers 5.17's Janus generate), the call gets None; a caller that passes it is unchanged; a method with
    a default is left alone."""
    from janus_rt.verify import image_generate_compat

    class Old:
        def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, prefill_chunk_size,
                                  model_kwargs):
            return prefill_chunk_size

    m = image_generate_compat(Old())
    assert m._prepare_static_cache(cache_implementation="static", batch_size=2, max_cache_len=8, model_kwargs={}) is None
    assert m._prepare_static_cache(cache_implementation="static", batch_size=2, max_cache_len=8, prefill_chunk_size=4,
                                   model_kwargs={}) == 4
    with pytest.raises(TypeError):  # unpatched, the 5.17 call fails as it does there
        Old()._prepare_static_cache(cache_implementation="static", batch_size=2, max_cache_len=8, model_kwargs={})

    class New(Old):
        def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, prefill_chunk_size=None,
                                  model_kwargs=None):
            return "new"

    n = New()
    assert image_generate_compat(n) is n and "_prepare_static_cache" not in vars(n)


def test_transformers_janus_imports_although_kernels_folder_shadows_hf_kernels():
    """transformers >= 5.25 imports Hugging Face's top-level `kernels` package, which this repository's kernels/
    folder shadows when the root is on sys.path: verify.hf_janus still gives transformers' Janus, also after the
    folder was imported as `kernels` by mistake, and leaves sys.path as it was."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = ("import sys, kernels; assert kernels.__file__.startswith(sys.argv[1]), kernels.__file__\n"
            "path = list(sys.path)\n"
            "from janus_rt.verify import hf_janus\n"
            "m = hf_janus()\n"
            "assert sys.path == path and m.JanusForConditionalGeneration.__name__ == 'JanusForConditionalGeneration'\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code, str(root)], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
