"""Mixing, packing and exact resume (janus_rt.train.packing)."""
import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from janus_rt.train.data import IGNORE, DataWarning, ManifestDataset
from janus_rt.train.packing import PackedSampler, prefetch
from janus_rt.train.synthetic import make_synthetic

N = 16


class FakeTok:
    bos_id, eos_id, pad_id, boi_id, eoi_id, image_id = 1, 2, 3, 4, 5, 6

    def encode(self, text):
        return [100 + ord(c) for c in text]


def fake_vq(x):  # [B, 3, S, S] -> [B, 16]
    return ((F.adaptive_avg_pool2d(x, 4).sum(1).flatten(1) + 3) * 1000).round().long()


def preprocess(im):  # PIL -> [3, 4, 4]
    return torch.from_numpy(np.asarray(im.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn"), n=10, image_size=16, seed=0)


def dataset(manifest, **kw):
    kw.setdefault("system_prompt", "Sys.")  # one id per character: keep samples short
    return ManifestDataset(manifest, FakeTok(), N, fake_vq, preprocess, image_size=16, **kw)


def test_mixing_ratio(manifest):
    sampler = PackedSampler(dataset(manifest), batch_size=4, seq_len=512, seed=1)
    kinds = Counter(kind for _ in range(120) for row in sampler.next_batch().docs for kind, _, _ in row)
    total = sum(kinds.values())
    assert total > 2000
    for kind, want in (("und", 0.5), ("text", 0.1), ("t2i", 0.4)):
        assert abs(kinds[kind] / total - want) < 0.03, (kind, kinds)
    only = PackedSampler(dataset(manifest), 2, 256, {"text": 1, "t2i": 0})
    assert {k for row in only.next_batch().docs for k, _, _ in row} == {"text"}


def test_packing_layout(manifest):
    ds = dataset(manifest)
    L, B = 200, 3
    sampler = PackedSampler(ds, batch_size=B, seq_len=L, seed=2, lookahead=4)
    placed = []
    for _ in range(8):
        batch = sampler.next_batch()
        assert batch.input_ids.shape == (B, L) and batch.cu_seqlens.dtype == torch.int32
        seg = batch.cu_seqlens.diff().tolist()
        assert batch.cu_seqlens[-1] == B * L and batch.max_seqlen == max(seg)
        flat_pos, flat_seg = batch.positions.flatten(), batch.segment_ids.flatten()
        for k, (a, b) in enumerate(zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())):
            assert a // L == (b - 1) // L  # no segment crosses a row boundary
            assert flat_pos[a:b].tolist() == list(range(b - a)) and (flat_seg[a:b] == k).all()
        pixels = []
        for r, row in enumerate(batch.docs):
            t = 0
            for kind, index, draw in row:
                s = ds.sample(index, draw)
                n = len(s)
                assert s.kind == kind and t + n <= L
                assert torch.equal(batch.input_ids[r, t:t + n], s.input_ids)
                assert torch.equal(batch.is_gen_image[r, t:t + n], s.is_gen_image)
                assert torch.equal(batch.text_labels[r, t:t + n], s.text_labels)
                assert torch.equal(batch.image_labels[r, t:t + n], s.image_labels)
                if s.pixel_values is not None:
                    pixels.append(s.pixel_values)
                t += n
            assert (batch.input_ids[r, t:] == 3).all() and not batch.is_gen_image[r, t:].any()
            assert (batch.text_labels[r, t:] == IGNORE).all() and (batch.image_labels[r, t:] == IGNORE).all()
            placed.extend(draw for _, _, draw in row)
        assert torch.equal(batch.pixel_values, torch.cat(pixels))
        assert batch.pixel_values.shape[1:] == (3, 4, 4)
    # every draw is placed exactly once or still waits in the buffer
    state = sampler.state_dict()
    waiting = [d for _, d in state["buffer"]]
    assert sorted(placed + waiting) == list(range(state["draws"]))
    # within one epoch each kind visits each of its records once
    first_und = [index for b in [PackedSampler(ds, 4, 400, seed=5).next_batch()] for row in b.docs
                 for kind, index, _ in row if kind == "und"]
    assert len(first_und) == len(set(first_und))


def test_attention_mask(manifest):
    batch = PackedSampler(dataset(manifest), 2, 160, seed=3).next_batch()
    mask = batch.attention_mask()
    assert mask.shape == (2, 160, 160)
    for r in range(2):
        for q in (0, 37, 100, 159):
            keys = mask[r, q].nonzero().flatten()
            start = q - int(batch.positions[r, q])
            assert keys.tolist() == list(range(start, q + 1))


def test_resume_is_exact(manifest):
    a = PackedSampler(dataset(manifest), batch_size=2, seq_len=180, seed=4)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    assert len(json.dumps(state)) < 2000
    rest = [a.next_batch() for _ in range(4)]
    b = PackedSampler(dataset(manifest), batch_size=2, seq_len=180, seed=4)
    b.load_state_dict(state)
    for x, y in zip(rest, (b.next_batch() for _ in range(4))):
        for f in ("input_ids", "is_gen_image", "text_labels", "image_labels", "positions", "cu_seqlens",
                  "segment_ids", "pixel_values"):
            u, v = getattr(x, f), getattr(y, f)
            assert (u is None and v is None) if u is None or v is None else torch.equal(u, v), f
        assert x.docs == y.docs and x.max_seqlen == y.max_seqlen
    fresh = PackedSampler(dataset(manifest), batch_size=2, seq_len=180, seed=4)
    assert not torch.equal(fresh.next_batch().input_ids, rest[0].input_ids)  # the state did matter
    with pytest.raises(ValueError, match="does not match"):
        PackedSampler(dataset(manifest), batch_size=2, seq_len=180, seed=5).load_state_dict(state)


def test_resume_with_a_smaller_seq_len(manifest):
    """A state saved at one seq_len loads into a sampler with a smaller one (a resumed run given a smaller
    --seq-len): the buffered samples it cannot use (truncated to no loss token) are dropped as such draws are, the
    rest kept in order, and batching goes on."""
    mix = {"und": 1, "text": 1}  # (a text sample truncated keeps its loss tokens; an und one here does not)
    a = PackedSampler(dataset(manifest), batch_size=2, seq_len=180, ratios=mix, seed=4)
    a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = PackedSampler(dataset(manifest), batch_size=2, seq_len=12, ratios=mix, seed=4)
    with pytest.warns(DataWarning) as caught:  # (and "truncating samples longer")
        b.load_state_dict(state)
    assert any("dropping samples with no loss token" in str(w.message) for w in caught)
    kept = b.state_dict()["buffer"]
    assert 0 < len(kept) < len(state["buffer"]) and kept == [e for e in state["buffer"] if e in kept]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        batches = [b.next_batch() for _ in range(3)]
    assert all(x.input_ids.shape == (2, 12) and (x.text_labels != IGNORE).any() for x in batches)
    assert [d[1:] for d in batches[0].docs[0]][:1] == [tuple(kept[0])]  # the oldest kept sample first


def test_overflow_truncate_keeps_whole_images(manifest):
    def turn(q, a):
        return [{"role": "user", "content": "<image_placeholder>\n" + q}, {"role": "assistant", "content": a}]
    m = manifest.parent / "long.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "und", "image": ["images/000000.png", "images/000001.png"],
         "conversation": turn("What?", "A star.") + turn("And?", "Red.")},
        {"kind": "und", "image": "images/000002.png", "conversation": turn("What?", "A.")},
        {"kind": "und", "image": "images/000003.png", "conversation": turn("Q" * 60, "A.")},
    ]))
    ds = dataset(m)
    lengths = [len(ds[i]) for i in range(3)]
    L = 85  # splits the second image of record 0 and cuts record 2 before its answer
    assert lengths[0] > L > lengths[1] and int((ds[0].input_ids == 6).nonzero()[N]) < L < lengths[2] - 5
    sampler = PackedSampler(ds, batch_size=6, seq_len=L, ratios={"und": 1}, seed=0)
    with pytest.warns(DataWarning) as caught:
        batches = [sampler.next_batch() for _ in range(2)]
    messages = [str(w.message) for w in caught]
    assert sum("truncating samples longer than seq_len=85" in msg for msg in messages) == 1
    assert sum("dropping samples with no loss token" in msg for msg in messages) == 1
    seen = Counter()
    for batch in batches:
        placeholders = ((batch.input_ids == 6) & ~batch.is_gen_image).sum().item()
        assert placeholders == N * len(batch.pixel_values)
        for r, row in enumerate(batch.docs):
            t = 0
            for _, index, draw in row:
                seen[index] += 1
                full = ds.sample(index, draw)
                n = int((batch.segment_ids[r] == batch.segment_ids[r, t]).sum())
                assert torch.equal(batch.input_ids[r, t:t + n], full.input_ids[:n])
                if index == 0:  # cut at the BOI of the second image, keeping the first answer
                    assert n == int((full.input_ids == 4).nonzero()[1]) < L
                    assert (batch.text_labels[r, t:t + n] != IGNORE).sum() == len(" A star.") + 1
                else:
                    assert n == len(full)
                t += n
    assert seen[0] > 0 and seen[1] > 0 and seen[2] == 0

    skip = PackedSampler(ds, batch_size=2, seq_len=L, ratios={"und": 1}, overflow="skip")
    with pytest.warns(DataWarning, match="skipping samples longer"):
        batch = skip.next_batch()
    assert {index for row in batch.docs for _, index, _ in row} == {1}


def test_misuse(manifest):
    ds = dataset(manifest)
    with pytest.raises(ValueError, match="ratios"):
        PackedSampler(ds, 2, 100, {"video": 1})
    with pytest.raises(ValueError, match="overflow"):
        PackedSampler(ds, 2, 100, overflow="wrap")
    with pytest.raises(ValueError, match="nothing to sample"):
        PackedSampler(ds, 2, 100, {"und": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PackedSampler(ds, 2, 100)


def test_prefetch_matches_sampler(manifest):
    want = PackedSampler(dataset(manifest), 2, 160, seed=6)
    gen = prefetch(PackedSampler(dataset(manifest), 2, 160, seed=6), depth=2)
    for _ in range(3):
        batch, state = next(gen)
        assert torch.equal(batch.input_ids, want.next_batch().input_ids)
        assert state == want.state_dict()
    gen.close()
