"""Vision-tower pre-training (janus_rt.train.vision_pretrain): labels from synthetic captions, a short run learns the
colours, the CLI writes the same checkpoint with only its tower changed."""
import json

import pytest
import torch

from janus_rt.config import SigLIPConfig, tiny_config
from janus_rt.loading import save_janus
from janus_rt.models.janus import Janus
from janus_rt.models.siglip import SigLIP
from janus_rt.tokenizer import JanusTokenizer
from janus_rt.train import vision_pretrain as vp
from janus_rt.train.vq_pretrain import synthetic_images

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = SigLIPConfig(image_size=16, patch_size=4, width=32, num_layers=1, num_heads=2, mlp_dim=64)


def test_caption_labels():
    labels = vp.caption_labels(["a large red star on a blue background", "a green circle on a gray background"])
    a = vp.ATTRIBUTES
    assert labels.tolist() == [[a["shape"].index("star"), a["color"].index("red"), a["background"].index("blue")],
                               [a["shape"].index("circle"), a["color"].index("green"), a["background"].index("gray")]]
    with pytest.raises(ValueError, match="not a synthetic caption"):
        vp.caption_labels(["a cat on a mat"])


def test_reinit_is_seeded_and_resets_norms():
    a, b = SigLIP(SMALL), SigLIP(SMALL)
    with torch.no_grad():
        for p in a.parameters():
            p.fill_(0.5)  # gains and biases included: reinit_tower_ must set every tensor
    vp.reinit_tower_(a, seed=3), vp.reinit_tower_(b, seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight)) and not a.norm.bias.any()
    assert 0.015 < float(a.pos_embed.detach().std()) < 0.025
    c = vp.reinit_tower_(SigLIP(SMALL), seed=4)
    assert not torch.equal(a.pos_embed, c.pos_embed)


def test_short_run_learns_the_colours():
    train = synthetic_images(256, 16, seed=0)
    held_out = synthetic_images(128, 16, seed=1)
    tower = vp.reinit_tower_(SigLIP(SMALL), seed=0).requires_grad_(False).eval()
    m = vp.pretrain_vision(tower, *train, steps=500, batch_size=32, lr=1e-2, eval_data=held_out, log_every=0)
    init, final = m["accuracy_init"], m["accuracy_final"]
    assert init["color"] < 0.3 and init["background"] < 0.3, init  # chance 1/12
    # measured over tower seeds 0-4 (2026-12-07): colour 0.80-0.91, background 0.88-0.98 (shape needs longer runs)
    assert final["color"] >= 0.7 and final["background"] >= 0.8, final
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.training  # given back as found


def test_rejects_mismatched_inputs():
    pixels, captions = synthetic_images(4, 16, seed=0)
    with pytest.raises(ValueError, match=r"expected training images \[N, 3, 16, 16\]"):
        vp.pretrain_vision(SigLIP(SMALL), pixels[:, :, :8], captions, steps=1)
    with pytest.raises(ValueError, match="4 training images but 3 captions"):
        vp.pretrain_vision(SigLIP(SMALL), pixels, captions[:3], steps=1)
    with pytest.raises(ValueError, match="4 held-out images but 2 captions"):
        vp.pretrain_vision(SigLIP(SMALL), pixels, captions, steps=1, eval_data=(pixels, captions[:2]))


def test_train_mode_and_dtype_are_kept_and_a_diverging_loss_is_refused():
    pixels, captions = synthetic_images(8, 16, seed=0)
    tower = SigLIP(SMALL).train()
    vp.pretrain_vision(tower, pixels, captions, steps=2, batch_size=4, log_every=0)
    assert tower.training  # as it came
    bf16 = SigLIP(SMALL).to(torch.bfloat16)
    m = vp.pretrain_vision(bf16, pixels, captions, steps=2, batch_size=4, eval_data=(pixels, captions), log_every=0)
    assert bf16.pos_embed.dtype == torch.bfloat16 and set(m["accuracy_final"]) == set(vp.ATTRIBUTES)
    with pytest.raises(ValueError, match="the loss is nan"):
        vp.pretrain_vision(SigLIP(SMALL), pixels * float("nan"), captions, steps=2, batch_size=4, log_every=0)


def test_heads_do_not_start_from_the_towers_numbers(monkeypatch):
    """reinit_tower_(seed) and pretrain_vision(seed) draw from different streams: the heads' start is not a copy of
    the tower's first weights."""
    pixels, captions = synthetic_images(8, 16, seed=0)
    tower = vp.reinit_tower_(SigLIP(SMALL), seed=0)
    start = tower.pos_embed.detach().clone().flatten()
    seen, real_init = [], torch.nn.init.normal_

    def spy(t, *a, **k):
        out = real_init(t, *a, **k)
        seen.append(t.detach().clone().flatten())
        return out

    monkeypatch.setattr(torch.nn.init, "normal_", spy)
    vp.pretrain_vision(tower, pixels, captions, steps=1, batch_size=4, seed=0, log_every=0)
    assert seen and not torch.allclose(seen[0], start[: seen[0].numel()])


def test_cli_refuses_captions_that_are_not_synthetic(tmp_path, capsys):
    from janus_rt.train.synthetic import make_synthetic

    manifest = make_synthetic(tmp_path / "d", n=2, image_size=16, seed=0)
    recs = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**r, "caption": "a photo of a cat"} if r["kind"] == "t2i" else r) + "\n"
                                for r in recs))
    cfg = tiny_config()
    src = save_janus(Janus.from_config(cfg, seed=0), tmp_path / "in")
    with pytest.raises(SystemExit) as e:
        vp.main(["--model", str(src), "--out", str(tmp_path / "out"), "--data", str(manifest), "--steps", "1"])
    assert e.value.code == 1 and "not a synthetic caption" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_trains_only_the_tower(tmp_path, capsys):
    cfg = tiny_config()
    model = Janus.from_config(cfg, seed=0)
    src = save_janus(model, tmp_path / "in")
    JanusTokenizer.byte_level(cfg.llm.vocab_size, cfg.tokens).save(src / "tokenizer.json")
    vp.main(["--model", str(src), "--out", str(tmp_path / "out"), "--fresh", "--steps", "3", "--batch-size", "4",
             "--n-images", "16", "--n-eval", "8", "--log-every", "0"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["fresh"] and set(summary["accuracy_final"]) == {"shape", "color", "background"}
    assert "accuracy_init" in summary and (summary["n_images"], summary["n_eval"]) == (16, 8)
    out = Janus.from_pretrained(tmp_path / "out")
    before, after = model.state_dict(), out.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vision.") for k in changed), sorted(changed)[:5]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "out" / "vision_pretrain.json").read_text())["steps"] == 3
    with pytest.raises(SystemExit) as e:  # a second run into the same folder: refused before training
        vp.main(["--model", str(src), "--out", str(tmp_path / "out"), "--steps", "1"])
    assert e.value.code == 2 and "already holds a checkpoint" in capsys.readouterr().err
    vp.main(["--model", str(tmp_path / "out"), "--out", str(tmp_path / "again"), "--steps", "1", "--batch-size",
             "2", "--n-images", "4", "--n-eval", "4", "--log-every", "0"])
    assert "accuracy_init" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # not --fresh


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/none", "--out", "{tmp}/o"], "no such checkpoint folder"),
    (["--model", "{tmp}", "--out", "{tmp}"], "--out must differ from --model"),
    (["--model", "{tmp}", "--out", "{tmp}/o", "--steps", "0"], "--steps must be >= 1"),
    (["--model", "{tmp}", "--out", "{tmp}/o", "--n-eval", "0"], "--n-eval must be >= 1"),
    (["--model", "{tmp}", "--out", "{tmp}/o", "--threads", "-1"], "--threads must be >= 0"),
    (["--model", "{tmp}", "--out", "{tmp}/o", "--seed", "-1"], "--seed must be >= 0"),
    (["--model", "{tmp}", "--out", "{tmp}/o", "--lr", "inf"], "--lr must be a finite number > 0"),
    (["--model", "{tmp}", "--out", "{tmp}/o", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["--model", "{tmp}", "--out", "{tmp}/file"], "is a file, not a folder"),
])
def test_cli_refuses(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        vp.main([a.format(tmp=tmp_path) for a in args])
    assert e.value.code == 2 and message in capsys.readouterr().err
