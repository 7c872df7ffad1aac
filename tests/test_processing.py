"""Prompt templates, special ids, image pre/post-processing as the official processor does them."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from janus_rt.config import TokenConfig
from janus_rt.processing import (SYSTEM_PROMPT, encode_conversation, encode_generation_prompt,
                                 encode_understanding_prompt, generation_prompt, preprocess_image, to_uint8,
                                 unconditional_ids)
from janus_rt.tokenizer import SPECIAL_TOKENS, JanusTokenizer

TOK = TokenConfig(bos_id=1000, eos_id=1001, pad_id=1002, boi_id=1003, eoi_id=1004, image_id=1005)


def tok():
    return JanusTokenizer.byte_level(1024, TOK)


def test_generation_prompt_ids():
    t = tok()
    ids = encode_generation_prompt(t, "a cat")
    assert generation_prompt("a cat") == "<|User|>: a cat\n\n<|Assistant|>:"
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.boi_id
    assert t.decode(ids[1:-1]) == "<|User|>: a cat\n\n<|Assistant|>:"
    assert encode_generation_prompt(t, " a cat\n") == ids  # stripped, as the official processor strips a message
    u = unconditional_ids(ids, TOK.pad_id).tolist()
    assert u[0] == TOK.bos_id and u[-1] == TOK.boi_id and set(u[1:-1]) == {TOK.pad_id} and len(u) == len(ids)


def test_a_conversation_is_the_official_template():
    """One user turn with its images first is encode_understanding_prompt's ids; more turns follow the DeepSeek
    template (each answer, after a space, closed by EOS, the next user turn straight after), images expanded in the
    turn that holds them; a system prompt replaces the default one (none: no system part); turns that do not
    alternate user, assistant, ..., user are refused."""
    t = tok()
    one = encode_conversation(t, [("user", "<image_placeholder>\n" * 2 + "What is it?")], num_image_tokens=5)
    assert one == encode_understanding_prompt(t, "What is it?", num_images=2, num_image_tokens=5)
    assert one == encode_understanding_prompt(t, " What is it?\n", num_images=2, num_image_tokens=5)  # (stripped)
    turns = [("user", "<image_placeholder>\nWhat is it?"), ("assistant", "A cat."), ("user", "And its colour?")]
    ids = encode_conversation(t, turns, num_image_tokens=3, system="Be brief.")
    e = ids.index(TOK.eos_id)
    assert ids[0] == TOK.bos_id and ids.count(TOK.eos_id) == 1 and ids.count(TOK.image_id) == 3
    i = ids.index(TOK.boi_id)
    assert ids[i : i + 5] == [TOK.boi_id] + [TOK.image_id] * 3 + [TOK.eoi_id]
    assert t.decode(ids[1:i]) == "Be brief.\n\n<|User|>: "
    assert t.decode(ids[i + 5 : e]) == "\nWhat is it?\n\n<|Assistant|>: A cat."
    assert t.decode(ids[e + 1 :]) == "<|User|>: And its colour?\n\n<|Assistant|>:"
    assert t.decode(encode_conversation(t, [("user", "hi")], system="")[1:]) == "<|User|>: hi\n\n<|Assistant|>:"
    for bad in ([], [("assistant", "a")], [("user", "a"), ("assistant", "b")], [("user", "a"), ("user", "b")],
                [("system", "a"), ("user", "b")]):
        with pytest.raises(ValueError, match="alternate"):
            encode_conversation(t, bad)


def test_a_conversation_strips_each_message_as_the_official_processor_does():
    """The official processor strips each message's content and the whole prompt: an earlier answer sent back as the
    server gave it (its leading space) is "<|Assistant|>: A cat." with one space, a user turn that ends with its
    image has two newlines after it (not three), a system prompt's leading space goes."""
    t = tok()
    sent = [("user", " <image_placeholder>\nWhat is it? "), ("assistant", " A cat.\n"),
            ("user", "And this one?\n<image_placeholder>\n")]
    clean = [("user", "<image_placeholder>\nWhat is it?"), ("assistant", "A cat."),
             ("user", "And this one?\n<image_placeholder>")]
    ids = encode_conversation(t, sent, num_image_tokens=3, system=" Be brief.")
    assert ids == encode_conversation(t, clean, num_image_tokens=3, system="Be brief.")
    e = ids.index(TOK.eos_id)
    assert t.decode(ids[1:ids.index(TOK.boi_id)]) == "Be brief.\n\n<|User|>: "
    assert t.decode(ids[:e]).endswith("\n\n<|Assistant|>: A cat.")
    last_eoi = len(ids) - 1 - ids[::-1].index(TOK.eoi_id)
    assert ids[last_eoi + 1:] == t.encode("\n\n<|Assistant|>:")


def bpe_tokenizer(pre_tokenizer: str) -> JanusTokenizer:
    """A byte-level BPE with merges (trained here on template-like text; the byte-level test tokenizer above has
    none, so no piece boundary could change its ids), pre-tokenized as GPT-2 ("gpt2") or as DeepSeek LLM's
    tokenizer.json does ("deepseek": its Split regexes, shortened to ASCII letters, then bytes)."""
    import random

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from janus_rt.tokenizer import special_ids

    tok = Tokenizer(models.BPE())
    if pre_tokenizer == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        splits = [r"[\r\n]", r"\s?[A-Za-z]+", r"\s?[!-/:-~]+", r"\s+$", r"\p{N}+"]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), "isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    words = ["a", "cat", "red", "What", "is", "it", "colour", "shape", "star", "Yes", "no", "2", "42", "!", "?", ":",
             "...", "'s", "\n", "<|User|>:", "<|Assistant|>:"]
    corpus = [SYSTEM_PROMPT] + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return JanusTokenizer(tok, special_ids(tok))


@pytest.mark.parametrize("pre_tokenizer", ["gpt2", "deepseek"])
def test_a_chat_is_the_whole_template_encoded_at_once(pre_tokenizer):
    """encode_chat encodes each answer apart from the prompt before it (training marks those ids for its loss) and
    the text between images apart; with a BPE whose merges could cross those places, its ids are still those of the
    whole templated string encoded at once (special tokens split it, as the official processor's tokenizer does),
    for answers that start with letters, digits, punctuation, quotes or other scripts, and images anywhere in user
    turns. Its mask marks exactly each answer's ids and EOS."""
    import random

    from janus_rt.processing import encode_chat

    t = bpe_tokenizer(pre_tokenizer)
    assert len(t.encode("<|User|>: What is it?")) < len("<|User|>: What is it?")  # (merges, or the test is void)
    rng = random.Random(1)
    pieces = ["What", " is", "it", "?", " a cat", "42", " 7", "!", "...", "'s", "\n", " ", "colour:", "Yes.", "é",
              "中文", "<image_placeholder>", "\t", ":", " <|User|>"]
    eos, img = SPECIAL_TOKENS["eos_id"], "<image_placeholder>"
    for case in range(200):
        turns = []
        for k in range(rng.choice([1, 2, 3]) * 2):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
            if k % 2:
                text = text.replace(img, "x")
            turns.append(("user" if k % 2 == 0 else "assistant", text))
        if rng.random() < 0.5:
            turns.pop()  # a prompt: ends with the user's turn
        system = rng.choice([SYSTEM_PROMPT, "", "Be brief."])
        whole = f"{system}\n\n" if system else ""
        for role, text in turns:
            text = text.strip()
            whole += f"<|User|>: {text}\n\n<|Assistant|>:" if role == "user" else f" {text}{eos}"
        want = []
        for i in [t.bos_id] + t.encode(whole):
            want += [t.boi_id] + [t.image_id] * 3 + [t.eoi_id] if i == t.image_id else [i]
        ids, answer = encode_chat(t, turns, num_image_tokens=3, system=system)
        assert ids == want, (case, turns)
        marked, expect = [i for i, a in zip(ids, answer) if a], []
        for role, text in turns:
            if role == "assistant":
                expect += t.encode(" " + text.strip()) + [t.eos_id]
        assert marked == expect and len(answer) == len(ids)
        if turns[-1][0] == "user":
            assert encode_conversation(t, turns, num_image_tokens=3, system=system) == ids
    with pytest.raises(ValueError, match="assistant turn holds"):
        encode_chat(t, [("user", "hi"), ("assistant", f"see {img}")])
    with pytest.raises(ValueError, match="alternate"):
        encode_conversation(t, [("user", "hi"), ("assistant", "ok")])


def test_understanding_prompt_expands_placeholders():
    t = tok()
    ids = encode_understanding_prompt(t, "What is it?", num_images=2, num_image_tokens=5)
    assert ids[0] == TOK.bos_id
    assert ids.count(TOK.image_id) == 10 and ids.count(TOK.boi_id) == 2 and ids.count(TOK.eoi_id) == 2
    i = ids.index(TOK.boi_id)
    assert ids[i : i + 7] == [TOK.boi_id] + [TOK.image_id] * 5 + [TOK.eoi_id]
    text = t.decode([x for x in ids[1:] if x not in (TOK.boi_id, TOK.image_id, TOK.eoi_id)])
    assert text.startswith(SYSTEM_PROMPT + "\n\n<|User|>: ") and text.endswith("What is it?\n\n<|Assistant|>:")


def test_text_stream_returns_what_decode_does():
    """An answer decoded as its ids arrive: each push returns only complete characters (a UTF-8 character split over
    byte tokens comes out whole, with its last byte), and the pieces plus finish() are decode(ids) exactly, for
    random mixes of text bytes (invalid UTF-8 among them), special ids and ids the tokenizer lacks."""
    import random

    tok = JanusTokenizer.byte_level(1024, TokenConfig(bos_id=1000, eos_id=1001, pad_id=1002, boi_id=1003, eoi_id=1004,
                                                      image_id=1005))
    text = tok.encode("héllo wörld 日本 ✓ ok")
    stream = tok.stream()
    pieces = [stream.push(i) for i in text]
    assert pieces[:3] == ["h", "", "é"] and "".join(pieces) == "héllo wörld 日本 ✓ ok" and stream.finish() == ""
    specials = [1000, 1001, 1002, 1005, 1023]  # 1023: an id the tokenizer lacks
    for seed in range(300):
        r = random.Random(seed)
        ids = [r.choice(text) if r.random() < 0.8 else r.choice(specials) for _ in range(r.randint(1, 40))]
        stream = tok.stream()
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.finish() == tok.decode(ids), ids


def test_special_ids_read_from_tokenizer():
    from janus_rt.tokenizer import special_ids

    got = special_ids(tok().tok)
    assert vars(got) == vars(TOK)


def test_long_texts_encode_to_the_same_ids():
    """Past LONG_TEXT characters encode() goes through encode_batch (which lets other threads run): the same ids,
    special tokens and a multi-byte character across the threshold included."""
    from janus_rt.tokenizer import LONG_TEXT

    t = tok()
    for text in ("é<image_placeholder>ab 中" * (LONG_TEXT // 8), "x" * (LONG_TEXT + 1), "y" * LONG_TEXT):
        assert t.encode(text) == t.tok.encode(text, add_special_tokens=False).ids
    assert len("é<image_placeholder>ab 中" * (LONG_TEXT // 8)) > LONG_TEXT


def test_preprocess_pads_to_grey_square():
    img = Image.new("RGB", (200, 100), (255, 0, 0))  # wide: long side -> 64, padded top and bottom
    x = preprocess_image(img, image_size=64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    grey = (127 / 255 - 0.5) / 0.5
    assert torch.allclose(x[:, 0, 0], torch.full((3,), grey))  # padding
    assert torch.allclose(x[:, 32, 32], torch.tensor([1.0, -1.0, -1.0]))  # red, scaled to [-1, 1]
    assert torch.allclose(x[:, 15, 32], torch.full((3,), grey)) and torch.allclose(x[:, 17, 32], x[:, 32, 32])


def test_to_uint8_is_official_rounding():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 6, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]  # truncation, not rounding


def test_generate_images_takes_one_string_as_one_prompt(capsys):
    """A string is one prompt (iterated, it was a prompt per character: 12 requests for 'a red circle'); no prompts,
    or an n that is not an int >= 1, is a UsageError before an engine is sized."""
    from janus_rt import Janus
    from janus_rt.errors import UsageError
    from janus_rt.processing import generate_images

    m = Janus.from_preset("tiny", seed=0)
    t = JanusTokenizer.byte_level(m.cfg.llm.vocab_size, m.cfg.tokens)
    out, eng = generate_images(m, t, "a red circle", n=1, progress=False, greedy=True)
    assert len(out) == 1 and len(out[0]) == 1 and len(eng.finished) == 1
    assert out[0][0].tobytes() == generate_images(m, t, ["a red circle"], n=1, progress=False,
                                                  greedy=True)[0][0][0].tobytes()
    generate_images(m, t, "a red circle", n=2, progress=True)  # the bar says what runs after the last token
    assert "decoding 2 image(s)" in capsys.readouterr().err
    for prompts, n, message in [([], 1, "no prompts"), (["a"], 0, "n must be"), (["a"], 2.5, "n must be")]:
        with pytest.raises(UsageError, match=message):
            generate_images(m, t, prompts, n=n, progress=False)


def test_generate_images_writes_whole_pngs_only(tmp_path, monkeypatch):
    """Each PNG is written beside its name and renamed into place: a save interrupted part-way (Ctrl-C) leaves
    neither a broken PNG nor the partial file; `written` lists exactly the PNGs that were completed."""
    from janus_rt import Janus
    from janus_rt.processing import generate_images

    m = Janus.from_preset("tiny", seed=0)
    t = JanusTokenizer.byte_level(m.cfg.llm.vocab_size, m.cfg.tokens)
    real_save, saves = Image.Image.save, []

    def save(im, fp, *a, **kw):
        saves.append(fp)
        if len(saves) == 3:  # the third PNG: part of it, then Ctrl-C
            Path(fp).write_bytes(b"\x89PNG partial")
            raise KeyboardInterrupt
        return real_save(im, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", save)
    written = []
    with pytest.raises(KeyboardInterrupt):
        generate_images(m, t, ["a", "b"], n=2, out_dir=tmp_path / "o", progress=False, written=written)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [p.name for p in written] == ["img_00_00.png",
                                                                                              "img_00_01.png"]
    assert all(Image.open(p).size[0] > 0 for p in written)


def test_generate_images_keep_images(tmp_path):
    """keep_images=False: the prompts past the grid's rows come back as None, their PNGs on disk; the grid holds
    max_grid_rows rows; keep_images=True (the default) returns every prompt's images, the same ones."""
    from janus_rt import Janus
    from janus_rt.processing import generate_images

    m = Janus.from_preset("tiny", seed=0)
    t = JanusTokenizer.byte_level(m.cfg.llm.vocab_size, m.cfg.tokens)
    prompts = ["a", "b", "c"]
    out, _ = generate_images(m, t, prompts, n=2, out_dir=tmp_path / "o", progress=False, max_grid_rows=1,
                             keep_images=False)
    assert out[0] is not None and out[1] is None and out[2] is None
    assert Image.open(tmp_path / "o" / "grid.png").size == (2 * 128 + 2, 128)
    full, _ = generate_images(m, t, prompts, n=2, progress=False)
    assert [len(x) for x in full] == [2, 2, 2]
    for k in range(3):
        for i in range(2):
            saved = Image.open(tmp_path / "o" / f"img_{k:02d}_{i:02d}.png").convert("RGB").tobytes()
            assert saved == full[k][i].tobytes()


def test_generate_images_default_cfg_is_the_checkpoints(tmp_path):
    """cfg_weight not given: the model's guidance_scale (its checkpoint's generation_config.json), else 5, as
    `janus-rt generate` picks --cfg; the PNGs record the weight used."""
    from janus_rt import Janus
    from janus_rt.processing import generate_images, png_parameters

    m = Janus.from_preset("tiny", seed=0)
    t = JanusTokenizer.byte_level(m.cfg.llm.vocab_size, m.cfg.tokens)
    for guidance, want in ((None, 5.0), (1.5, 1.5)):
        m.guidance_scale = guidance
        out = tmp_path / str(want)
        images, _ = generate_images(m, t, ["a cat"], n=1, seed=3, out_dir=out, progress=False)
        assert png_parameters(out / "img_00_00.png")["cfg_weight"] == want
        given, _ = generate_images(m, t, ["a cat"], n=1, seed=3, cfg_weight=want, progress=False)
        assert given[0][0].tobytes() == images[0][0].tobytes()


def test_generate_images_refuses_seeds_past_64_bits():
    """Prompt k samples with seed + k: a seed whose last prompt would pass 2^64 (or a negative one) is refused
    before any request is added, not by the engine part way through."""
    from janus_rt import Janus
    from janus_rt.errors import UsageError
    from janus_rt.processing import generate_images

    m = Janus.from_preset("tiny", seed=0)
    t = JanusTokenizer.byte_level(m.cfg.llm.vocab_size, m.cfg.tokens)
    for seed, prompts in ((2**64 - 1, ["a", "b"]), (-1, ["a"]), (2.5, ["a"])):
        with pytest.raises(UsageError, match=r"seed must be an int with seed \+ \d+ .* in \[0, 2\^64\)"):
            generate_images(m, t, prompts, n=1, seed=seed, progress=False)


def test_pngs_carry_their_parameters(tmp_path):
    """Each PNG generate_images writes names what made it; regenerating from those parameters alone gives the same
    image (the seed written is the prompt's own: seed + its index)."""
    from janus_rt import Janus, __version__
    from janus_rt.processing import generate_images, png_parameters

    m = Janus.from_preset("tiny", seed=0)
    t = JanusTokenizer.byte_level(m.cfg.llm.vocab_size, m.cfg.tokens)
    generate_images(m, t, ["a cat", "a dog"], n=2, seed=7, cfg_weight=3.0, temperature=0.9, top_k=50,
                    out_dir=tmp_path, progress=False, info={"model": "tiny"})
    p = png_parameters(tmp_path / "img_01_01.png")
    assert p == {"prompt": "a dog", "seed": 8, "image": 1, "n": 2, "cfg_weight": 3.0, "temperature": 0.9, "top_k": 50,
                 "top_p": 1.0, "greedy": False, "model": "tiny"}
    import numpy as np  # a library caller's numpy numbers and odd info values are written, not a crash mid-run

    generate_images(m, t, ["a cat"], n=1, seed=np.int64(7), cfg_weight=np.float32(3.0), out_dir=tmp_path / "np",
                    progress=False, info={"path": tmp_path})
    assert png_parameters(tmp_path / "np" / "img_00_00.png")["seed"] == 7
    assert png_parameters(tmp_path / "np" / "img_00_00.png")["path"] == str(tmp_path)
    assert Image.open(tmp_path / "img_01_01.png").text["janus_rt"] == __version__
    again, _ = generate_images(m, t, [p["prompt"]], n=p["n"], seed=p["seed"], cfg_weight=p["cfg_weight"],
                               temperature=p["temperature"], top_k=p["top_k"], top_p=p["top_p"], progress=False)
    assert again[0][p["image"]].tobytes() == Image.open(tmp_path / "img_01_01.png").convert("RGB").tobytes()
    assert png_parameters(tmp_path / "grid.png") == {}
    from PIL.PngImagePlugin import PngInfo

    for text in ("a photo, Steps: 20, Sampler: Euler", "[1, 2]"):  # other programs' "parameters" chunks
        meta = PngInfo()
        meta.add_text("parameters", text)
        Image.new("RGB", (4, 4)).save(tmp_path / "other.png", pnginfo=meta)
        assert png_parameters(tmp_path / "other.png") == {}


def test_image_grid_layout():
    from PIL import Image

    from janus_rt.processing import image_grid

    ims = [Image.new("RGB", (30, 30), (10 * i, 0, 0)) for i in range(5)]
    g = image_grid(ims)  # 3 columns, 2 rows, native size, white where no image is
    assert g.size == (90, 60) and g.getpixel((35, 35)) == (40, 0, 0) and g.getpixel((70, 40)) == (255, 255, 255)
    g = image_grid(ims, cols=5, min_side=100, gap=2)  # 30 px -> x4 = 120 px (the smallest whole factor >= 100)
    assert g.size == (5 * 120 + 4 * 2, 120)
    assert g.getpixel((3 * 122 + 119, 119)) == (30, 0, 0) and g.getpixel((120, 5)) == (255, 255, 255)
    assert image_grid(ims[:1], min_side=16).size == (30, 30)  # already large enough: unchanged
    wide = [Image.new("RGB", (64, 16), (0, 0, 200))] * 2  # the short side sets the factor: 16 -> x8 = 128
    assert image_grid(wide, cols=1, min_side=128).size == (512, 256)


def test_preprocess_is_the_official_recipe():
    """Any PIL mode (grey, RGBA, palette) is read as RGB; the long side goes to S and the short one to int(S * short /
    long) (truncated, at least min_size), bicubic; centred on the grey square with the odd pixel after it; then
    /255, (x - 0.5) / 0.5. Pinned against that recipe written out with PIL for a noise image of each orientation."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (130, 200, 3), dtype=np.uint8))  # 200 x 130: 64 x 41, 23 rows to pad

    def recipe(img, size, box, at):
        canvas = Image.new("RGB", (size, size), (127, 127, 127))
        canvas.paste(img.convert("RGB").resize(box, Image.BICUBIC), at)
        return (torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5

    assert torch.equal(preprocess_image(noise, 64), recipe(noise, 64, (64, 41), (0, 11)))
    tall = noise.transpose(Image.Transpose.TRANSPOSE)
    assert torch.equal(preprocess_image(tall, 64), recipe(tall, 64, (41, 64), (11, 0)))
    for mode in ("L", "RGBA", "P"):
        im = noise.convert(mode)
        assert torch.equal(preprocess_image(im, 64), preprocess_image(im.convert("RGB"), 64)), mode
    thin = Image.new("RGB", (400, 2), (255, 0, 0))  # 64 x 0 -> 64 x 14 rows (min_size), rows 25..38
    x = preprocess_image(thin, 64)
    assert torch.equal(x[:, 25:39], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 14, 64))
    assert (x[:, :25] != x[:, 25:26]).all() and (x[:, 39:] != x[:, 25:26]).all()


def test_unconditional_rows_of_a_batch():
    """unconditional_ids of a [B, T] batch pads each row's middle, keeping each row's BOS and <begin_of_image>."""
    ids = torch.tensor([[1, 5, 6, 7, 9], [1, 8, 8, 8, 9]])
    assert unconditional_ids(ids, 0).tolist() == [[1, 0, 0, 0, 9], [1, 0, 0, 0, 9]]
    assert ids[0, 1] == 5  # (a copy: the prompt's ids are untouched)
