"""Manifests, synthetic data, token cache and sample layouts (janus_rt.train.synthetic / janus_rt.train.data)."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from janus_rt.processing import encode_conversation
from janus_rt.train.data import (IGNORE, SYSTEM_PROMPT, DataWarning, ManifestDataset, read_manifest)
from janus_rt.train.synthetic import (PALETTE, QUESTIONS, SHAPES, caption_color_match, caption_colors, caption_shape,
                                      classify_shape, count_objects, dominant_colors, draw_shape, make_synthetic,
                                      shape_ious)

N = 16  # image tokens per image in these tests (576 in the real model)


class FakeTok:
    """One id per character; special ids below 100 so they never collide with text."""
    bos_id, eos_id, pad_id, boi_id, eoi_id, image_id = 1, 2, 3, 4, 5, 6

    def encode(self, text):
        return [100 + ord(c) for c in text]


class FakeVQ:
    """encode_fn: [B, 3, S, S] in [-1, 1] -> [B, N] ids from 4x4 patch means; counts calls and images."""

    def __init__(self):
        self.calls = self.images = 0

    def __call__(self, x):
        assert x.dim() == 4 and x.shape[1] == 3 and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        self.calls += 1
        self.images += x.shape[0]
        return ((F.adaptive_avg_pool2d(x, 4).sum(1).flatten(1) + 3) * 1000).round().long()  # [B, 16]


def preprocess(im):  # PIL -> [3, 8, 8]
    return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def enc(text):
    return FakeTok().encode(text)


def write_manifest(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def make_ds(manifest, vq=None, **kw):
    kw.setdefault("image_size", 16)
    return ManifestDataset(manifest, FakeTok(), N, vq or FakeVQ(), preprocess, **kw)


# ---- synthetic ---------------------------------------------------------------------------------------------

def test_synthetic_wordings_change_only_the_questions(tmp_path):
    """wordings=True asks each understanding record's question in one of its trained wordings, drawn at random (the
    same draw every time), never a held-out one; images, captions, answers and text records are those of the set
    without wordings."""
    from janus_rt.train.synthetic import HELDOUT_WORDINGS, question_wordings

    plain = make_synthetic(tmp_path / "a", n=40, image_size=16, seed=3)
    worded = make_synthetic(tmp_path / "b", n=40, image_size=16, seed=3, wordings=True)
    again = make_synthetic(tmp_path / "c", n=40, image_size=16, seed=3, wordings=True)
    assert again.read_bytes() == worded.read_bytes()
    a = [json.loads(line) for line in plain.read_text().splitlines()]
    b = [json.loads(line) for line in worded.read_text().splitlines()]
    assert len(a) == len(b) == 120
    heldout = {q for forms in HELDOUT_WORDINGS.values() for q in forms}
    asked = {k: set() for k in QUESTIONS}
    for ra, rb in zip(a, b):
        if ra["kind"] != "und":
            assert ra == rb
            continue
        assert ra["image"] == rb["image"] and ra["conversation"][1] == rb["conversation"][1]  # the same answer
        kind = next(k for k, q in QUESTIONS.items() if ra["conversation"][0]["content"].endswith("\n" + q))
        question = rb["conversation"][0]["content"].removeprefix("<image_placeholder>\n")
        assert question in question_wordings(kind) and question not in heldout
        asked[kind].add(question)
    for i in range(40):
        name = f"images/{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert all(len(forms) >= 3 for forms in asked.values()), asked  # 10 draws of each kind's 8 wordings
    every = [q for k in QUESTIONS for which in ("trained", "heldout") for q in question_wordings(k, which)]
    assert len(set(every)) == len(every)  # no wording in two kinds, none both trained and held out
    assert question_wordings("shape", "canonical") == (QUESTIONS["shape"],)
    with pytest.raises(ValueError, match="kind must be"):
        question_wordings("size")


def test_synthetic_valid_and_deterministic(tmp_path):
    m1 = make_synthetic(tmp_path / "a", n=6, image_size=32, seed=3)
    m2 = make_synthetic(tmp_path / "b", n=6, image_size=32, seed=3)
    m3 = make_synthetic(tmp_path / "c", n=6, image_size=32, seed=4)
    assert m1.read_bytes() == m2.read_bytes() != m3.read_bytes()
    for i in range(6):
        name = f"images/{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    records, skipped = read_manifest(m1)
    assert skipped == []
    assert [r.kind for r in records] == ["t2i", "und", "text"] * 6
    for t2i, und, text in zip(records[0::3], records[1::3], records[2::3]):
        img = Image.open(t2i.images[0])
        assert img.size == (32, 32) and img.mode == "RGB"
        shape_color, background = caption_colors(t2i.caption)
        assert t2i.caption.endswith(f"{background} background") and shape_color != background
        assert dominant_colors(img, k=1)[0][0] == background  # the shape never covers most of the frame
        assert caption_color_match(img, t2i.caption) == 1.0
        assert count_objects(img, shape_color) == 1 and count_objects(img, background) == 1
        (_, question), (_, answer) = und.turns
        assert und.images == t2i.images and question.startswith("<image_placeholder>\n")
        if question.endswith(QUESTIONS["color"]):
            assert answer == shape_color.capitalize() + "."
        if question.endswith(QUESTIONS["background"]):
            assert answer == background.capitalize() + "."
        if question.endswith(QUESTIONS["shape"]):
            assert answer[2:-1] in t2i.caption
        assert text.text.strip()


def test_color_helpers():
    assert caption_colors("a Grey square on an orange background") == ["gray", "orange"]
    assert caption_colors("nothing here") == []
    arr = np.empty((40, 40, 3), np.uint8)
    arr[:] = PALETTE["blue"]
    arr[10:20, 10:20] = PALETTE["red"]
    arr[0, 0] = (250, 10, 10)  # near red
    names = dominant_colors(arr)
    assert [n for n, _ in names] == ["blue", "red"] and names[1][1] == pytest.approx(101 / 1600)
    assert caption_color_match(arr, "a red square on a blue background") == 1.0
    assert caption_color_match(arr, "a red square on a green background") == 0.5
    assert caption_color_match(Image.fromarray(arr), "a yellow star on a white background") == 0.0
    with pytest.raises(ValueError):
        dominant_colors(arr.astype(np.float32))


def test_count_objects():
    arr = np.empty((40, 40, 3), np.uint8)
    arr[:] = PALETTE["blue"]
    arr[2:12, 2:12] = PALETTE["red"]      # object 1
    arr[20:30, 5:8] = (250, 10, 10)       # object 2: near red, 30 pixels
    arr[12, 12] = PALETTE["red"]          # touches object 1 only at a corner: a speck of its own
    arr[35:37, 35:37] = PALETTE["red"]    # a 4-pixel speck
    arr[2:12, 20:30] = PALETTE["gray"]
    arr[5:7, 20:30] = PALETTE["blue"]     # cuts the grey square in two
    assert count_objects(arr, "red") == 2
    assert count_objects(arr, "red", min_pixels=1) == 4
    assert count_objects(Image.fromarray(arr), "grey") == count_objects(arr, "gray") == 2
    assert count_objects(arr, "blue") == 1 and count_objects(arr, "green") == 0
    with pytest.raises(ValueError, match="not a palette colour"):
        count_objects(arr, "teal")


def test_classify_shape_finds_draw_shapes_shapes():
    """Every shape draw_shape draws is found again from its pixels: all at 128 px; at 32 px (the embedded model's
    images) all but circle / hexagon / pentagon mix-ups, which few pixels barely tell apart."""
    rng = np.random.default_rng(3)
    names = list(PALETTE)
    for size, least in ((128, 1.0), (32, 0.85)):
        right, confused = 0, set()
        for i in range(140):
            shape = list(SHAPES)[i % len(SHAPES)]
            color, background = (names[j] for j in rng.choice(len(names), 2, replace=False))
            img, _ = draw_shape(shape, color, background, size, rng)
            got = classify_shape(img, color)
            right += got == shape
            if got != shape:
                confused.add(frozenset((shape, got)))
        assert right / 140 >= least, (size, right)
        assert all(pair <= {"circle", "hexagon", "pentagon"} for pair in confused), confused


def test_shape_ious_and_caption_shape():
    arr = np.empty((40, 40, 3), np.uint8)
    arr[:] = PALETTE["blue"]
    arr[10:30, 10:30] = PALETTE["red"]  # an axis-aligned square: draw_shape's "square" (a diamond turned 45 degrees)
    ious = shape_ious(arr, "red")
    assert set(ious) == set(SHAPES) and max(ious, key=ious.get) == "square" and ious["square"] > 0.9
    assert ious["diamond"] < 0.8 and classify_shape(Image.fromarray(arr), "red") == "square"
    arr[:] = PALETTE["blue"]
    arr[5:35, 18:22] = PALETTE["red"]  # a bar: no shape fits it well, but something is named
    assert classify_shape(arr, "red") in SHAPES and max(shape_ious(arr, "red").values()) < 0.6
    assert shape_ious(arr, "green") == {} and classify_shape(arr, "green") is None  # no such pixels
    with pytest.raises(ValueError, match="not a palette colour"):
        shape_ious(arr, "teal")
    assert caption_shape("a large red Circle on a blue background") == "circle"
    assert caption_shape("A star and a hexagon are different shapes.") == "star"
    assert caption_shape("two squares") == "square" and caption_shape("a red thing") is None


# ---- manifest validation -----------------------------------------------------------------------------------

def test_bad_records_reported_with_file_and_line(tmp_path):
    make_synthetic(tmp_path, n=2, image_size=16, seed=0)
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    png = (tmp_path / "images/000000.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[:len(png) // 2])  # header fine, pixels missing
    conv = [{"role": "user", "content": "<image_placeholder>\nWhat?"}, {"role": "assistant", "content": "A."}]
    good_t2i = {"kind": "t2i", "caption": "a red circle", "image": "images/000000.png"}
    lines = [
        good_t2i,                                                                   # 1
        {"kind": "t2i", "caption": "x", "image": "images/missing.png"},             # 2
        {"kind": "t2i", "caption": "x", "image": "garbage.png"},                    # 3
        {"kind": "t2i", "caption": "  ", "image": "images/000001.png"},             # 4
        '{"kind": "text", "text": "unterminated',                                   # 5
        {"kind": "video", "text": "?"},                                             # 6
        "",                                                                         # 7 blank: not a record
        {"kind": "und", "image": "images/000001.png", "conversation": conv[:1]},     # 8
        {"kind": "und", "image": ["images/000000.png", "images/000001.png"], "conversation": conv},  # 9
        {"kind": "text", "text": ""},                                               # 10
        {"kind": "text", "text": "fine"},                                           # 11
        {"kind": "t2i", "caption": "half", "image": "truncated.png"},               # 12 fails at encode time
        {"kind": "und", "image": "truncated.png", "conversation": conv},            # 13 fails when sampled
        [1, 2],                                                                     # 14
        {"kind": "und", "image": "images/000001.png", "conversation": conv},        # 15
    ]
    m = write_manifest(tmp_path / "m.jsonl", lines)
    with open(m, "ab") as f:
        f.write(b'{"kind": "text", "text": "\xff"}\n')                            # 16 not UTF-8
    with pytest.warns(DataWarning) as caught:
        ds = make_ds(m)
    expected = {2: "image not found", 3: "unreadable image", 4: "empty caption", 5: "bad JSON",
                6: "unknown kind 'video'", 8: "must end with an assistant turn",
                9: "1 <image_placeholder> tag(s) for 2", 10: "empty text", 12: "unreadable image",
                14: "not a JSON object", 16: "bad JSON"}
    assert sorted(line for _, line, _ in ds.skipped) == sorted(expected)
    for path, line, reason in ds.skipped:
        assert path == str(m) and expected[line] in reason, (line, reason)
    messages = [str(w.message) for w in caught]
    for line in expected:
        assert any(msg.startswith(f"{m}:{line}: skipped") for msg in messages), line
    assert any("skipped 10 of" in msg for msg in messages)  # the summary (line 12 is found later)
    assert [r.line for r in ds.records] == [1, 11, 13, 15]

    with pytest.warns(DataWarning, match=f"{m}:13: skipped: unreadable image"):
        assert ds.sample(2) is None
    assert ds.skipped[-1][1] == 13
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds.sample(2) is None  # reported once only
        assert ds.sample(3).kind == "und"

    # a rebuilt dataset reads the encode-time failure back from the cache and reports it again
    vq = FakeVQ()
    with pytest.warns(DataWarning) as caught:
        make_ds(m, vq)
    assert vq.calls == 0 and any(str(w.message).startswith(f"{m}:12: skipped: unreadable image") for w in caught)


def test_missing_functions_raise(tmp_path):
    m = make_synthetic(tmp_path, n=1, image_size=16, seed=0)
    with pytest.raises(ValueError, match="preprocess_fn"):
        ManifestDataset(m, FakeTok(), N, FakeVQ(), None, image_size=16)
    with pytest.raises(ValueError, match="no encode_fn"):
        ManifestDataset(m, FakeTok(), N, None, preprocess, image_size=16)
    with pytest.raises(ValueError, match="integer ids"):
        ManifestDataset(m, object(), N, FakeVQ(), preprocess, image_size=16)
    with pytest.raises(ValueError, match="integer ids \\[1, 16\\]"):
        ManifestDataset(m, FakeTok(), N, lambda x: torch.zeros(x.shape[0], 5, dtype=torch.long), preprocess,
                        image_size=16)


# ---- token cache -------------------------------------------------------------------------------------------

def test_token_cache_built_once_and_invalidated(tmp_path):
    m = make_synthetic(tmp_path, n=5, image_size=24, seed=1)
    vq = FakeVQ()
    ds1 = make_ds(m, vq, encode_batch_size=2, shard_size=3)
    assert vq.images == 5 and vq.calls == 3  # batches of 2, 2, 1
    shards = sorted(p.name for p in (tmp_path / ".janus_cache").iterdir())
    assert len(shards) == 3 and shards[-1].endswith(".json")  # 2 shards (3 + 2 images) and the index

    ds2 = make_ds(m, vq, encode_batch_size=2, shard_size=3)
    assert vq.calls == 3  # read from the cache
    assert torch.equal(ds1.image_tokens, ds2.image_tokens) and ds1.image_tokens.dtype == torch.int32
    ds3 = ManifestDataset(m, FakeTok(), N, None, preprocess, image_size=16)  # no encoder needed any more
    assert torch.equal(ds3.image_tokens, ds1.image_tokens)

    # the tokens are those of the images, in record order
    from janus_rt.train.data import load_gen_image
    first = ds1.records[ds1.indices["t2i"][0]]
    assert torch.equal(ds1.image_tokens[0].long(), FakeVQ()(load_gen_image(first.images[0], 16)[None])[0])

    with open(m, "a") as f:  # manifest changed: rebuilt, old shards removed
        f.write(json.dumps({"kind": "text", "text": "one more"}) + "\n")
    make_ds(m, vq)
    assert vq.images == 10
    assert len(list((tmp_path / ".janus_cache").iterdir())) == 2
    make_ds(m, vq, image_size=8)  # image size changed: rebuilt
    assert vq.images == 15
    make_ds(m, vq, cache_dir=tmp_path / "elsewhere")
    assert vq.images == 20 and len(list((tmp_path / "elsewhere").iterdir())) == 2


# ---- sample layouts ----------------------------------------------------------------------------------------

@pytest.fixture
def one_of_each(tmp_path):
    make_synthetic(tmp_path, n=2, image_size=16, seed=0)
    conv = [{"role": "user", "content": "<image_placeholder>\nWhat shape?"},
            {"role": "assistant", "content": "A star."},
            {"role": "user", "content": "And <image_placeholder> this?"},
            {"role": "assistant", "content": "Red."}]
    return write_manifest(tmp_path / "m.jsonl", [
        {"kind": "t2i", "caption": "a red star", "image": "images/000001.png"},
        {"kind": "und", "image": ["images/000000.png", "images/000001.png"], "conversation": conv},
        {"kind": "text", "text": "Hi."},
    ])


def test_t2i_layout(one_of_each):
    ds = make_ds(one_of_each, cfg_drop=0.0)
    s = ds[0]
    img = ds.image_tokens[0].long().tolist()
    prompt = [1] + enc("<|User|>: a red star\n\n<|Assistant|>:") + [4]
    p = len(prompt)
    assert s.kind == "t2i" and s.pixel_values is None
    assert s.input_ids.tolist() == prompt + img + [5]
    assert s.is_gen_image.tolist() == [False] * p + [True] * N + [False]
    assert s.image_labels.tolist() == [IGNORE] * (p - 1) + img + [IGNORE] * 2
    assert s.text_labels.tolist() == [IGNORE] * (p + N + 1)
    # shifted: wherever there is an image label it is the next input token
    at = (s.image_labels != IGNORE).nonzero().flatten()
    assert torch.equal(s.image_labels[at], s.input_ids[at + 1]) and s.is_gen_image[at + 1].all()


def test_und_layout(one_of_each):
    ds = make_ds(one_of_each)
    s = ds[1]
    block = [4] + [6] * N + [5]
    prompt1 = [1] + enc(SYSTEM_PROMPT + "\n\n<|User|>: ") + block + enc("\nWhat shape?\n\n<|Assistant|>:")
    answer1 = enc(" A star.") + [2]
    prompt2 = enc("<|User|>: And ") + block + enc(" this?\n\n<|Assistant|>:")
    answer2 = enc(" Red.") + [2]
    assert s.input_ids.tolist() == prompt1 + answer1 + prompt2 + answer2
    labels = [IGNORE] * (len(prompt1) - 1) + answer1 + [IGNORE] * len(prompt2) + answer2 + [IGNORE]
    assert s.text_labels.tolist() == labels
    assert not s.is_gen_image.any() and (s.image_labels == IGNORE).all()
    want = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in ds.records[1].images])
    assert s.pixel_values.shape == (2, 3, 8, 8) and torch.equal(s.pixel_values, want)

    s = make_ds(one_of_each, system_prompt="")[1]
    assert s.input_ids.tolist()[:12] == [1] + enc("<|User|>: ") + [4]


def test_und_ids_are_what_inference_prompts_with(tmp_path):
    """Training and serving lay a conversation out alike (processing.encode_chat): the ids before a record's last
    answer are encode_conversation's prompt for its turns so far, stripped as the official processor strips each
    message (whitespace around a turn, as manifests often hold, changes nothing)."""
    make_synthetic(tmp_path, n=2, image_size=16, seed=0)
    conv = [{"role": "user", "content": " <image_placeholder>\nWhat shape? "},
            {"role": "assistant", "content": " A star.\n"},
            {"role": "user", "content": "And this?\n<image_placeholder>\n"},
            {"role": "assistant", "content": "Red. "}]
    clean = [{"role": m["role"], "content": m["content"].strip()} for m in conv]
    images = ["images/000000.png", "images/000001.png"]
    m = write_manifest(tmp_path / "m.jsonl", [{"kind": "und", "image": images, "conversation": c}
                                             for c in (conv, clean)])
    ds = make_ds(m)
    s = ds[0]
    assert torch.equal(s.input_ids, ds[1].input_ids) and torch.equal(s.text_labels, ds[1].text_labels)
    turns = [(c["role"], c["content"]) for c in conv]
    prompt = encode_conversation(FakeTok(), turns[:3], num_image_tokens=N)
    assert s.input_ids.tolist() == prompt + enc(" Red.") + [2]
    assert s.text_labels.tolist()[len(prompt) - 1:] == enc(" Red.") + [2, IGNORE]


def test_text_layout(one_of_each):
    s = make_ds(one_of_each)[2]
    ids = [1] + enc("Hi.") + [2]
    assert s.input_ids.tolist() == ids and s.text_labels.tolist() == ids[1:] + [IGNORE]
    assert not s.is_gen_image.any() and (s.image_labels == IGNORE).all() and s.pixel_values is None


def test_cfg_drop_rate_and_form(one_of_each):
    ds = make_ds(one_of_each, cfg_drop=0.1, seed=7)
    cond = make_ds(one_of_each, cfg_drop=0.0)[0]
    p = int((cond.input_ids == 4).nonzero()[0]) + 1  # prompt length, through BOI
    dropped = 0
    for draw in range(2000):
        s = ds.sample(0, draw)
        if torch.equal(s.input_ids, cond.input_ids):
            continue
        dropped += 1
        want = cond.input_ids.clone()
        want[1:p - 1] = 3  # everything but BOS and BOI -> pad
        assert torch.equal(s.input_ids, want)
        for f in ("is_gen_image", "text_labels", "image_labels"):
            assert torch.equal(getattr(s, f), getattr(cond, f))
    assert abs(dropped / 2000 - 0.1) < 0.02  # binomial sd 0.0067
    assert torch.equal(ds.sample(0, 5).input_ids, ds.sample(0, 5).input_ids)  # a pure function of the draw
    assert all(torch.equal(make_ds(one_of_each, cfg_drop=1.0).sample(0, d).input_ids[1:p - 1],
                           torch.full((p - 2,), 3)) for d in range(3))
