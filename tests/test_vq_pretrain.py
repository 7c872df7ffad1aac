"""VQ tokenizer pre-training (janus_rt.train.vq_pretrain) and the colour-match evaluation (train.evaluate)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from janus_rt.config import VQConfig
from janus_rt.errors import UsageError
from janus_rt.models.vq import VQModel
from janus_rt.tokenizer import JanusTokenizer
from janus_rt.train import evaluate, vq_pretrain
from janus_rt.train.synthetic import PALETTE, SHAPES, caption_colors, draw_shape

# 8 px, 4x4 tokens: the tiny preset's blocks at 1/16 of its VQ cost per image (the test budget is CPU time)
SMALL_VQ = VQConfig(codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 2), z_channels=32, num_res_blocks=1,
                    image_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_images():
    return vq_pretrain.synthetic_images(96, SMALL_VQ.image_size, seed=0, source_size=32)


def _small_vq(seed=0):
    torch.manual_seed(seed)
    return VQModel(SMALL_VQ)


def test_pretrain_reduces_reconstruction_loss(small_images):
    pixels, captions = small_images
    vq = _small_vq()
    m = vq_pretrain.pretrain_vq(vq, pixels, steps=60, batch_size=8, lr=2e-3, seed=0, log_every=0)
    # measured over model seeds 0-5 (2026-11-25): init 1.19-1.29 -> final 0.61-0.81 (L1 + L2 over [-1, 1]
    # pixels), final / init 0.49-0.67; the dataset-mean image scores 1.03
    assert m["recon_loss_final"] < 0.75 * m["recon_loss_init"], m
    mean_image = pixels.mean((0, 2, 3), keepdim=True).expand_as(pixels)
    assert m["recon_loss_final"] < float(F.l1_loss(mean_image, pixels) + F.mse_loss(mean_image, pixels)) - 0.15
    assert m["codes_used_final"] >= 24, m  # restarts keep the codebook in use (measured 44-54 of 64)
    assert torch.isfinite(vq.codebook).all()
    assert vq.codebook.norm(dim=-1).min() > 1e-3  # every row stays L2-normalisable
    assert vq.codebook.is_contiguous() and vq.encoder.conv_in.weight.is_contiguous()
    with torch.no_grad():
        tokens = vq.encode(pixels[:5])
        assert tokens.shape == (5, SMALL_VQ.num_tokens) and tokens.dtype == torch.long
        assert 0 <= int(tokens.min()) and int(tokens.max()) < SMALL_VQ.codebook_size
        assert vq.decode(tokens).shape == (5, 3, 8, 8)


def test_quantize_matches_encode_and_passes_gradients(small_images):
    vq = _small_vq(1)
    with torch.no_grad():
        vq.codebook.normal_()
    x = small_images[0][:4]
    z = vq.quant_conv(vq.encoder(x)).detach().requires_grad_()
    z_n, q_st, idx, vq_loss, commit = vq_pretrain.quantize(vq, z)
    # the training rule is the inference rule: the same codes as VQModel.encode
    assert torch.equal(idx.view(4, -1), vq.encode(x))
    # forward value = the normalised code, exactly what VQModel.decode feeds the decoder
    g = SMALL_VQ.grid
    expect = F.normalize(vq.codebook, dim=-1)[idx].view(4, g, g, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(q_st, expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(vq_loss, commit)  # same value, different gradient paths
    q_st.sum().backward()  # straight-through: the gradient reaches the latent
    assert z.grad is not None and z.grad.abs().sum() > 0
    vq_loss.backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0


def test_pretrain_is_seeded(small_images):
    pixels = small_images[0]
    states = []
    for _ in range(2):
        vq = _small_vq(3).requires_grad_(False)  # as loaded models come
        before = {k: v.clone() for k, v in vq.state_dict().items()}
        vq_pretrain.pretrain_vq(vq, pixels, steps=3, batch_size=4, seed=7, log_every=0)
        assert any(not torch.equal(before[k], v) for k, v in vq.state_dict().items())  # trained while frozen ...
        assert not any(p.requires_grad for p in vq.parameters())  # ... and frozen again after
        states.append(vq.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_pretrain_rejects_wrong_image_size():
    with pytest.raises(ValueError, match="expected images"):
        vq_pretrain.pretrain_vq(_small_vq(), torch.zeros(4, 3, 32, 32), steps=1)


def test_cli_names_a_missing_manifest(tmp_path, capsys):
    """--data that does not exist: a one-line usage error before anything is built, not a traceback."""
    with pytest.raises(SystemExit) as e:
        vq_pretrain.main(["--out", str(tmp_path / "o"), "--data", str(tmp_path / "missing.jsonl"), "--steps", "1"])
    assert e.value.code == 2 and "missing.jsonl: no such manifest or folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pretrain_from_a_manifest_folder_trains_only_the_vq(tmp_path):
    from janus_rt.models.janus import Janus
    from janus_rt.train.synthetic import make_synthetic

    make_synthetic(tmp_path, n=5, image_size=40, seed=1)  # loaded at the VQ size like the Janus data path does
    pixels, captions = vq_pretrain.load_images(tmp_path, 16)
    assert pixels.shape == (5, 3, 16, 16) and len(captions) == 5
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert all(len(caption_colors(c)) == 2 for c in captions)

    model = Janus.from_preset("tiny", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vq_pretrain.pretrain_vq(model, tmp_path, steps=1, batch_size=2, log_every=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) != k.startswith("vq."), k  # every VQ tensor moved, nothing else


# ---- evaluation -------------------------------------------------------------------------------------------
class FakeModel:
    """Stands in for Janus: 'generates' by drawing the caption with draw_shape (colour_fn may alter it)."""

    def __init__(self, tok, size=32, colour_fn=None, grey=False, shape_fn=None):
        self.tok, self.size, self.colour_fn, self.grey, self.shape_fn = tok, size, colour_fn, grey, shape_fn
        self.store = []

    def generate_image_tokens(self, prompt_ids, n=1, seed=None, cfg_weight=5.0, temperature=1.0):
        text = self.tok.decode(prompt_ids)
        caption = text.split("<|User|>: ", 1)[1].split("\n\n<|Assistant|>:", 1)[0]
        color, background = caption_colors(caption)
        if self.colour_fn:
            color, background = self.colour_fn(color), self.colour_fn(background)
        shape = next((s for s in SHAPES if s in caption), "circle")  # (a caption naming none: a circle)
        shape = self.shape_fn(shape) if self.shape_fn else shape
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            img, _ = draw_shape(shape, color, background, self.size, rng)
            self.store.append(torch.from_numpy(np.asarray(img, np.float32)).permute(2, 0, 1) / 127.5 - 1)
            out.append([len(self.store) - 1])
        return torch.tensor(out)

    def decode_image_tokens(self, tokens):
        px = torch.stack([self.store[int(i)] for i in tokens[:, 0]])
        return torch.zeros_like(px) if self.grey else px


@pytest.fixture(scope="module")
def tok():
    from janus_rt.config import tiny_config

    cfg = tiny_config()
    return JanusTokenizer.byte_level(cfg.llm.vocab_size, cfg.tokens)


@pytest.fixture(scope="module")
def captions():
    return evaluate.heldout_captions(6, seed=3)


def test_ground_truth_images_score_one(tok, captions):
    assert len(captions) == 6
    assert evaluate.color_match_score(FakeModel(tok), tok, captions, n_per_caption=3, seed=0) == 1.0


def test_score_fails_for_wrong_colours(tok, captions):
    names = list(PALETTE)
    shifted = lambda c: names[(names.index(c) + 1) % len(names)]  # every colour -> another palette colour
    assert evaluate.color_match_score(FakeModel(tok, colour_fn=shifted), tok, captions, 2, seed=0) == 0.0
    no_grey = ["a red circle on a blue background", "a large yellow star on a green background"]
    assert evaluate.color_match_score(FakeModel(tok, grey=True), tok, no_grey, 2, seed=0) == 0.0
    # an all-grey image matches a caption's grey, and nothing else
    half = evaluate.color_match_scores(FakeModel(tok, grey=True), tok, ["a gray square on a pink background"], 1)
    assert half == [[0.5]]


def test_shape_match_finds_the_captions_shape_or_not(tok, captions):
    """shape_match is 1 where the image holds the caption's shape (draw_shape's own, at 128 px where classify_shape
    tells all seven apart), 0 where it holds another, nan for a caption that names none."""
    right = evaluate.caption_scores(FakeModel(tok, size=128), tok, captions, n_per_caption=2)["shape_match"]
    assert np.array(right).shape == (6, 2) and np.all(np.array(right) == 1.0)
    shapes = list(SHAPES)
    other = lambda s: shapes[(shapes.index(s) + 3) % len(shapes)]
    wrong = evaluate.caption_scores(FakeModel(tok, size=128, shape_fn=other), tok, captions, n_per_caption=2)
    assert np.all(np.array(wrong["shape_match"]) == 0.0) and np.all(np.array(wrong["color_match"]) == 1.0)
    no_shape = evaluate.caption_scores(FakeModel(tok, size=128), tok, ["a red thing on a blue background"], 1)
    assert np.isnan(no_shape["shape_match"]).all() and no_shape["color_match"] == [[1.0]]


def test_caption_without_colour_is_rejected(tok):
    with pytest.raises(ValueError, match="names no palette colour"):
        evaluate.color_match_score(FakeModel(tok), tok, ["a circle"], 1)


def test_cli_checkpoint_round_trip_and_real_model_score(tmp_path, captions, capsys):
    """vq_pretrain's CLI writes a loadable tiny checkpoint whose VQ is the trained one; evaluate scores it
    deterministically for a seed through the real generation path."""
    from janus_rt.models.janus import Janus

    out = tmp_path / "ckpt"
    metrics = vq_pretrain.main(["--out", str(out), "--steps", "2", "--batch-size", "4", "--n-images", "8",
                                "--n-eval", "4", "--log-every", "0"])
    assert metrics["steps"] == 2 and 0.0 <= metrics["color_match_recon"] <= 1.0
    assert json.loads((out / "vq_pretrain.json").read_text())["steps"] == 2
    model = Janus.from_pretrained(out)
    fresh = Janus.from_preset("tiny", seed=0)
    # the VQ was trained (not the preset's random one); everything else is the preset's random init
    assert not torch.equal(model.vq.codebook, fresh.vq.codebook)
    ref = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        assert name.startswith("vq.") or torch.equal(p, ref[name]), name
    tk = JanusTokenizer.from_pretrained(out, defaults=model.cfg.tokens)
    a = evaluate.color_match_scores(model, tk, captions[:2], n_per_caption=2, seed=5, cfg_weight=3.0)
    b = evaluate.color_match_scores(model, tk, captions[:2], n_per_caption=2, seed=5, cfg_weight=3.0)
    assert a == b and all(0.0 <= s <= 1.0 for row in a for s in row)
    capsys.readouterr()
    rows = evaluate.main(["--model", str(out), "--n", "2", "--n-per-caption", "1", "--vq-ceiling"])
    assert rows[0]["captions"] == 2 and "2/2" in capsys.readouterr().err  # (the captions' progress bar)
    assert 0.0 <= rows[0]["color_match"] <= 1.0 and 0.0 <= rows[0]["vq_ceiling"] <= 1.0
    assert 0.0 <= rows[0]["shape_match"] <= 1.0 and 0.0 <= rows[0]["vq_ceiling_shape"] <= 1.0


def test_captions_unseen_in_training(tmp_path, capsys):
    """The synthetic caption space is small (a training set of thousands holds most captions another seed draws):
    heldout_captions can skip a training set's captions, read from its manifests or from `train --synthetic N
    --seed S`'s (make_synthetic's captions, at any image size); without exclude it draws as before."""
    from janus_rt.train.synthetic import make_synthetic

    trained = evaluate.training_captions(synthetic=[(2000, 0)])
    drawn = evaluate.heldout_captions(40, seed=7)
    assert drawn == [json.loads(line)["caption"] for line in
                     make_synthetic(tmp_path / "s", n=40, image_size=8, seed=7).read_text().splitlines()[0::3]]
    assert sum(c in trained for c in drawn) > 20  # (why the option exists)
    unseen = evaluate.heldout_captions(40, seed=7, exclude=trained)
    assert len(set(unseen)) > 1 and not set(unseen) & trained
    assert unseen == evaluate.heldout_captions(40, seed=7, exclude=trained)  # deterministic
    manifest = make_synthetic(tmp_path / "m", n=50, image_size=32, seed=4)
    with open(manifest, "a") as f:
        f.write("not json\n\n" + json.dumps({"kind": "text", "text": "a red circle on a blue background"}) + "\n")
    assert evaluate.training_captions([manifest]) == set(evaluate.heldout_captions(50, seed=4))
    with pytest.raises(UsageError, match="not among the"):  # (all of the first 256 draws excluded)
        evaluate.heldout_captions(1, seed=7, exclude=evaluate.heldout_captions(256, seed=7))
    rows = evaluate.main(["--model", "tiny", "--n", "2", "--n-per-caption", "1", "--exclude-manifest", str(manifest),
                          "--exclude-synthetic", "300:1"])
    assert rows[0]["excluded_captions"] == len(evaluate.training_captions([manifest], [(300, 1)]))
    for bad, message in ((["--exclude-synthetic", "300"], "N:SEED"), (["--exclude-synthetic", "300:-1"], "N:SEED"),
                         (["--exclude-manifest", str(tmp_path / "no")], "No such file"), (["--n", "0"], "--n must")):
        with pytest.raises(SystemExit):
            evaluate.main(["--model", "tiny", "--n-per-caption", "1", *bad])
        assert message in capsys.readouterr().err


def test_cli_guidance_weight_defaults_to_the_checkpoints(monkeypatch):
    """Without --cfg, evaluate scores at the weight the checkpoint recommends (generation_config.json, as `janus-rt
    generate` takes it; the embedded model's 1.5), else 5; --cfg wins."""
    import types

    used = []
    monkeypatch.setattr(evaluate, "caption_scores", lambda m, t, caps, n, seed, cfg, *rest, **kw: used.append(cfg) or
                        {"color_match": [[1.0]], "one_object": [[1.0]], "shape_match": [[1.0]]})
    weights = {"a": 1.5, "b": None, "c": 0.0}
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer",
                        lambda spec, *a: (types.SimpleNamespace(guidance_scale=weights[spec]), None))
    rows = evaluate.main(["--model", "a", "b", "c", "--n", "1", "--n-per-caption", "1"])
    assert used == [1.5, 5.0, 0.0] and [r["cfg"] for r in rows] == used
    evaluate.main(["--model", "a", "--n", "1", "--n-per-caption", "1", "--cfg", "3"])
    assert used[-1] == 3.0


def test_cli_refuses_bad_values_in_one_line(capsys):
    """Bad settings are refused before any model loads, a missing checkpoint in one line (no traceback)."""
    for bad, message in ((["--n-per-caption", "0"], "--n-per-caption must be >= 1"),
                         (["--temperature", "-1"], "--temperature must be"), (["--temperature", "0"], "--temperature"),
                         (["--threads", "-3"], "--threads must be >= 0"), (["--cfg", "inf"], "--cfg must be")):
        with pytest.raises(SystemExit):
            evaluate.main(["--model", "tiny", "--n", "1", *bad])
        assert message in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "janus_rt.train.evaluate", "--model", "/nonexistent/ckpt", "--n", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("python -m janus_rt.train.evaluate: /nonexistent/ckpt"), r.stderr


def test_a_manifest_caption_with_spaces_around_it_is_excluded(tmp_path):
    """Training prompts with a caption stripped (encode_generation_prompt, as the official processor), so " x\n" in a
    manifest trained "x": evaluate must not score "x" as a caption it never saw."""
    drawn = evaluate.heldout_captions(6, seed=7)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"kind": "t2i", "caption": f" {c}\n", "image": "x.png"}) + "\n"
                                for c in drawn))
    trained = evaluate.training_captions([manifest])
    assert set(drawn) <= trained
    assert not set(evaluate.heldout_captions(6, seed=7, exclude=trained)) & set(drawn)
    assert not set(evaluate.heldout_captions(6, seed=7, exclude=[f" {c}" for c in drawn])) & set(drawn)


def test_cli_scores_the_captions_and_settings_it_was_given(monkeypatch, capsys):
    """evaluate's CLI hands caption_scores the held-out captions of --caption-seed without the excluded ones, and
    --n-per-caption, --seed, --cfg, --temperature as given; its row's color_match is the mean over every image, its
    stderr the captions' (mean per caption, ddof 1, / sqrt(n)), one_object the mean of those scores, shape_match
    the mean of those not nan."""
    calls = []

    def fake_scores(model, tok, captions, n_per_caption, seed, cfg_weight, temperature, kv_cache_dtype, progress):
        calls.append((captions, n_per_caption, seed, cfg_weight, temperature))
        per_caption = [[1.0, 0.5], [0.0, 0.0], [0.5, 0.5]]
        return {"color_match": per_caption, "one_object": [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]],
                "shape_match": [[1.0, 0.0], [np.nan, np.nan], [1.0, 1.0]]}

    monkeypatch.setattr(evaluate, "caption_scores", fake_scores)
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", lambda *a: (None, None))
    trained = evaluate.heldout_captions(20, seed=9)
    rows = evaluate.main(["--model", "tiny", "--n", "3", "--n-per-caption", "2", "--seed", "4", "--cfg", "2.5",
                          "--temperature", "0.8", "--caption-seed", "9", "--exclude-synthetic", "20:9"])
    captions, *settings = calls[0]
    assert captions == evaluate.heldout_captions(3, seed=9, exclude=trained) and not set(captions) & set(trained)
    assert settings == [2, 4, 2.5, 0.8]
    means = np.array([0.75, 0.0, 0.5])
    assert rows[0]["color_match"] == round(means.mean(), 4) and rows[0]["one_object"] == 0.5
    assert rows[0]["shape_match"] == 0.75  # (the captions that name a shape)
    assert rows[0]["stderr"] == round(means.std(ddof=1) / 3**0.5, 4)
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == rows[0]
    for bad in (["--exclude-synthetic", "0:5"], ["--int8"]):
        with pytest.raises(SystemExit):
            evaluate.main(["--model", "tiny", *bad])


def test_caption_i_samples_with_seed_plus_i(tok, captions):
    """caption_scores draws caption i's images with seed + i (each caption its own images, the run reproducible from
    --seed), with the cfg weight and temperature given; n_per_caption < 1 is refused (an empty mean is no score)."""
    seen = []

    class Recording(FakeModel):
        def generate_image_tokens(self, prompt_ids, n=1, seed=None, cfg_weight=5.0, temperature=1.0):
            seen.append((n, seed, cfg_weight, temperature))
            return super().generate_image_tokens(prompt_ids, n, seed, cfg_weight, temperature)

    evaluate.caption_scores(Recording(tok), tok, captions[:3], n_per_caption=2, seed=5, cfg_weight=2.0,
                            temperature=0.5)
    assert seen == [(2, 5, 2.0, 0.5), (2, 6, 2.0, 0.5), (2, 7, 2.0, 0.5)]
    with pytest.raises(ValueError, match="n_per_caption"):
        evaluate.caption_scores(Recording(tok), tok, captions[:1], n_per_caption=0)


ENGINE = object()  # the engine an Answerer is handed and ignores


class Answerer:
    """Stands in for Janus in understanding: reads the question from the prompt and answers from the pixels
    (classify_shape; the dominant palette colours), or always `constant`."""

    def __init__(self, tok, constant=None):
        from janus_rt.config import tiny_config

        self.tok, self.constant, self.cfg, self.dtype = tok, constant, tiny_config(), torch.float32
        self.questions = []

    def generate_text(self, prompt_ids, pixel_values, max_new_tokens=16, engine=None):
        assert engine is ENGINE  # every question runs in the engine understanding_scores was given
        from janus_rt.processing import to_pil
        from janus_rt.train.synthetic import QUESTIONS, classify_shape, describe, dominant_colors, question_wordings

        text = self.tok.decode(prompt_ids)
        question, kind = next((q, k) for k in QUESTIONS for which in ("trained", "heldout")
                              for q in question_wordings(k, which) if f"\n{q}\n\n<|Assistant|>:" in text)
        self.questions.append(question)
        if self.constant is not None:
            return self.tok.encode(self.constant)
        img = to_pil(pixel_values)[0]
        background = dominant_colors(img.crop((0, 0, 1, 1)), k=1)[0][0]  # a corner: the shape never reaches it
        color = next(c for c, _ in dominant_colors(img, k=2) if c != background)
        shape = classify_shape(img, color)
        answer = {"shape": f"A {shape}.", "color": f"{color}.", "background": f"{background}.",
                  "describe": f"{describe(shape, color, background).capitalize()}."}
        return self.tok.encode(answer[kind])


def test_understanding_scores_pair_each_image_with_its_answers(tok):
    """understanding_scores asks each image the four questions and scores an answer by its first shape / colour
    word (describe: the whole sentence): an answerer that reads the pixels scores (near) 1, one that always says
    "A red circle." scores the frequency of circles and red shapes, and "Blue." the frequency of blue backgrounds."""
    from janus_rt.train.synthetic import QUESTIONS, caption_shape

    oracle = Answerer(tok)
    s = evaluate.understanding_scores(oracle, tok, 24, seed=5, engine=ENGINE)
    assert set(s) == {"shape", "color", "background", "describe"} and all(len(v) == 24 for v in s.values())
    assert np.mean(s["color"]) == 1.0 and np.mean(s["background"]) == 1.0
    assert np.mean(s["shape"]) >= 0.8, s["shape"]  # classify_shape: 0.946 on 32 px images
    assert s["describe"] == s["shape"]  # the colours all right: the sentence is right where the shape is
    assert oracle.questions[:4] == [QUESTIONS[k] for k in ("shape", "color", "background", "describe")]
    captions = vq_pretrain.synthetic_images(24, 32, seed=5)[1]
    circles = [float(caption_shape(c) == "circle") for c in captions]
    red = [float(caption_colors(c)[0] == "red") for c in captions]
    blue_bg = [float(caption_colors(c)[1] == "blue") for c in captions]
    s = evaluate.understanding_scores(Answerer(tok, "A red circle."), tok, 24, seed=5, engine=ENGINE)
    assert s["shape"] == circles and s["color"] == red and sum(circles) > 0 and s["describe"] == [0.0] * 24
    s = evaluate.understanding_scores(Answerer(tok, "Blue."), tok, 24, seed=5, engine=ENGINE)
    assert s["background"] == blue_bg and s["shape"] == [0.0] * 24
    with pytest.raises(ValueError, match="n must be >= 1"):
        evaluate.understanding_scores(oracle, tok, 0)


def test_understanding_scores_ask_the_wordings_asked_for(tok):
    """wordings="trained" / "heldout": image i is asked the i-th wording (cyclically) of each question's set; the
    pixel-reading answerer scores as with the canonical wording; an unknown set is refused."""
    from janus_rt.train.synthetic import QUESTIONS, question_wordings

    canonical = evaluate.understanding_scores(Answerer(tok), tok, 8, seed=5, engine=ENGINE)
    for which in ("trained", "heldout"):
        oracle = Answerer(tok)
        assert evaluate.understanding_scores(oracle, tok, 8, seed=5, engine=ENGINE, wordings=which) == canonical
        forms = {k: question_wordings(k, which) for k in QUESTIONS}
        assert oracle.questions == [forms[k][i % len(forms[k])] for i in range(8) for k in QUESTIONS]
    with pytest.raises(ValueError, match="which must be one of"):
        evaluate.understanding_scores(Answerer(tok), tok, 2, engine=ENGINE, wordings="all")


def test_cli_adds_the_understanding_scores(monkeypatch):
    monkeypatch.setattr(evaluate, "caption_scores", lambda *a, **k: {
        "color_match": [[1.0]], "one_object": [[1.0]], "shape_match": [[1.0]]})
    asked = []
    monkeypatch.setattr(evaluate, "understanding_scores", lambda m, t, n, seed, progress=None, kv_cache_dtype=None,
                        wordings="canonical": asked.append((n, seed, kv_cache_dtype, wordings)) or {
                            "shape": [1.0, 0.0] * (n // 2), "color": [1.0] * n, "background": [0.0] * n,
                            "describe": [0.25] * n})
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", lambda *a: (None, None))
    row = evaluate.main(["--model", "tiny", "--n", "1", "--n-per-caption", "1", "--cfg", "1",
                         "--understanding", "4", "--understanding-seed", "3"])[0]
    assert (row["und_shape"], row["und_color"], row["und_background"], row["und_describe"]) == (0.5, 1.0, 0.0, 0.25)
    assert (row["und_images"], row["und_seed"], row["und_wordings"]) == (4, 3, "canonical")
    assert asked == [(4, 3, None, "canonical")]
    evaluate.main(["--model", "tiny", "--n", "1", "--n-per-caption", "1", "--cfg", "1", "--understanding", "2",
                   "--kv-cache-dtype", "int8"])
    assert asked[-1] == (2, 777, "int8", "canonical")  # the answers run in the cache the images did
    row = evaluate.main(["--model", "tiny", "--n", "1", "--n-per-caption", "1", "--cfg", "1", "--understanding", "2",
                         "--understanding-wordings", "heldout"])[0]
    assert asked[-1] == (2, 777, None, "heldout") and row["und_wordings"] == "heldout"
    assert "und_shape" not in evaluate.main(["--model", "tiny", "--n", "1", "--n-per-caption", "1", "--cfg", "1"])[0]
    for bad in (["--understanding", "-1"], ["--understanding-seed", "-1"], ["--seed", "-2"], ["--caption-seed", "-1"],
                ["--understanding-wordings", "trained"]):  # (without --understanding N: no questions to word)
        with pytest.raises(SystemExit):
            evaluate.main(["--model", "tiny", *bad])
    assert len(asked) == 3


def test_understanding_scores_build_their_engine_with_the_cache_asked_for(tok, monkeypatch):
    from janus_rt.engine import Engine

    made = []
    monkeypatch.setattr(Engine, "for_requests", classmethod(lambda cls, model, shapes, **kw: made.append(kw) or ENGINE))
    evaluate.understanding_scores(Answerer(tok, "Red."), tok, 2, seed=5)
    evaluate.understanding_scores(Answerer(tok, "Red."), tok, 2, seed=5, kv_cache_dtype="int8")
    assert made == [{}, {"kv_cache_dtype": "int8"}]
