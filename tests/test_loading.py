"""Checkpoint loading: shards, janus_rt's own layout, convert, and a typed error for every bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from janus_rt import Janus
from janus_rt.config import ConfigError
from janus_rt.loading import (CheckpointError, CorruptCheckpointError, MissingKeysError, ShapeMismatchError,
                              UnexpectedKeysError, convert, default_guidance, load_janus, save_janus, stored_dtype)


@pytest.fixture(scope="module")
def tiny():
    return Janus.from_preset("tiny", seed=1)


@pytest.fixture
def saved(tiny, tmp_path):
    return save_janus(tiny, tmp_path / "ck")


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_janus_rt_layout_roundtrip(tiny, saved):
    assert same_weights(Janus.from_pretrained(saved), tiny)


def test_bf16_load_is_one_dtype(saved):
    m = Janus.from_pretrained(saved, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_random_model_made_in_its_dtype():
    """from_preset/from_config materialise a bf16 model in bf16 (a 7B model would not fit 24 GB as fp32 first) with
    the values an fp32 model rounded to bf16 has."""
    b = Janus.from_preset("tiny", seed=4, dtype=torch.bfloat16)
    f = Janus.from_preset("tiny", seed=4)
    sb, sf = b.state_dict(), f.state_dict()
    assert sb.keys() == sf.keys()
    for k in sb:
        assert sb[k].dtype == torch.bfloat16 and torch.equal(sb[k], sf[k].to(torch.bfloat16)), k


def test_random_values_follow_the_per_tensor_rule():
    """init_random_ makes each tensor's values in place (no temporaries) and still gives, tensor by tensor in module
    order, fp32 normal noise from one seeded generator scaled by its kind: gains 1 + 0.1 n, biases and vectors
    0.02 n, the codebook and gen_embed n, matrices n / sqrt(fan_in)."""
    from janus_rt.models.llm import RMSNorm

    m = Janus.from_preset("tiny", seed=7)
    g = torch.Generator().manual_seed(7)
    for mod in m.modules():
        for name, p in mod.named_parameters(recurse=False):
            n = torch.randn(p.shape, generator=g)
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm, RMSNorm)) and name == "weight":
                want = 1.0 + 0.1 * n
            elif name == "bias" or p.dim() == 1:
                want = 0.02 * n
            elif name == "codebook" or mod is m.gen_embed:
                want = n
            else:
                want = n / p[0].numel() ** 0.5
            assert torch.equal(p, want), name
    # whatever torch's default dtype is at the time (a caller may have changed it)
    torch.set_default_dtype(torch.float64)
    try:
        again = Janus.from_preset("tiny", seed=7, dtype=torch.bfloat16).state_dict()
    finally:
        torch.set_default_dtype(torch.float32)
    assert all(torch.equal(v, m.state_dict()[k].to(torch.bfloat16)) for k, v in again.items())


def test_sharded_transformers_layout(tmp_path):
    pytest.importorskip("transformers")
    from hf_reference import SMALL_CONFIGS, hf_model, write_hf

    c = SMALL_CONFIGS["a"]
    hf = hf_model(c, seed=5)
    one = write_hf(hf, tmp_path / "one", c)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    for f in ("generation_config.json", "tokenizer.json"):
        (tmp_path / "sharded" / f).write_bytes((one / f).read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert same_weights(Janus.from_pretrained(one), Janus.from_pretrained(tmp_path / "sharded"))


def test_sharded_official_bin(tmp_path):
    pytest.importorskip("transformers")
    from hf_reference import SMALL_CONFIGS, hf_model, official_config, official_state_dict, tiny_tokenizer, write_hf

    c = SMALL_CONFIGS["b"]
    hf = hf_model(c, seed=9)
    ref = Janus.from_pretrained(write_hf(hf, tmp_path / "hf", c))
    sd = official_state_dict(hf, c)
    keys = sorted(sd)
    half = len(keys) // 2
    d = tmp_path / "off"
    d.mkdir()
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    for name, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, d / name)
    wm = {k: name for name, ks in shards.items() for k in ks}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    (d / "config.json").write_text(json.dumps(official_config(c)))
    tiny_tokenizer(c).save(d / "tokenizer.json")
    assert same_weights(Janus.from_pretrained(d), ref)


def test_transformers_copy_saved_reads_back(tiny, tmp_path):
    """A transformers copy of a model (verify.to_transformers) saved with save_pretrained, no tokenizer beside it,
    reads back with the model's weights and special ids (the tiny model's are not the published defaults)."""
    pytest.importorskip("transformers")
    from janus_rt.config import TokenConfig
    from janus_rt.verify import to_transformers

    assert tiny.cfg.tokens != TokenConfig()
    to_transformers(tiny).save_pretrained(tmp_path / "hf")
    back = Janus.from_pretrained(tmp_path / "hf")
    assert back.cfg.tokens == tiny.cfg.tokens
    assert same_weights(back, tiny)


def test_load_progress_bar(tiny, saved, capsys, monkeypatch):
    """A bar over the weight files' bytes, on its own from PROGRESS_MIN_BYTES up (or asked for), ending at the
    files' whole size; none for a small checkpoint."""
    import janus_rt.loading as loading

    size = (saved / "model.safetensors").stat().st_size
    assert same_weights(load_janus(saved), tiny)
    assert "loading weights" not in capsys.readouterr().err
    for kwargs in ({"progress": True}, {}):
        if not kwargs:
            monkeypatch.setattr(loading, "PROGRESS_MIN_BYTES", size)
        assert same_weights(load_janus(saved, **kwargs), tiny)
        err = capsys.readouterr().err
        assert "loading weights" in err and "100%" in err, err
    assert "loading weights" not in (load_janus(saved, progress=False), capsys.readouterr().err)[1]


def test_stored_dtype(tiny, saved, tmp_path):
    """What a folder's weights are stored in: safetensors by their header (most elements), .bin by config.json's
    torch_dtype / dtype (top level or a sub-config); None where neither says, or for no checkpoint at all."""
    assert stored_dtype(saved) == torch.float32
    assert stored_dtype(convert(saved, tmp_path / "b", dtype=torch.bfloat16)) == torch.bfloat16
    assert stored_dtype(convert(saved, tmp_path / "h", dtype=torch.float16)) == torch.float16
    # mixed: the dtype of most elements wins (a few fp32 norms beside bf16 matrices)
    sd = load_file(saved / "model.safetensors")
    sd = {k: (v.to(torch.bfloat16) if v.numel() > 64 else v) for k, v in sd.items()}
    (tmp_path / "mixed").mkdir()
    save_file(sd, tmp_path / "mixed" / "model.safetensors")
    assert {v.dtype for v in sd.values()} == {torch.float32, torch.bfloat16}
    assert stored_dtype(tmp_path / "mixed") == torch.bfloat16
    d = tmp_path / "bin"
    d.mkdir()
    torch.save({"x": torch.zeros(2, dtype=torch.bfloat16)}, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({"language_config": {"torch_dtype": "bfloat16"}}))
    assert stored_dtype(d) == torch.bfloat16
    (d / "config.json").write_text(json.dumps({"dtype": "float32", "text_config": {}}))
    assert stored_dtype(d) == torch.float32
    (d / "config.json").write_text(json.dumps({"text_config": {}}))
    assert stored_dtype(d) is None
    assert stored_dtype(tmp_path / "nothing here") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert stored_dtype(tmp_path / "bad") is None


def test_guidance_scale_travels_with_the_model(tiny, saved, tmp_path):
    """A model loaded from a folder whose generation_config.json recommends a CFG weight carries it
    (model.guidance_scale), and save_janus writes it into the copy; a preset's or a folder without one: None."""
    assert tiny.guidance_scale is None and Janus.from_pretrained(saved).guidance_scale is None
    (saved / "generation_config.json").write_text('{"guidance_scale": 1.5}')
    m = Janus.from_pretrained(saved)
    assert m.guidance_scale == 1.5
    copy = save_janus(m, tmp_path / "copy")
    assert default_guidance(copy) == 1.5 and Janus.from_pretrained(copy).guidance_scale == 1.5


def test_default_guidance(saved):
    """generation_config.json's guidance_scale (transformers' field), else None."""
    assert default_guidance(saved) is None  # save_janus writes no generation config
    for text, want in [('{"guidance_scale": 1.5}', 1.5), ('{"guidance_scale": 5}', 5.0),
                       ('{"guidance_scale": null}', None), ('{"guidance_scale": "2"}', None),
                       ('{"guidance_scale": true}', None), ("[1]", None), ("not json", None),
                       ('{"pad_token_id": 3}', None),
                       ('{"guidance_scale": NaN}', None), ('{"guidance_scale": -Infinity}', None),
                       ('{"guidance_scale": 1' + "0" * 400 + "}", None), ('{"guidance_scale": -2}', -2.0),
                       (b'{"guidance_scale": "\xff"}', None)]:
        f = saved / "generation_config.json"
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        assert default_guidance(saved) == want, text


def test_convert(tiny, saved, tmp_path):
    out = convert(saved, tmp_path / "converted", dtype=torch.float32)
    assert same_weights(Janus.from_pretrained(out), tiny)


def test_convert_refuses_its_source_and_a_checkpoint_folder(saved, tmp_path):
    """convert SRC SRC (any spelling of it) would rewrite SRC's weights in the new dtype; a DST holding a checkpoint
    would be overwritten; a DST that is a file, or that cannot be created or written, cannot take the result: each is
    a UsageError before anything loads, and SRC's bytes are unchanged."""
    from janus_rt.errors import UsageError

    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    other = convert(saved, tmp_path / "other", dtype=torch.float32)
    (tmp_path / "afile").write_text("")
    for dst, message in [(saved, "is SRC"), (saved / ".." / saved.name, "is SRC"), (other, "already holds"),
                         (tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub", "cannot create it"),
                         ("/proc/janus-rt-dst", "cannot write in /proc")]:
        with pytest.raises(UsageError, match=message):
            convert(saved, dst, dtype=torch.bfloat16)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert stored_dtype(other) == torch.float32  # not overwritten in bf16


def _edit(saved, fn):
    f = saved / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_missing_key(saved):
    _edit(saved, lambda sd: sd.pop("llm.layers.1.mlp.down_proj.weight"))
    with pytest.raises(MissingKeysError, match="llm.layers.1.mlp.down_proj.weight"):
        Janus.from_pretrained(saved)


def test_unexpected_key(saved):
    _edit(saved, lambda sd: sd.__setitem__("llm.layers.9.extra.weight", torch.zeros(3)))
    with pytest.raises(UnexpectedKeysError, match="llm.layers.9.extra.weight"):
        Janus.from_pretrained(saved)


def test_shape_mismatch(saved):
    _edit(saved, lambda sd: sd.__setitem__("gen_head.fc2.bias", torch.zeros(7)))
    with pytest.raises(ShapeMismatchError, match=r"model\.safetensors.*gen_head\.fc2\.bias"):
        Janus.from_pretrained(saved)


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        Janus.from_pretrained(saved)


def test_corrupt_bin(saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"PK\x03\x04 definitely not a zip archive" * 10)
    with pytest.raises(CorruptCheckpointError, match="pytorch_model.bin"):
        Janus.from_pretrained(saved)


def test_bin_refuses_arbitrary_pickles(saved):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    (saved / "model.safetensors").unlink()
    torch.save({"x": Evil()}, saved / "pytorch_model.bin")
    with pytest.raises(CorruptCheckpointError, match="pytorch_model.bin"):
        Janus.from_pretrained(saved)


def test_unknown_config(saved):
    (saved / "config.json").write_text(json.dumps({"model_type": "something_else"}))
    with pytest.raises(ConfigError, match="config.json"):
        Janus.from_pretrained(saved)


def test_invalid_json_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        Janus.from_pretrained(saved)


@pytest.mark.parametrize("text, message", [("{not json", "generation_config.json: not valid JSON"),
                                           ("[1, 2]", "generation_config.json: expected a JSON object, got list")])
def test_bad_generation_config(saved, text, message):
    """A broken generation_config.json is a ConfigError naming the file (it was a bare JSONDecodeError)."""
    (saved / "generation_config.json").write_text(text)
    with pytest.raises(ConfigError, match=message):
        Janus.from_pretrained(saved)


def test_config_json_not_an_object(saved):
    (saved / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match="config.json: expected a JSON object, got list"):
        Janus.from_pretrained(saved)


def test_no_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        Janus.from_pretrained(saved)


def test_missing_shard(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(Janus.from_preset("tiny").cfg.to_dict()))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        Janus.from_pretrained(d)


@pytest.mark.parametrize("index", ["[1]", '{"weight_map": ["a"]}', '{"weight_map": {"a": 3}}',
                                   b'{"weight_map": "\xff"}'])
def test_bad_shard_index(saved, index):
    """A shard index of the wrong shape or encoding is a CorruptCheckpointError naming it (it was a TypeError,
    AttributeError or UnicodeDecodeError traceback); stored_dtype says None for such a folder."""
    f = saved / "model.safetensors.index.json"
    f.write_bytes(index if isinstance(index, bytes) else index.encode())
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.index.json"):
        Janus.from_pretrained(saved)
    assert stored_dtype(saved) is None


def test_config_not_utf8(saved):
    (saved / "config.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        Janus.from_pretrained(saved)


def test_models_come_frozen_for_inference(tiny, saved):
    """from_preset and from_pretrained give eval-mode models with no parameter requiring a gradient, so inference
    calls build no autograd graph (at 7B that graph would hold every activation); training unfreezes what it
    trains."""
    from janus_rt.train.stages import apply_stage

    loaded = Janus.from_pretrained(saved)
    for m in (tiny, loaded):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        assert not m.text_logits(torch.tensor([[1, 2, 3]])).requires_grad
    assert apply_stage(loaded, 3) and any(p.requires_grad for p in loaded.parameters())


def test_saved_weights_get_the_users_file_mode(tiny, tmp_path):
    """safetensors writes 0600; save_janus gives model.safetensors what any new file of the user's gets."""
    import os

    umask = os.umask(0o022)
    try:
        out = save_janus(tiny, tmp_path / "ck")
    finally:
        os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644


def _set_config(folder, fn):
    d = json.loads((folder / "config.json").read_text())
    fn(d)
    (folder / "config.json").write_text(json.dumps(d))


def test_stored_head_wins_over_a_tying_config(tiny, saved):
    """A config that ties lm_head to the embedding beside weights that store a different head (transformers 5
    writes tie_word_embeddings: true at the top of a re-saved Janus-Pro config that lacked the field, and keeps the
    stored head, untied): the stored head is loaded (it was dropped, text logits ~100% off)."""
    _set_config(saved, lambda d: d["janus_rt_config"]["llm"].__setitem__("tie_word_embeddings", True))
    m = Janus.from_pretrained(saved)
    assert not m.cfg.llm.tie_word_embeddings and m.lm_head.weight is not m.llm.embed_tokens.weight
    assert same_weights(m, tiny)


def test_stored_head_equal_to_the_embedding_stays_tied(tiny, saved):
    _set_config(saved, lambda d: d["janus_rt_config"]["llm"].__setitem__("tie_word_embeddings", True))
    _edit(saved, lambda sd: sd.__setitem__("lm_head.weight", sd["llm.embed_tokens.weight"].clone()))
    m = Janus.from_pretrained(saved)
    assert m.cfg.llm.tie_word_embeddings and m.lm_head.weight is m.llm.embed_tokens.weight
    assert torch.equal(m.llm.embed_tokens.weight, tiny.llm.embed_tokens.weight)


def test_tensor_stored_twice(tmp_path):
    """Shards that overlap are refused: a fused part stored twice counted as the missing part beside it (q twice,
    no k: the model loaded with k's rows never written, NaN and garbage)."""
    pytest.importorskip("transformers")
    from hf_reference import SMALL_CONFIGS, hf_model, write_hf

    c = SMALL_CONFIGS["a"]
    d = write_hf(hf_model(c, seed=5), tmp_path / "hf", c)
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    del sd["model.language_model.layers.0.self_attn.k_proj.weight"]
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2] + [q],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:] + [q]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in set(ks)}, d / name)
    wm = {k: name for name, ks in shards.items() for k in ks}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CorruptCheckpointError, match="q_proj.weight is stored twice"):
        Janus.from_pretrained(d)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["janus_rt_config"].pop("vq"), "lacks field 'vq'"),
    (lambda d: d["janus_rt_config"]["llm"].__setitem__("future_field", 1), "unexpected keyword"),
    (lambda d: d.__setitem__("janus_rt_config", None), "wrong type"),
    (lambda d: d.__setitem__("text_config", None), "wrong type"),
    (lambda d: d.__setitem__("language_config", {}) or d.__setitem__("vision_config", None), "wrong type"),
])
def test_malformed_config_is_a_config_error(saved, edit, message):
    """A config.json whose fields have the wrong shape is a ConfigError naming the file (the CLI's message), not a
    TypeError / AttributeError / KeyError traceback."""
    _set_config(saved, lambda d: (edit(d), d.pop("janus_rt_config") if "text_config" in d or "language_config" in d
                                  else None))
    with pytest.raises(ConfigError, match=f"config.json: .*{message}"):
        Janus.from_pretrained(saved)


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0}, {"type": "dynamic", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0}])
def test_rope_scaling_refused_under_either_key(scaling):
    """rope_scaling under its current key (`rope_type`, transformers >= 4.45) is refused as under the old one
    (`type`): it was read as plain RoPE."""
    from janus_rt.config import JanusConfig

    t = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "intermediate_size": 96, "rope_scaling": scaling}
    with pytest.raises(ConfigError, match="rope_scaling"):
        JanusConfig.from_hf_dict({"text_config": t, "vision_config": {"hidden_size": 64, "projection_dim": 64},
                                  "vq_config": {"projection_dim": 64, "image_token_embed_dim": 64}})
