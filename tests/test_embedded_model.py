"""The embedded default model (janus_rt/assets/tiny-shapes, trained by janus_rt on its synthetic shapes) does what
it was trained to do, end to end through the engine: its images carry the colours their captions name, and it names
the colours of an image it is shown. Random-weight parity tests cannot see a bug that scrambles what a model has
learnt (a CFG sign, a swapped conditional row, an image spliced at the wrong place); these scores fall to chance."""
import numpy as np
import pytest

from janus_rt.cli import DEFAULT_MODEL
from janus_rt.processing import encode_understanding_prompt, preprocess_image
from janus_rt.train.evaluate import generate_images, heldout_captions, load_model_and_tokenizer
from janus_rt.train.synthetic import PALETTE, SHAPES, caption_color_match, draw_shape


@pytest.fixture(scope="module")
def embedded():
    return load_model_and_tokenizer(DEFAULT_MODEL)


def test_images_carry_the_caption_colours(embedded):
    model, tok = embedded
    captions = heldout_captions(12)
    images = [generate_images(model, tok, c, n=2, seed=i) for i, c in enumerate(captions)]  # through the engine
    own = np.mean([caption_color_match(im, c) for ims, c in zip(images, captions) for im in ims])
    # control: the same images against the next caption's colours (what a model ignoring its caption would score)
    other = np.mean([caption_color_match(im, c) for ims, c in zip(images, captions[1:] + captions[:1]) for im in ims])
    assert own >= 0.7 and other <= 0.35, (own, other)  # chance: ~0.15 (two of twelve palette colours)


def test_answers_name_the_colours_shown(embedded):
    model, tok = embedded
    size, n_tok = model.cfg.vision.image_size, model.cfg.vision.num_patches
    rng = np.random.default_rng(777)
    names, shapes = list(PALETTE), list(SHAPES)
    right = {"color": 0, "background": 0}
    n = 12
    for _ in range(n):
        shape = shapes[int(rng.integers(len(shapes)))]
        color, background = (names[j] for j in rng.choice(len(names), 2, replace=False))
        img, _ = draw_shape(shape, color, background, size, rng)
        pixels = preprocess_image(img, size)[None]
        for kind, question, want in (("color", "What colour is the shape?", color),
                                     ("background", "What colour is the background?", background)):
            ids = encode_understanding_prompt(tok, question, 1, n_tok)
            answer = tok.decode(model.generate_text(ids, pixels, max_new_tokens=8)).lower()
            right[kind] += want in answer
    assert right["background"] >= 0.8 * n and right["color"] >= 0.5 * n, right  # chance 1/12 each
