"""The command line as a user runs it: generate, understand, convert, verify."""
import json
import re

import pytest
import torch
from PIL import Image

import bench_scripts
from janus_rt import Janus, openmp
from janus_rt.cli import load_model, main


def test_generate_writes_pngs_and_grid(tmp_path, capsys):
    main(["generate", "--model", "tiny", "--prompt", "a red circle", "-n", "2", "--out", str(tmp_path), "--seed", "1"])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["grid.png", "img_00_00.png", "img_00_01.png"]
    im = Image.open(tmp_path / "img_00_00.png")
    cfg = Janus.from_preset("tiny").cfg
    assert im.size == (cfg.vq.image_size, cfg.vq.image_size)
    s = cfg.vq.image_size  # 32: grid tiles enlarged 4x to 128 px, 2 px apart, pixels repeated
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 128 + 2, 128)
    tile = grid.crop((130, 0, 258, 128)).resize((s, s), Image.NEAREST)
    assert tile.tobytes() == Image.open(tmp_path / "img_00_01.png").convert("RGB").tobytes()
    out = capsys.readouterr()
    assert "tokens/s" in out.out and "ms/decode step" in out.out
    assert "RANDOM weights" in out.err
    from janus_rt.processing import png_parameters

    p = png_parameters(tmp_path / "img_00_01.png")  # the settings, and the model by name (not a local path)
    assert {k: p[k] for k in ("prompt", "seed", "image", "cfg_weight", "model", "dtype", "device")} == {
        "prompt": "a red circle", "seed": 1, "image": 1, "cfg_weight": 5.0, "model": "tiny (random weights)",
        "dtype": "fp32", "device": "cpu"}
    from janus_rt import cpu_ops

    # generate owns its model: on the CPU it holds the LLM's projections packed only (no second copy)
    assert ("packed the LLM's projections in place" in out.err) == cpu_ops.available()


def test_embedded_default_model(tmp_path, capsys):
    main(["generate", "--prompt", "a red circle on a blue background", "-n", "1", "--out", str(tmp_path)])
    assert (tmp_path / "grid.png").exists()
    err = capsys.readouterr().err
    assert "embedded tiny-shapes model" in err and "RANDOM" not in err
    from janus_rt.processing import png_parameters

    assert png_parameters(tmp_path / "img_00_00.png")["model"] == "tiny-shapes (embedded)"


def test_understand(tmp_path, capsys):
    Image.new("RGB", (50, 30), (200, 10, 10)).save(tmp_path / "x.png")
    main(["understand", "--model", "tiny", "--image", str(tmp_path / "x.png"), "--question", "What colour?", "--max-new-tokens", "3"])
    import re

    err = capsys.readouterr().err
    m = re.search(r"\[preset tiny \(random weights\): ([1-3]) tokens in [0-9.]+ s: engine set-up [0-9.]+ s, first token "
                  r"[0-9.]+ s(, then [0-9.]+ ms/token)?\]", err)
    assert m, err
    assert (m.group(2) is not None) == (m.group(1) != "1"), err  # a per-token time exactly when a decode step ran


def test_understand_on_the_embedded_model_notes_a_question_it_was_not_taught(tmp_path, capsys):
    """The embedded model knows the synthetic set's four questions in the wordings it was trained on; for any other
    `understand` says its answer may mean nothing. A real checkpoint (--model) gets no such note."""
    Image.new("RGB", (32, 32), (30, 70, 220)).save(tmp_path / "x.png")
    ask = ["understand", "--image", str(tmp_path / "x.png"), "--max-new-tokens", "4"]
    for question, noted in (("How many sides does it have?", True), ("What colour is the background?", False),
                            (" What shape is in the image? ", False), ("What is in this picture?", False),
                            ("What color is the shape?", False), ("Which shape is this?", True)):  # (held out)
        main(ask + ["--question", question])
        assert ("trained on four questions only" in capsys.readouterr().err) == noted, question
    main(ask + ["--question", "How many sides does it have?", "--model", "tiny"])
    assert "trained on four questions only" not in capsys.readouterr().err


def test_understand_without_an_image_answers_the_question_alone(capsys):
    """No --image: a text-only turn (the official template with no image placeholder), answered as generate_text
    answers those ids; the embedded model, trained on questions about images, says its answer means nothing."""
    from janus_rt.processing import encode_understanding_prompt

    question = "What is a circle?"
    main(["understand", "--question", question, "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert "trained to answer questions about an image" in err
    model, tok, _ = load_model(None)
    ids = encode_understanding_prompt(tok, question, num_images=0)
    assert tok.image_id not in ids and tok.boi_id not in ids
    assert out == tok.decode(model.generate_text(ids, max_new_tokens=6)) + "\n"
    main(["understand", "--model", "tiny", "--question", question, "--max-new-tokens", "2"])
    assert "trained to answer questions about an image" not in capsys.readouterr().err


def test_understand_notes_an_answer_past_the_models_positions(tmp_path, capsys):
    """A prompt plus --max-new-tokens past the checkpoint's max_position is run, with a note that says so."""
    from janus_rt.loading import save_janus

    m = Janus.from_preset("tiny", seed=3)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    ask = ["understand", "--image", str(tmp_path / "x.png"), "--question", "?", "--max-new-tokens", "2"]
    for limit, noted in [(4096, False), (m.cfg.vision.num_patches + 4, True)]:
        m.cfg.llm.max_position = limit
        main(ask + ["--model", str(save_janus(m, tmp_path / f"p{limit}"))])
        assert ("run past the model's" in capsys.readouterr().err) == noted


def test_understand_prints_the_answer_as_it_comes(tmp_path, capsys, monkeypatch):
    """understand prints the answer a token at a time (before the last step, part of it is out already); all it
    prints is decode(the answer's ids) and a newline."""
    from janus_rt.engine import Engine
    from janus_rt.tokenizer import JanusTokenizer

    seen, reqs = [], []
    real_step, real_add = Engine.step, Engine.add_text_request
    monkeypatch.setattr(Engine, "step", lambda self: seen.append(capsys.readouterr().out) or real_step(self))
    monkeypatch.setattr(Engine, "add_text_request", lambda self, *a, **kw: reqs.append(real_add(self, *a, **kw))
                        or reqs[-1])
    Image.new("RGB", (50, 30), (200, 10, 10)).save(tmp_path / "x.png")
    main(["understand", "--model", "tiny", "--image", str(tmp_path / "x.png"), "--question", "What colour?",
          "--max-new-tokens", "24", "--temperature", "1"])
    printed = "".join(seen) + capsys.readouterr().out
    model = Janus.from_preset("tiny")
    ids = reqs[0].tokens[0]
    assert len(ids) > 4 and len(seen) == len(ids)  # a prefill, then a decode step per token
    assert printed == JanusTokenizer.byte_level(model.cfg.llm.vocab_size, model.cfg.tokens).decode(ids) + "\n"
    assert sum(map(len, seen[:-1])) > 0  # out before the last step


def test_understand_honours_kv_cache_gb(tmp_path):
    """--kv-cache-gb sizes understand's KV cache as it does generate's: too small to hold a block is refused."""
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit, match="janus-rt understand: .*holds no block"):
        main(["understand", "--model", "tiny", "--image", str(tmp_path / "x.png"), "--question", "?",
              "--kv-cache-gb", "1e-9"])
    with pytest.raises(SystemExit, match="janus-rt understand: a KV cache of .* does not fit"):
        main(["understand", "--model", "tiny", "--image", str(tmp_path / "x.png"), "--question", "?",
              "--kv-cache-gb", "1e6"])


def test_freed_memory_kept_only_once_the_weights_are_in_place(tmp_path, monkeypatch):
    """generate and understand turn on retain_freed_memory after loading and packing the model: blocks freed after it
    stay resident, and packing in place frees the original matrices (at 7B more than a 24 GB machine holds twice)."""
    import janus_rt.cli as cli
    import janus_rt.cpu_ops as cpu_ops

    calls = []
    real_load, real_pack = cli.load_model, cli._pack_in_place
    monkeypatch.setattr(cli, "load_model", lambda *a, **kw: calls.append("load") or real_load(*a, **kw))
    monkeypatch.setattr(cli, "_pack_in_place", lambda *a, **kw: calls.append("pack") or real_pack(*a, **kw))
    monkeypatch.setattr(cpu_ops, "retain_freed_memory", lambda: calls.append("retain") or False)
    main(["generate", "--model", "tiny", "-n", "1", "--out", str(tmp_path / "o")])
    assert calls == ["load", "pack", "retain"]
    calls.clear()
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    main(["understand", "--model", "tiny", "--image", str(tmp_path / "x.png"), "--question", "?",
          "--max-new-tokens", "1"])
    assert calls == ["load", "pack", "retain"]


def test_cpu_dtype_default_follows_the_checkpoint(tmp_path, capsys, monkeypatch):
    """On the CPU with no --dtype: a folder stored in bf16 loads in bf16 (said in a note), one stored in fp32 (the
    embedded model's case) or a preset in fp32; --dtype wins over both."""
    import janus_rt.cli as cli
    from janus_rt.loading import convert, save_janus

    got = []
    real = cli.load_model
    monkeypatch.setattr(cli, "load_model",
                        lambda spec, device, dtype, seed: got.append(dtype) or real(spec, device, dtype, seed))
    fp32 = save_janus(Janus.from_preset("tiny", seed=3), tmp_path / "fp32")
    bf16 = convert(fp32, tmp_path / "bf16", dtype=torch.bfloat16)
    note = "--dtype bf16, as the checkpoint stores its weights"
    for model, flags, want in [(bf16, [], torch.bfloat16), (fp32, [], torch.float32), ("tiny", [], torch.float32),
                               (bf16, ["--dtype", "fp32"], torch.float32)]:
        main(["generate", "--model", str(model), "--device", "cpu", "-n", "1", "--out", str(tmp_path / "o")] + flags)
        assert got.pop() == want
        assert (note in capsys.readouterr().err) == (model == bf16 and not flags)


def test_cfg_default_follows_the_checkpoint(tmp_path, capsys, monkeypatch):
    """--cfg's default: the folder's generation_config.json guidance_scale (said in a note), else 5; --cfg wins."""
    import janus_rt.processing as processing
    from janus_rt.loading import save_janus

    got = []
    real = processing.generate_images
    monkeypatch.setattr(processing, "generate_images",
                        lambda *a, **kw: got.append(kw["cfg_weight"]) or real(*a, **kw))
    ck = save_janus(Janus.from_preset("tiny", seed=3), tmp_path / "ck")
    note = "the checkpoint's guidance_scale"
    for gen, flags, want in [(None, [], 5.0), ('{"guidance_scale": 2.5}', [], 2.5),
                             ('{"guidance_scale": 2.5}', ["--cfg", "4"], 4.0)]:
        if gen:
            (ck / "generation_config.json").write_text(gen)
        main(["generate", "--model", str(ck), "-n", "1", "--out", str(tmp_path / "o")] + flags)
        assert got.pop() == want
        assert (note in capsys.readouterr().err) == (gen is not None and not flags)
    main(["generate", "-n", "1", "--out", str(tmp_path / "o")])  # the embedded model carries 2
    assert got.pop() == 2.0
    (ck / "generation_config.json").write_text('{"guidance_scale": -1}')
    main(["generate", "--model", str(ck), "-n", "1", "--out", str(tmp_path / "o")])
    assert got.pop() == -1.0 and "--cfg -1 < 0 pushes the images away" in capsys.readouterr().err
    (ck / "generation_config.json").write_text('{"guidance_scale": "high"}')  # not a number: 5, said
    main(["generate", "--model", str(ck), "-n", "1", "--out", str(tmp_path / "o")])
    assert got.pop() == 5.0 and "guidance_scale is not a finite number" in capsys.readouterr().err
    from janus_rt.cli import make_server, parser  # serve: the requests' default, named as serve takes it

    srv, _ = make_server(parser().parse_args(["serve", "--device", "cpu", "--kv-cache-gb", "0.01", "--port", "0"]))
    srv.stop()
    assert srv.default_cfg == 2.0 and 'note: requests\' default "cfg" 2,' in capsys.readouterr().err


def test_generate_prompts_file(tmp_path, capsys):
    """--prompts-file: a prompt a line (blank lines and # comments skipped), after --prompt; PNGs per prompt in that
    order, one grid row each; the same images as passing each prompt with --prompt."""
    f = tmp_path / "prompts.txt"
    # with a byte-order mark, as Windows editors write: the first line is still a comment
    f.write_text("\ufeff# colours\na blue square on a red background\n\n  a green star on a white background  \n",
                 encoding="utf-8")
    main(["generate", "--model", "tiny", "--prompt", "a red circle", "--prompts-file", str(f), "-n", "1",
          "--out", str(tmp_path / "a")])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["grid.png", "img_00_00.png", "img_01_00.png",
                                                                  "img_02_00.png"]
    assert Image.open(tmp_path / "a" / "grid.png").size == (128, 3 * 128 + 2 * 2)
    main(["generate", "--model", "tiny", "--prompt", "a red circle", "--prompt", "a blue square on a red background",
          "--prompt", "a green star on a white background", "-n", "1", "--out", str(tmp_path / "b")])
    for name in ("img_00_00.png", "img_01_00.png", "img_02_00.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    capsys.readouterr()
    for text, message in [(None, "cannot read it"), ("# only a comment\n\n", "holds no prompt")]:
        g = tmp_path / f"p{len(message)}.txt"
        if text is not None:
            g.write_text(text)
        with pytest.raises(SystemExit, match=f"janus-rt generate: --prompts-file .*{message}"):
            main(["generate", "--model", "tiny", "--prompts-file", str(g), "--out", str(tmp_path / "c")])


def test_generate_many_prompts_names_and_grid(tmp_path, capsys):
    """From 101 prompts on the prompt index takes 3 digits; grid.png shows the first GRID_ROWS prompts."""
    from janus_rt.processing import GRID_ROWS

    f = tmp_path / "prompts.txt"
    f.write_text("".join(f"prompt {i}\n" for i in range(101)))
    main(["generate", "--model", "tiny", "--prompts-file", str(f), "-n", "1", "--temperature", "0",
          "--out", str(tmp_path / "o")])
    names = sorted(p.name for p in (tmp_path / "o").glob("img_*.png"))
    assert names == [f"img_{i:03d}_00.png" for i in range(101)]
    assert Image.open(tmp_path / "o" / "grid.png").size == (128, GRID_ROWS * 128 + (GRID_ROWS - 1) * 2)
    out = capsys.readouterr().out
    assert f"grid.png: the first {GRID_ROWS} prompts" in out
    import re  # and how long the prompts of the queue took, first tokens before the last

    m = re.search(r"per prompt, from the queue's start: first image tokens median ([0-9.]+) s, max ([0-9.]+) s; "
                  r"all its tokens median ([0-9.]+) s, max ([0-9.]+) s", out)
    assert m and float(m[1]) <= float(m[2]) and float(m[3]) <= float(m[4]) and float(m[1]) <= float(m[3]), out


@pytest.mark.parametrize("flags,message", [(["-n", "0"], "-n must be >= 1"), (["--top-p", "1.5"], "--top-p must be"),
                                           (["--top-k", "-1"], "--top-k must be"),
                                           (["--temperature", "-1"], "--temperature must be"),
                                           (["--kv-cache-gb", "0"], "--kv-cache-gb must be > 0"),
                                           (["--device", "cpu", "--dtype", "fp16"], "--dtype fp16 needs a GPU"),
                                           (["--cfg", "nan"], "--cfg must be a finite number"),
                                           (["--cfg", "inf"], "--cfg must be a finite number"),
                                           (["--cfg", "1e39"], r"--cfg must be a finite number \(in fp32\)"),
                                           (["--temperature", "1e-7"], r"--temperature must be 0 \(greedy\) or in"),
                                           (["--temperature", "1e39"], r"--temperature must be 0 \(greedy\) or in"),
                                           (["--prompt", " "], "--prompt is empty"),
                                           (["--greedy", "--temperature", "0.7"],
                                            r"--greedy takes the argmax, which no --temperature changes"),
                                           (["--greedy", "--top-k", "5"], "--top-k / --top-p sample, so they need"),
                                           (["--temperature", "0", "--top-p", "0.5"], "--top-k / --top-p sample"),
                                           (["--seed", "-1"], r"--seed must be in \[0, 2\^64\)"),
                                           (["--prompt", "a", "--prompt", "b", "--seed", str(2**64 - 1)],
                                            r"--seed must be in \[0, 2\^64\) \(prompt k samples with --seed \+ k\)")])
def test_generate_bad_flags_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(SystemExit, match="janus-rt generate: " + message):
        main(["generate", "--model", "tiny", "--prompt", "x", "--out", str(tmp_path / "o")] + flags)


def test_generate_seed_range_counts_the_prompts_file(tmp_path, monkeypatch):
    """--seed + k for the k-th prompt, --prompts-file's prompts counted too: refused before the model loads."""
    import janus_rt.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded before --seed was checked"))
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    with pytest.raises(SystemExit, match=r"--seed must be in \[0, 2\^64\) \(prompt k samples with --seed \+ k\)"):
        main(["generate", "--prompts-file", str(tmp_path / "p.txt"), "--seed", str(2**64 - 1), "--out",
              str(tmp_path / "o")])


def test_generate_says_when_a_prompt_runs_past_the_positions(tmp_path, capsys):
    """A prompt that, with its image tokens, runs past the model's positions is generated, with a note (as
    understand notes a long answer); a short one gets none."""
    from janus_rt.cli import DEFAULT_MODEL

    main(["generate", "--model", DEFAULT_MODEL, "--prompt", "red " * 1100, "-n", "1", "--out", str(tmp_path / "a")])
    assert re.search(r"note: the longest prompt \(\d+ tokens\) and its \d+ image tokens run past the model's 4096 "
                     r"positions", capsys.readouterr().err)
    assert (tmp_path / "a" / "img_00_00.png").exists()
    main(["generate", "--model", DEFAULT_MODEL, "--prompt", "red", "-n", "1", "--out", str(tmp_path / "b")])
    assert "positions" not in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [(["--steps-per-call", "0"], "--steps-per-call must be >= 1"),
                                           (["--repeats", "0"], "--repeats must be >= 1"),
                                           (["-n", "0"], "-n must be >= 1"), (["--tokens", "0"], "--tokens must be"),
                                           (["--shape", "7b"], "--shape 7b picks random weights' shapes; --model")])
def test_bench_bad_flags_are_clear_errors(flags, message):
    with pytest.raises(SystemExit, match="janus-rt bench: " + message):
        main(["bench", "--model", "tiny", "--device", "cpu", "--no-transformers"] + flags)


@pytest.mark.parametrize("cmd", [["generate", "--prompt", "x"], ["bench", "--no-transformers"]])
def test_n_past_the_engines_rows_is_refused_before_the_model_loads(cmd, tmp_path, monkeypatch):
    """-n 129 needs 258 rows (CFG) of the engine's 256: said before the load (minutes at 7B), not after it."""
    import janus_rt.cli as cli
    import janus_rt.engine.benchmark as benchmark

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded before -n was checked"))
    monkeypatch.setattr(benchmark, "main", lambda *a, **k: pytest.fail("ran before -n was checked"))
    with pytest.raises(SystemExit, match=rf"janus-rt {cmd[0]}: -n must be at most 128 \(each image takes 2 of the "):
        main([*cmd, "--model", "tiny", "--device", "cpu", "-n", "129", "--out", str(tmp_path / "o")]
             if cmd[0] == "generate" else [*cmd, "--model", "tiny", "--device", "cpu", "-n", "129"])


def test_bench_negative_warmup_tokens_is_refused(monkeypatch):
    import janus_rt.engine.benchmark as benchmark

    monkeypatch.setattr(benchmark, "main", lambda *a, **k: pytest.fail("ran with --warmup-tokens -1"))
    with pytest.raises(SystemExit, match=r"janus-rt bench: --warmup-tokens must be >= 0 \(0: none\), got -1"):
        main(["bench", "--model", "tiny", "--device", "cpu", "--no-transformers", "--warmup-tokens", "-1"])


def test_bench_cuda_graphs_on_the_cpu_is_noted(monkeypatch, capsys):
    """As generate and serve say it: --cuda-graphs does nothing on the CPU."""
    import janus_rt.engine.benchmark as benchmark

    monkeypatch.setattr(benchmark, "main", lambda *a, **k: None)
    main(["bench", "--model", "tiny", "--device", "cpu", "--no-transformers", "--cuda-graphs"])
    assert "note: --cuda-graphs has no effect on the CPU" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [(["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
                                           (["--repeats", "0"], "--repeats must be >= 1, got 0"),
                                           (["--dtype", "fp16"], "--dtype fp16 needs a GPU")])
def test_bench_understand_bad_flags_are_one_line(flags, message, monkeypatch):
    """A bad value is said at once: not a KV-cache error (--new-tokens 0), a KeyError after the runs (--repeats 0),
    or minutes inside torch's fp16 matmul probe on the CPU (--dtype fp16)."""
    bu = bench_scripts.load("bench_understand")
    monkeypatch.setattr(bu.Janus, "from_preset", lambda *a, **k: pytest.fail("built before the flags were checked"))
    with pytest.raises(SystemExit, match="bench_understand: " + re.escape(message)):
        bu.main(bu.build_parser().parse_args(["--preset", "tiny", "--device", "cpu", "--no-transformers", *flags]))


def test_generate_out_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        main(["generate", "--model", "tiny", "--prompt", "x", "--out", str(tmp_path / "file")])


def test_ctrl_c_is_one_line_and_says_what_is_kept(tmp_path, capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) ends a command with exit code 130 and one line, no traceback: generate says how
    many PNGs it wrote (each prompt's as it finishes), train which checkpoint --resume continues from."""
    from janus_rt.engine import Engine

    real_run = Engine.run

    def run_then_interrupt(self, progress=False, desc="", on_finish=None, **kw):  # after the first request's PNGs
        def finish(r):
            on_finish(r)
            raise KeyboardInterrupt

        return real_run(self, progress, desc, finish, **kw)

    gen = ["generate", "--model", "tiny", "--prompt", "a", "--prompt", "b", "-n", "2", "--out", str(tmp_path / "g")]
    main(gen)  # a whole run first: its 4 PNGs are not this run's
    assert len(list((tmp_path / "g").glob("img_*.png"))) == 4
    (tmp_path / "g" / "grid.png").unlink()
    capsys.readouterr()
    monkeypatch.setattr(Engine, "run", run_then_interrupt)
    with pytest.raises(SystemExit) as e:
        main(gen)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    assert "interrupted: 2 of 4 image(s) written to" in err and err.rstrip().endswith("janus-rt generate: interrupted")
    assert not (tmp_path / "g" / "grid.png").exists() and not list((tmp_path / "g").glob("*.tmp"))

    real_step, calls = torch.optim.AdamW.step, []

    def step_then_interrupt(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    train = ["train", "--model", "tiny", "--synthetic", "4", "--steps", "5", "--batch-size", "1", "--seq-len", "512",
             "--no-progress", "--out", str(tmp_path / "t")]
    with pytest.raises(SystemExit) as e:
        main(train + ["--save-every", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    assert f"interrupted after step 2 of 5: the newest checkpoint is {tmp_path / 't' / 'checkpoints' / 'step_0000002'}" \
        in err
    calls.clear()
    with pytest.raises(SystemExit):
        main(train[:-1] + [str(tmp_path / "t2")])
    assert "interrupted after step 2 of 5: no checkpoint written yet" in capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path, capsys):
    """A user's mistake that surfaces past the flag checks (a folder that is no checkpoint, an output folder that
    cannot be made, a KV pool too small for the request) ends in one `janus-rt CMD: ...` line, not a traceback;
    and an unwritable --out is found before the model loads and generates."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    cases = [
        (["generate", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o1")],
         "janus-rt generate: .*no config.json"),
        (["generate", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")],
         "janus-rt generate: --model .*: no such folder, and not a preset"),
        (["generate", "--model", "tiny", "-n", "4", "--kv-cache-gb", "1e-4", "--out", str(tmp_path / "o3" / "sub")],
         r"janus-rt generate: request \d+ needs up to \d+ KV blocks \(.* GiB\)"),
        (["convert", str(tmp_path / "nowhere"), str(tmp_path / "c")],
         "janus-rt convert: .*nowhere: not a checkpoint folder"),
        (["verify", str(tmp_path / "empty")], "janus-rt verify: .*empty: no config.json"),
        (["verify", str(tmp_path / "nowhere")], "janus-rt verify: .*nowhere: not a checkpoint folder"),
        (["verify", str(tmp_path / "file")], "janus-rt verify: .*file: not a checkpoint folder"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            main(argv)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))  # a failed run leaves no output folder
    capsys.readouterr()
    with pytest.raises(SystemExit, match="--out .*: cannot create it"):
        main(["generate", "--model", "tiny", "--out", str(tmp_path / "file" / "sub")])
    assert "RANDOM weights" not in capsys.readouterr().err  # refused before the model loaded


def test_bad_device_is_one_line_in_every_command(tmp_path, capsys):
    """--device gpu / meta / CPU, and cuda on a torch without CUDA: `janus-rt CMD: --device ...` before anything loads,
    in every command that takes --device (torch's own errors were tracebacks from deep inside a run)."""
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    commands = [["generate", "--out", str(tmp_path / "o")], ["understand", "--image", str(img), "--question", "?"],
                ["verify", str(tmp_path)], ["bench", "--shape", "small"], ["serve"]]
    bad = ["gpu", "meta", "CPU"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])
    for argv in commands:
        for device in bad:
            with pytest.raises(SystemExit, match=f"janus-rt {argv[0]}: --device '?{device}'?: "):
                main(argv + ["--device", device])
    assert "RANDOM weights" not in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_bench_refuses_what_it_could_not_write_before_running(tmp_path, monkeypatch):
    """bench's --json and --profile are written after minutes of runs: a folder as --json, a file as --profile, a
    path under a file, are refused before anything runs; as are --tokens past an image's 576 and --dtype fp16 on the
    CPU (a traceback from deep in the run before). generate refuses an empty --out (it wrote into the current
    folder and said '-> /')."""
    import janus_rt.engine.benchmark as benchmark
    from janus_rt.cli import DEFAULT_MODEL

    # a checkpoint's own image tokens (the embedded model's 64): checked as it loads, before any probe or run
    with pytest.raises(SystemExit, match="janus-rt bench: --tokens must be at most 64 \\(this model's"):
        main(["bench", "--model", DEFAULT_MODEL, "--tokens", "65", "--no-transformers"])
    monkeypatch.setattr(benchmark, "main", lambda args: pytest.fail("the benchmark ran"))
    (tmp_path / "afile").write_text("")
    cases = [(["--json", str(tmp_path)], "--json .* is a folder"),
             (["--json", str(tmp_path / "afile" / "x")], "--json .* is not an existing folder"),
             (["--profile", str(tmp_path / "afile")], "--profile .* is a file, not a folder"),
             (["--profile", str(tmp_path / "afile" / "sub")], "--profile .*: cannot create it"),
             (["--tokens", "577"], "--tokens must be at most 576"),
             (["--dtype", "fp16", "--device", "cpu"], "--dtype fp16 needs a GPU")]
    for flags, message in cases:
        with pytest.raises(SystemExit, match=f"janus-rt bench: {message}"):
            main(["bench", "--shape", "small"] + flags)
    with pytest.raises(SystemExit, match="janus-rt generate: --out is empty"):
        main(["generate", "--out", ""])
    monkeypatch.setattr(benchmark, "main", lambda args: pytest.fail("the benchmark ran"))
    with pytest.raises(pytest.fail.Exception, match="the benchmark ran"):  # a good --json passes the checks ...
        main(["bench", "--shape", "small", "--json", str(tmp_path / "rows.jsonl")])
    assert not (tmp_path / "rows.jsonl").exists()  # ... which did not create it (a run that fails leaves none)


def test_bad_environment_switch_is_one_line(tmp_path, monkeypatch, capsys):
    """A value a janus_rt environment switch does not take is said in one line before any work, for every switch
    (JANUS_RT_KEEP_FREED=no and JANUS_RT_AMX=yes used to count as on; JANUS_RT_PACKED=maybe was a traceback)."""
    from janus_rt.errors import ENV_SWITCHES, env_switch

    for name in ENV_SWITCHES:
        monkeypatch.setenv(name, "maybe")
        with pytest.raises(SystemExit, match=f"janus-rt generate: {name}='maybe': expected "):
            main(["generate", "--out", str(tmp_path / "o")])
        monkeypatch.setenv(name, ENV_SWITCHES[name][-1].upper())  # any case; the last choice (not the default)
        assert env_switch(name) == ENV_SWITCHES[name][-1]
        monkeypatch.delenv(name)
    assert not (tmp_path / "o").exists() and "embedded" not in capsys.readouterr().err
    from janus_rt.train.cli import main as train_main  # the torchrun entry point checks them as first

    monkeypatch.setenv("JANUS_RT_KEEP_FREED", " 0")  # (csrc reads JANUS_RT_AMX unstripped: no spaces anywhere)
    with pytest.raises(SystemExit, match="janus-rt train: JANUS_RT_KEEP_FREED=' 0': expected"):
        train_main(["--model", "tiny", "--synthetic", "4", "--steps", "1", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_only_usage_errors_are_one_line(tmp_path, monkeypatch):
    """A janus_rt bug (any other ValueError) keeps its traceback; JANUS_RT_DEBUG=1 keeps it for usage errors too;
    `python -m janus_rt.train` says usage errors in one line as `janus-rt train` does."""
    from janus_rt import cli
    from janus_rt.errors import UsageError
    from janus_rt.train.cli import main as train_main

    def bug(args):
        raise ValueError("an internal contract broken")

    monkeypatch.setattr(cli, "cmd_convert", bug)
    with pytest.raises(ValueError, match="internal contract"):
        main(["convert", str(tmp_path), str(tmp_path / "c")])
    monkeypatch.setenv("JANUS_RT_DEBUG", "1")
    with pytest.raises(UsageError, match="no such folder"):
        main(["generate", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    monkeypatch.delenv("JANUS_RT_DEBUG")
    with pytest.raises(SystemExit, match="janus-rt train: give a manifest"):
        train_main(["--out", str(tmp_path / "run")])


def test_generate_temperature_zero_is_greedy(tmp_path):
    """--temperature 0 means greedy (as for understand): the same images as --greedy."""
    a, b = tmp_path / "a", tmp_path / "b"
    main(["generate", "--model", "tiny", "--prompt", "a red circle", "-n", "1", "--temperature", "0", "--out", str(a)])
    main(["generate", "--model", "tiny", "--prompt", "a red circle", "-n", "1", "--greedy", "--out", str(b)])
    pngs = sorted(p.name for p in a.glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in b.glob("*.png"))
    pixels = lambda f: Image.open(f).convert("RGB").tobytes()  # the PNG text differs: it says each run's flags
    assert all(pixels(a / n) == pixels(b / n) for n in pngs)


def test_understand_bad_image_is_a_clear_error(tmp_path, monkeypatch):
    """A missing, unreadable or too large (PIL's decompression-bomb limit) --image stops with its path named, not a
    traceback from deep inside PIL."""
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is past twice the limit: PIL refuses it
    for bad in (tmp_path / "missing.png", tmp_path / "notes.png", tmp_path / "big.png"):
        with pytest.raises(SystemExit, match=f"--image '{bad}'"):
            main(["understand", "--model", "tiny", "--image", str(bad), "--question", "What colour?"])


def test_understand_sampling_flags_agree_with_generate(tmp_path):
    """--top-p without --temperature > 0 (greedy: it would be ignored) and a temperature below generate's floor are
    refused, as generate refuses them (understand raised 1e-30 to 1e-6 without a word)."""
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    for flags, message in [(["--top-p", "0.5"], "--top-p samples, so it needs --temperature > 0"),
                           (["--temperature", "1e-30"], r"--temperature must be 0 \(greedy\) or in \[1e-06")]:
        with pytest.raises(SystemExit, match=message):
            main(["understand", "--model", "tiny", "--image", str(img), "--question", "?"] + flags)


def test_convert_and_verify_official_layout(tmp_path, capsys):
    pytest.importorskip("transformers")
    from hf_reference import SMALL_CONFIGS, hf_model, official_config, official_state_dict, tiny_tokenizer

    c = SMALL_CONFIGS["a"]
    hf = hf_model(c, seed=2)
    off = tmp_path / "official"
    off.mkdir()
    (off / "config.json").write_text(json.dumps(official_config(c)))
    torch.save(official_state_dict(hf, c), off / "pytorch_model.bin")
    tiny_tokenizer(c).save(off / "tokenizer.json")
    main(["convert", str(off), str(tmp_path / "conv"), "--dtype", "fp32"])
    assert (tmp_path / "conv" / "model.safetensors").exists() and (tmp_path / "conv" / "tokenizer.json").exists()
    with pytest.raises(SystemExit) as e:
        main(["verify", str(off)])
    assert e.value.code == 0
    assert "PASS" in capsys.readouterr().out


def test_verify_transformers_layout_and_that_it_can_fail(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from hf_reference import SMALL_CONFIGS, hf_model, write_hf

    from janus_rt.verify import verify

    c = SMALL_CONFIGS["b"]
    path = write_hf(hf_model(c, seed=4), tmp_path / "hf", c)
    assert verify(path)
    out = capsys.readouterr().out
    assert "text_logits+image" in out and "PASS" in out
    # a broken kernel (RMSNorm eps ignored) must be caught
    import janus_rt.ops as ops

    real = ops.rms_norm_torch
    monkeypatch.setattr(ops, "rms_norm_torch", lambda x, w, eps: real(x, w, 0.3))
    assert not verify(path)
    assert "FAIL" in capsys.readouterr().out


def test_verify_in_bf16_judges_codes_by_distance(capsys, monkeypatch):
    """In bf16 the VQ encoder's near-ties may pick another code than the fp32 reference (the embedded model: 1 of 64,
    0.0009 farther): verify passes on the distance excess; codes that are really wrong fail it."""
    pytest.importorskip("transformers")
    from janus_rt.cli import DEFAULT_MODEL
    from janus_rt.verify import verify

    assert verify(DEFAULT_MODEL, dtype=torch.bfloat16)
    assert "distance excess" in capsys.readouterr().out
    real = Janus.encode_images
    monkeypatch.setattr(Janus, "encode_images", lambda self, x: (real(self, x) + 1) % self.cfg.vq.codebook_size)
    assert not verify(DEFAULT_MODEL, dtype=torch.bfloat16)
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("layerwise", [False, True])
def test_bench_json_and_profile(tmp_path, capsys, layerwise):
    """`janus-rt bench` on the tiny preset: a JSON row with the measured columns, a Perfetto trace, and a per-op
    table naming the csrc calls of the decode path it ran."""
    pytest.importorskip("transformers")
    from janus_rt import cpu_ops

    out = tmp_path / "rows.jsonl"
    args = ["bench", "--model", "tiny", "--device", "cpu", "--tokens", "6", "--repeats", "1",
            "--json", str(out), "--profile", str(tmp_path / "prof"), "--steps-per-call", "3" if layerwise else "1"]
    main(args + (["--layerwise"] if layerwise else []))
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["tokens"] == 6 and row["janus_rt_s"] > 0 and row["transformers_s"] > 0 and row["speedup"] > 0
    assert row["steps_per_call"] == (3 if layerwise else 1)
    assert 0 < row["roofline_fraction"] and row["roofline_ms_step"] > 0 and row["bandwidth_gbs"] > 0
    # a fraction per timed run of ours (--repeats 1), against the probes beside it; the row's is their median, and
    # the fastest probe of the whole benchmark is at least the median run's
    assert len(row["roofline_fractions"]) == 1 and row["roofline_fraction"] == row["roofline_fractions"][0]
    assert row["janus_rt_setup_s"] > 0 and row["step_mib"] > 0 and row["transformers_ms_step"] > 0
    assert row["transformers_attention"] == "sdpa"  # transformers' default, not the parity checks' eager
    assert row["best_bandwidth_gbs"] >= row["bandwidth_gbs"] and 0 < row["roofline_fraction_vs_best"]
    # the tiny preset is fp32: as `generate`, the benchmark holds its projections packed only (packed in place)
    if cpu_ops.available():
        assert row["cpu_decode"] == ("layerwise" if layerwise else "decode_layer, packed GEMV") + " (packed in place)"
        assert row["cpu_prefetch_rule"] == cpu_ops.prefetch_rule()
    else:  # (the lent GPU's session runs the suite without building csrc/)
        assert row["cpu_decode"] == "layerwise" and "cpu_prefetch_rule" not in row
    assert row["openmp_wait"] == openmp.wait_policy() != "not applied"
    assert row["cpu_team_switches"] >= 0  # (engine/threads.py: 0 unless other processes took the cores)
    for name in ("janus_rt", "transformers"):  # each timed run's wait for a CPU, per second (--repeats 1)
        assert len(row[f"{name}_cpu_wait_per_s"]) == 1 and row[f"{name}_cpu_wait_per_s"][0] >= 0
    assert (tmp_path / "prof" / "trace.json").stat().st_size > 0
    table = capsys.readouterr().out
    if cpu_ops.available():
        assert ("janus_rt::cpu_linear" if layerwise else "janus_rt::cpu_decode_layers") in table
        # the csrc decoder's phase table (not for the layer-by-layer path, whose ops the profiler shows)
        assert ("inside the csrc decoder layers" in table) != layerwise
        if not layerwise:
            assert "attention" in table and "gate_up_proj" in table and "rest of the step" in table
            with Image.open(tmp_path / "prof" / "phases.png") as chart:  # the same table as a bar chart
                assert chart.width > 600 and chart.height > 12 * 26


def test_bench_profile_frees_earlier_engines_and_the_baseline(tmp_path, monkeypatch):
    """`janus-rt bench --profile` builds its engines one at a time, sizing each KV pool from the free memory: the
    profiled engine and transformers' copy of the model are gone before the phase timing's engine is made (with both
    still held, the 1B n = 16 benchmark stopped at its phase table: 1185 of 1216 KV blocks)."""
    pytest.importorskip("transformers")
    import gc
    import weakref

    from janus_rt.engine import benchmark, profile

    made, baseline, checked = [], [], []
    real_engines = {name: getattr(benchmark, name) for name in ("bench_engine", "image_engine")}
    real_baseline, real_phases = benchmark.transformers_baseline, profile.decode_phase_times

    def engine_maker(name):
        def make(*a, **kw):
            eng = real_engines[name](*a, **kw)
            made.append(weakref.ref(eng))
            return eng
        return make

    def ref_model(*a, **kw):
        m = real_baseline(*a, **kw)
        if m is not None:
            baseline.append(weakref.ref(m))
        return m

    def phases(*a, **kw):
        gc.collect()
        checked.append(([r() is None for r in made], [r() is None for r in baseline]))
        return real_phases(*a, **kw)

    for name in real_engines:
        monkeypatch.setattr(benchmark, name, engine_maker(name))
    monkeypatch.setattr(benchmark, "transformers_baseline", ref_model)
    monkeypatch.setattr(profile, "decode_phase_times", phases)
    main(["bench", "--model", "tiny", "--device", "cpu", "--tokens", "4", "--repeats", "1", "--warmup-tokens", "0",
          "--profile", str(tmp_path / "prof")])
    assert len(checked) == 1
    engines_gone, baseline_gone = checked[0]
    assert len(engines_gone) >= 2 and all(engines_gone)  # the timed runs' and the profiled one
    assert baseline_gone == [True]


@pytest.mark.parametrize("packed_env", ["auto", "0"])
def test_bench_packs_in_place(tmp_path, capsys, monkeypatch, packed_env):
    """`janus-rt bench` holds the model's projections packed only, as `generate` does, and says so in its output and
    its row; JANUS_RT_PACKED=0 keeps the model as loaded (the unpacked GEMV)."""
    from janus_rt import cpu_ops

    if not cpu_ops.available():
        pytest.skip("janus_rt._C not built")
    monkeypatch.setenv("JANUS_RT_PACKED", packed_env)
    out = tmp_path / "rows.jsonl"
    main(["bench", "--model", "tiny", "--device", "cpu", "--tokens", "4", "--repeats", "1", "--no-transformers",
          "--json", str(out)])
    row = json.loads(out.read_text().splitlines()[-1])
    printed = capsys.readouterr().out
    if packed_env == "0":
        assert row["cpu_decode"] == "decode_layer" and "packed" not in printed
    else:
        assert row["cpu_decode"] == "decode_layer, packed GEMV (packed in place)"
        assert "packed the LLM's projections in place" in printed


def test_bench_model_takes_the_checkpoints_dtype(tmp_path):
    """bench --model CKPT runs in the dtype `generate` would (on the CPU a bf16 checkpoint's bf16), not --shape
    small's fp32; --dtype still wins."""
    from janus_rt.cli import DEFAULT_MODEL
    from janus_rt.loading import convert

    ckpt = convert(DEFAULT_MODEL, tmp_path / "bf16", dtype=torch.bfloat16)
    out = tmp_path / "rows.jsonl"
    base = ["bench", "--model", str(ckpt), "--device", "cpu", "--tokens", "3", "--repeats", "1", "--no-transformers",
            "--warmup-tokens", "0", "--json", str(out)]
    main(base)
    main(base + ["--dtype", "fp32"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["dtype"], r["n"]) for r in rows] == [("bfloat16", 4), ("float32", 4)]


def test_bench_warms_up_each_implementation_untimed(tmp_path, capsys, monkeypatch):
    """`janus-rt bench` first runs each implementation once at --warmup-tokens, outside the numbers (a GPU's first run
    compiles Triton kernels), then the timed alternating runs at --tokens; --warmup-tokens 0 skips it."""
    pytest.importorskip("transformers")
    from janus_rt.engine import benchmark

    calls = []
    ours, theirs = benchmark.run_janus_rt, benchmark.run_transformers
    monkeypatch.setattr(benchmark, "run_janus_rt", lambda e, p, n, t: calls.append(("ours", t)) or ours(e, p, n, t))
    monkeypatch.setattr(benchmark, "run_transformers", lambda r, p, n, t, c: calls.append(("hf", t)) or theirs(r, p, n, t, c))
    out = tmp_path / "rows.jsonl"
    base = ["bench", "--model", "tiny", "--device", "cpu", "--tokens", "5", "--repeats", "1", "--json", str(out)]
    main(base + ["--warmup-tokens", "2"])
    # (the last run of ours: its peak memory, not timed)
    assert calls == [("ours", 2), ("hf", 2), ("ours", 5), ("hf", 5), ("ours", 5)]
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["warmup_tokens"] == 2 and len(row["janus_rt_ms_steps"]) == 1 and len(row["transformers_ms_steps"]) == 1
    assert row["janus_rt_ms_step"] == row["janus_rt_ms_steps"][0]
    assert "# warm-up: one untimed run of each at 2 tokens per image" in capsys.readouterr().out
    calls.clear()
    main(base + ["--warmup-tokens", "0"])
    assert calls == [("ours", 5), ("hf", 5), ("ours", 5)]
    assert json.loads(out.read_text().splitlines()[-1])["warmup_tokens"] == 0


def test_bench_keeps_our_numbers_when_the_baseline_fails(tmp_path, capsys, monkeypatch):
    """A transformers baseline that raises (another version's bug) is reported and skipped: the row still has
    janus_rt's numbers, without the baseline's columns."""
    pytest.importorskip("transformers")
    from janus_rt.engine import benchmark

    def broken(*args, **kwargs):
        raise TypeError("a baseline bug")

    monkeypatch.setattr(benchmark, "run_transformers", broken)
    out = tmp_path / "rows.jsonl"
    main(["bench", "--model", "tiny", "--device", "cpu", "--tokens", "4", "--repeats", "2", "--json", str(out)])
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["janus_rt_s"] > 0 and row["roofline_fraction"] > 0 and "speedup" not in row
    assert len(row["roofline_fractions"]) == 2  # every timed run of ours went ahead
    assert "transformers' generate failed (TypeError: a baseline bug); baseline skipped" in capsys.readouterr().err


def test_run_gpu_sections_keep_their_deadlines(tmp_path, monkeypatch):
    """bench/run_gpu.py (a lent GPU's one call): each section runs in its own process with a deadline, the markdown is
    rewritten after every section, and the sections come in order (generate, tests, op benchmarks). Without CUDA it
    exits 0 at once; here CUDA is faked and the commands swapped for CPU ones (a 2-token generation, a child that
    overruns its deadline)."""
    import sys

    rg = bench_scripts.load("run_gpu")
    assert rg.main(["--out", str(tmp_path / "none.md")]) == 0 and not (tmp_path / "none.md").exists()  # no CUDA
    status, text = rg.run_section([sys.executable, "-c", "print('hi')"], 30)
    assert status.startswith("exit 0") and text.strip() == "hi"
    status, text = rg.run_section([sys.executable, "-c", "import time; print('x', flush=True); time.sleep(60)"], 2)
    assert status.startswith("STOPPED") and "x" in text
    monkeypatch.setattr(rg.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rg.torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(rg, "GENERATE_ARGS", ["--shape", "small", "-n", "1", "--tokens", "2", "--repeats", "1",
                                              "--no-transformers", "--device", "cpu"])
    monkeypatch.setattr(rg, "OPS", ["rms_norm", "paged_attention", "no_such_op"])
    out = tmp_path / "gpu.md"
    assert rg.main(["--out", str(out), "--generate", "--skip-tests", "--budget", "600"]) == 0
    md = out.read_text()
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    # paged_attention's benchmark (both kernels) and the engine on the "slots" kernel come before the other ops
    assert [t.split(" (")[0] for t in titles] == ["## generate", "## paged_attention",
                                                  "## generate, paged attention variant=slots", "## rms_norm",
                                                  "## no_such_op"]
    assert "(exit 0 after" in titles[0] and "janus_rt_ms_step" in md
    assert (tmp_path / "profile" / "trace.json").stat().st_size > 0  # the generate section's profile, beside it
    assert "(exit 0 after" in titles[2]  # the engine again with JANUS_RT_PAGED_ATTENTION=slots
    assert "(exit 0 after" in titles[3] and "(exit 1 after" in titles[4]  # a failing benchmark is reported, not fatal
    assert "fake GPU" in md.splitlines()[0]
    # the test section: the whole pytest output beside the markdown, the failed tests named in it
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_two.py").write_text("def test_good():\n    pass\n\ndef test_bad():\n    assert 0\n")
    monkeypatch.setattr(rg, "TESTS", [str(tmp_path / "t")])
    monkeypatch.setattr(rg, "ENGINE_TESTS", [])
    monkeypatch.setattr(rg, "OPS", [])
    assert rg.main(["--out", str(out), "--budget", "300"]) == 0
    md = out.read_text()
    assert "## pytest on CUDA (exit 1 after" in md and "(1 failed or erred; whole output in pytest.txt)" in md
    assert "test_two.py::test_bad FAILED" in md and "test_two.py::test_good PASSED" in (tmp_path / "pytest.txt").read_text()


def test_bench_understand_runs_against_transformers(tmp_path):
    """bench/bench_understand.py on the tiny preset: both implementations answer the same greedy tokens, and the
    row carries time to the first token, per-token decode and roofline numbers for each."""
    pytest.importorskip("transformers")
    bu = bench_scripts.load("bench_understand")
    out = tmp_path / "rows.jsonl"
    row = bu.main(bu.build_parser().parse_args(["--preset", "tiny", "--device", "cpu", "--new-tokens", "6",
                                                "--repeats", "1", "--json", str(out)]))
    assert json.loads(out.read_text().splitlines()[-1]) == row
    assert row["same_tokens"] is True and row["new_tokens"] == 6
    assert row["prompt_tokens"] == 1 + 40 + 2 + 20 + Janus.from_preset("tiny").cfg.vision.num_patches
    for name in ("janus_rt", "transformers"):
        assert row[f"{name}_first_token_s"] > 0 and row[f"{name}_decode_ms_token"] > 0
        # (the row rounds seconds to 1 ms: the tiny model's whole answer can tie its first token, 0.004 = 0.004)
        assert row[f"{name}_total_s"] >= row[f"{name}_first_token_s"]
    assert row["decode_roofline_ms"] > 0 and row["decode_roofline_fraction"] > 0
    assert row["openmp_wait"] == openmp.wait_policy()
    assert all(len(row[f"{name}_cpu_wait_per_s"]) == 1 for name in ("janus_rt", "transformers"))


def test_bench_serving_serves_both_ways(tmp_path):
    """bench/bench_serving.py at a small size: both schedules serve every request, the row's numbers are consistent
    (median <= p90 <= max, first tokens before the last), and the timeline PNG is drawn."""
    bs = bench_scripts.load("bench_serving")
    out = tmp_path / "rows.jsonl"
    row = bs.main(["--requests", "3", "--rate", "50", "-n", "1", "--tokens", "12", "--out", str(tmp_path),
                   "--json", str(out)])
    assert json.loads(out.read_text().splitlines()[-1]) == row
    for key in ("batched", "single"):
        s = row[key]
        assert s["tokens_per_s"] > 0 and 0 < s["ttft_median_s"] <= s["ttft_p90_s"]
        assert s["ttft_median_s"] <= s["latency_median_s"] <= s["latency_p90_s"] <= s["latency_max_s"]
    assert Image.open(tmp_path / "serving.png").size[0] > 600
    jobs = bs.workload(Janus.from_preset("tiny"), 50, 2.0, 1, seed=1)
    gaps = [b["arrival"] - a["arrival"] for a, b in zip(jobs, jobs[1:])]
    assert jobs[0]["arrival"] == 0 and min(gaps) >= 0 and 0.25 < sum(gaps) / len(gaps) < 1.0  # mean 1/rate = 0.5 s


@pytest.mark.parametrize("flags, says", [(["--tokens", "1000"], "--tokens must be at most 576"),
                                         (["--dtype", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
                                         (["--out", "FILE"], "is a file, not a folder"),
                                         (["--json", "DIR"], "is a folder")])
def test_bench_serving_refuses_bad_flags_before_it_builds(tmp_path, capsys, monkeypatch, flags, says):
    """bench_serving.py's flags are checked before the model is built and the runs made (a file as --out failed only
    after the whole run, its results lost)."""
    bs = bench_scripts.load("bench_serving")
    monkeypatch.setattr(bs, "bench_model", lambda *a: pytest.fail("built the model"))
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "DIR").mkdir()
    flags = [str(tmp_path / f) if f in ("FILE", "DIR") else f for f in flags]
    with pytest.raises(SystemExit) as e:
        bs.main(flags)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_generate_says_when_other_processes_took_the_cpu(tmp_path, capsys, monkeypatch):
    """`generate` measures its threads' wait for a CPU around the generation (roofline.CpuWait) and notes a busy
    machine, since its tokens/s and ms/step are then upper bounds; here the wait is set to 0.9 s a second."""
    from janus_rt.engine import roofline

    real_exit = roofline.CpuWait.__exit__

    def busy_exit(self, *exc):
        real_exit(self, *exc)
        self.per_s = 0.9

    monkeypatch.setattr(roofline.CpuWait, "__exit__", busy_exit)
    main(["generate", "--model", "tiny", "--prompt", "a red circle", "-n", "1", "--out", str(tmp_path), "--seed", "1"])
    assert ("note: janus-rt generate's threads waited for a CPU 0.90 s per second of its run: other processes shared "
            "the cores" in capsys.readouterr().err)


def test_a_tokenizer_past_the_models_vocabulary_is_refused_at_load(tmp_path):
    """A checkpoint folder whose tokenizer.json has ids past the model's embedding (another checkpoint's tokenizer):
    a UsageError when it loads, not a refusal of every request that holds such a token later."""
    from dataclasses import replace

    from janus_rt.cli import load_model
    from janus_rt.errors import UsageError
    from janus_rt.loading import save_janus
    from janus_rt.tokenizer import JanusTokenizer

    model = Janus.from_preset("tiny", seed=0)
    out = save_janus(model, tmp_path / "ck")
    vocab = model.cfg.llm.vocab_size
    JanusTokenizer.byte_level(vocab, model.cfg.tokens).save(out / "tokenizer.json")
    assert load_model(str(out), "cpu", torch.float32)[1].eos_id == model.cfg.tokens.eos_id
    JanusTokenizer.byte_level(vocab + 64, replace(model.cfg.tokens, eos_id=vocab + 10)).save(out / "tokenizer.json")
    with pytest.raises(UsageError, match=f"token id {vocab + 10}, past the model's vocabulary of {vocab}"):
        load_model(str(out), "cpu", torch.float32)
