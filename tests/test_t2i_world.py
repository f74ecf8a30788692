"""Tests of t2i_world.py: the checker on renders, hard negatives and noise; the grammar; the split."""
import numpy as np
import pytest
from scipy import ndimage

import t2i_world as w

N_SPECS = 300          # random specs per category (both splits)
N_NEGATIVES = 100      # hard negatives per category and kind


def _specs(category, n, seed):
    """n random specs of a category, drawn from all its prompts (training and held-out alike)."""
    rng = np.random.default_rng(seed)
    specs = w.all_specs()[category]
    return [specs[i] for i in rng.integers(len(specs), size=n)], rng


def _noisy(image, rng, std=10.0, blur=0.5):
    """A uint8 image blurred (Gaussian, `blur` px) with Gaussian noise of `std` (0..255 scale) added."""
    x = ndimage.gaussian_filter(image.astype(np.float32), sigma=(blur, blur, 0))    # (H, W, 3)
    return np.clip(np.round(x + rng.normal(0, std, x.shape)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("category", w.CATEGORIES)
def test_checker_accepts_rendered_scenes_of_every_category(category, size):
    specs, rng = _specs(category, N_SPECS, seed=size)
    images = w.render_batch([w.sample_scene(s, rng) for s in specs], size)     # (N, size, size, 3)
    acc = w.check_batch(images, specs).mean()
    assert acc >= 0.98, f"{category} at {size} px: the checker accepts {acc:.1%} of rendered scenes"


@pytest.mark.parametrize("category", w.CATEGORIES)
def test_checker_rejects_hard_negatives(category):
    for kind in w.NEGATIVES[category]:
        specs, rng = _specs(category, N_NEGATIVES, seed=1)
        images = w.render_batch([w.hard_negative(s, rng, kind) for s in specs])
        rejected = 1 - w.check_batch(images, specs).mean()
        assert rejected >= 0.98, f"{category} / {kind}: the checker rejects {rejected:.1%} of hard negatives"


@pytest.mark.parametrize("std, blur, n", [(10, 0.5, N_SPECS), (20, 0.7, 150), (0, 1.0, 150)])
@pytest.mark.parametrize("category", w.CATEGORIES)
def test_checker_tolerates_mild_noise(category, std, blur, n):
    specs, rng = _specs(category, n, seed=2)
    images = [_noisy(w.render(w.sample_scene(s, rng)), rng, std, blur) for s in specs]
    acc = w.check_batch(images, specs).mean()
    assert acc >= 0.95, f"{category}: the checker accepts {acc:.1%} of renders (blur {blur} px, noise {std})"


def test_noisy_hard_negatives_are_still_rejected():
    for category in w.CATEGORIES:
        specs, rng = _specs(category, N_NEGATIVES, seed=3)
        images = [_noisy(w.render(w.hard_negative(s, rng)), rng) for s in specs]
        rejected = 1 - w.check_batch(images, specs).mean()
        assert rejected >= 0.98, f"{category}: the checker rejects {rejected:.1%} of noisy hard negatives"


def test_detect_reads_back_the_scene():
    rng = np.random.default_rng(4)
    spec = w.parse_prompt("a red circle and a blue square")
    scene = w.sample_scene(spec, rng)
    found = sorted(w.detect(w.render(scene)), key=lambda d: d.shape)
    assert [(d.shape, d.colour) for d in found] == [("circle", "red"), ("square", "blue")]
    for d, ob in zip(found, sorted(scene, key=lambda o: o.shape)):
        size, x0, y0 = w.pixel_box(ob, 32)
        assert d.bbox == (x0, y0, x0 + size, y0 + size) and d.score > 0.97


def test_checker_takes_prompts_and_tensors():
    rng = np.random.default_rng(5)
    specs = [w.parse_prompt(p) for p in ("three green triangles", "a yellow square", "a cross and a circle")]
    images = w.render_batch([w.sample_scene(s, rng) for s in specs])
    x = w.to_tensor(images)
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(w.to_uint8(x), images)
    assert w.check_batch(x, specs).all()
    assert w.check(images[0], "three green triangles") and not w.check(images[0], "four green triangles")
    assert not w.check(np.zeros((32, 32, 3), np.uint8), "a circle")


def test_relations_are_read_from_centres():
    a = w.Obj("circle", "red", "small", 0.25, 0.5)
    b = w.Obj("square", "blue", "small", 0.75, 0.55)
    image = w.render([a, b])
    assert w.check(image, "a red circle left of a blue square")
    assert w.check(image, "a blue square right of a red circle")
    for relation in ("right of", "above", "below"):
        assert not w.check(image, f"a red circle {relation} a blue square")


def test_every_prompt_parses_back_to_its_spec():
    for category, specs in w.all_specs().items():
        assert len(set(specs)) == len(specs)
        for spec in specs:
            text = w.prompt(spec)
            assert w.parse_prompt(text) == spec, text
            assert w.prompt(w.parse_prompt(text)) == text
    assert w.parse_prompt("An Orange Circle") == w.parse_prompt("a orange circle") == \
        w.Spec("colours", (w.Group("circle", "orange"),))


@pytest.mark.parametrize("text, problem", [
    ("a pink circle", "unknown colour 'pink'"),
    ("a red hexagon", "shape"),
    ("five red circles", "starts with"),
    ("three circles", "a count is followed by a colour"),
    ("three red circle", "plural"),
    ("a circle and a circle", "different shapes"),
    ("a red circle and a square", "both objects have a colour or neither"),
    ("a red circle and a red square", "different colours"),
    ("a circle left of a square", "two coloured objects"),
    ("two red circles and a blue square", "counts appear only alone"),
    ("a circle and a square and a cross", "at most two objects"),
    ("a red circle left of", "nothing after"),
    ("", "empty"),
])
def test_out_of_grammar_prompt_raises_value_error(text, problem):
    with pytest.raises(ValueError, match=problem):
        w.parse_prompt(text)


def test_vocabulary_is_the_grammar_s_words():
    words = w.vocabulary()
    assert len(words) == len(set(words)) == 5 + 5 + 6 + 3 + 8    # shapes, plurals, colours, counts, and 8:
    assert {"a", "an", "and", "of", "left", "right", "above", "below"} <= set(words)


def test_heldout_compositions_never_appear_in_train():
    for category, split in w.split_prompts().items():
        train = {w.composition(w.parse_prompt(p)) for p in split["train"]}
        heldout = {w.composition(w.parse_prompt(p)) for p in split["heldout"]}
        assert not train & heldout, category
        assert len(split["heldout"]) == 0 if category == "single" else 0.15 < len(heldout) / (
            len(heldout) + len(train)) < 0.25, category


def test_every_word_of_heldout_appears_in_train():
    for category, split in w.split_prompts().items():
        train_words = {word for p in split["train"] for word in p.split()}
        for p in split["heldout"]:
            assert set(p.split()) <= train_words, (category, p)


def test_split_is_deterministic():
    a = w.split_prompts()
    np.random.seed(123)
    assert w.split_prompts() == a
    counts = {c: (len(s["train"]), len(s["heldout"])) for c, s in a.items()}
    assert counts == {"single": (5, 0), "two_objects": (16, 4), "counting": (72, 18), "colours": (24, 6),
                      "position": (2304, 576), "colour_attribution": (480, 120)}


def test_scenes_are_seeded_and_fit_the_canvas():
    spec = w.parse_prompt("four blue crosses")
    a = [w.sample_scene(spec, np.random.default_rng(6)) for _ in range(2)]
    assert a[0] == a[1]
    for size in (32, 48, 64):
        for ob in w.hard_negative(spec, np.random.default_rng(7), "wrong_count") + a[0]:
            d, x0, y0 = w.pixel_box(ob, size)
            assert 0 <= x0 and x0 + d <= size and 0 <= y0 and y0 + d <= size


def test_save_examples_writes_a_png(tmp_path):
    path = w.save_examples(str(tmp_path / "examples.png"))
    from PIL import Image
    with Image.open(path) as im:
        assert im.size[0] > 6 * 128 and im.size[1] > 6 * 128
