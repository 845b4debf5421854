"""Laws of the built-in shapes world and its word tokenizer."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from train.data import (
    COLOR_RGB,
    Scenes,
    WordTokenizer,
    WorldConfig,
    class_names,
    eval_set,
    is_holdout,
    prompt_templates,
    sample_scenes,
    scene_stream,
    vocabulary,
)
from train.data import shapes as shapes_module

CFG = WorldConfig()


def _scenes(batch: int, seed: int, split: str = "train", cfg: WorldConfig = CFG) -> Scenes:
    return sample_scenes(cfg, batch, generator=torch.Generator().manual_seed(seed), split=split)


def _caption_grammar(cfg: WorldConfig) -> re.Pattern:
    colour_shape = rf"({'|'.join(cfg.colors)}) ({'|'.join(cfg.shapes)})"
    where = r"in the center|on the (?:left|right)|at the (?:top|bottom)(?: left| right)?"
    # A single object's size and position may be left out; a pair is always described fully.
    return re.compile(
        rf"^(?:a|there is a|an image of a) (?:(small|large) )?{colour_shape}"
        rf"(?: (?P<where>{where})| (?P<rel>above|below|left of|right of) a (small|large) {colour_shape})?$"
    )


def _labels(cfg: WorldConfig, colors: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    return colors * len(cfg.shapes) + shapes


# --- determinism and shapes ---


def test_same_seed_gives_identical_images_and_captions():
    a, b = _scenes(33, seed=7), _scenes(33, seed=7)
    assert torch.equal(a.images, b.images)
    assert a.captions == b.captions
    assert torch.equal(a.colors, b.colors) and torch.equal(a.shapes, b.shapes)


def test_different_seeds_give_different_scenes():
    a, b = _scenes(33, seed=7), _scenes(33, seed=8)
    assert not torch.equal(a.images, b.images)
    assert a.captions != b.captions


@given(
    batch=st.integers(1, 9),
    image_size=st.sampled_from([16, 21, 32]),
    split=st.sampled_from(["train", "eval"]),
)
def test_outputs_have_documented_shapes_dtypes_and_range(batch, image_size, split):
    cfg = WorldConfig(image_size=image_size)
    scenes = _scenes(batch, seed=batch, split=split, cfg=cfg)
    assert scenes.images.shape == (batch, 3, image_size, image_size)
    assert scenes.images.dtype == torch.float32
    assert scenes.images.min() >= 0 and scenes.images.max() <= 1
    assert scenes.colors.shape == scenes.shapes.shape == (batch,)
    assert scenes.colors.dtype == scenes.shapes.dtype == torch.int64
    assert len(scenes.captions) == batch


def test_scene_stream_is_deterministic_and_advances():
    first, second = (next(scene_stream(CFG, 8, seed=3)) for _ in range(2))
    assert first.captions == second.captions and torch.equal(first.images, second.images)
    stream = scene_stream(CFG, 8, seed=3)
    batches = [next(stream) for _ in range(2)]
    assert not torch.equal(batches[0].images, batches[1].images)


def test_rendering_is_vectorised_one_sdf_call_per_shape_and_layer(monkeypatch):
    calls = []
    counted = {
        name: (lambda u, v, f=f, name=name: calls.append(name) or f(u, v))
        for name, f in shapes_module._SHAPE_SDF.items()
    }
    monkeypatch.setattr(shapes_module, "_SHAPE_SDF", counted)
    _scenes(512, seed=0)
    # Two layers (second object, main object), each evaluates every shape at most once.
    assert len(calls) <= 2 * len(CFG.shapes)


# --- captions and held-out combinations ---


def test_train_split_never_renders_holdout_combinations_and_captions_agree():
    scenes = _scenes(600, seed=1)
    assert not is_holdout(CFG, _labels(CFG, scenes.colors, scenes.shapes)).any()
    grammar = _caption_grammar(CFG)
    holdout = set(CFG.holdout)
    n_two = 0
    for caption, color, shape in zip(scenes.captions, scenes.colors, scenes.shapes):
        match = grammar.match(caption)
        assert match, caption
        groups = match.groups()
        assert groups[1] == CFG.colors[color] and groups[2] == CFG.shapes[shape], caption
        if match["rel"]:
            n_two += 1
            assert (groups[6], groups[7]) not in holdout, caption
    assert 0.2 < n_two / len(scenes.captions) < 0.4  # p_two_objects = 0.3


def test_eval_split_is_single_object_and_covers_every_combination():
    scenes = _scenes(2000, seed=2, split="eval")
    labels = _labels(CFG, scenes.colors, scenes.shapes)
    assert set(labels.tolist()) == set(range(len(class_names(CFG))))
    grammar = _caption_grammar(CFG)
    for caption in scenes.captions:
        match = grammar.match(caption)
        assert match and not match["rel"], caption


def test_captions_use_every_position_phrase_and_relation():
    scenes = _scenes(1000, seed=4)
    grammar = _caption_grammar(CFG)
    matches = [grammar.match(c) for c in scenes.captions]
    corners = {f"at the {v}{h}" for v in ("top", "bottom") for h in ("", " left", " right")}
    expected = {"in the center", "on the left", "on the right"} | corners
    assert {m["where"] for m in matches if m["where"]} == expected
    assert {m["rel"] for m in matches if m["rel"]} == {"above", "below", "left of", "right of"}


def test_p_two_objects_zero_gives_single_object_scenes():
    scenes = _scenes(100, seed=5, cfg=WorldConfig(p_two_objects=0.0))
    assert not any(_caption_grammar(CFG).match(c)["rel"] for c in scenes.captions)


def test_short_captions_drop_position_and_size_at_the_configured_rates():
    full = _scenes(
        200, seed=6, cfg=WorldConfig(p_two_objects=0.0, p_no_position=0.0, p_no_size=0.0)
    )
    assert all(
        _caption_grammar(CFG).match(c)["where"] and _caption_grammar(CFG).match(c)[1]
        for c in full.captions
    )
    bare = _scenes(
        200, seed=6, cfg=WorldConfig(p_two_objects=0.0, p_no_position=1.0, p_no_size=1.0)
    )
    assert all(
        c.split()[-2:] == [CFG.colors[k], CFG.shapes[s]]
        for c, k, s in zip(bare.captions, bare.colors, bare.shapes)
    )
    mixed = [
        _caption_grammar(CFG).match(c)
        for c in _scenes(1000, seed=6, cfg=WorldConfig(p_two_objects=0.0)).captions
    ]
    assert 0.4 < sum(m["where"] is None for m in mixed) / 1000 < 0.6  # p_no_position = 0.5
    assert 0.2 < sum(m[1] is None for m in mixed) / 1000 < 0.4  # p_no_size = 0.3


def test_class_names_are_in_label_order_and_holdout_mask_matches_config():
    names = class_names(CFG)
    assert names[:2] == ["red circle", "red square"]
    assert len(names) == len(CFG.colors) * len(CFG.shapes)
    mask = is_holdout(CFG, torch.arange(len(names)))
    assert sorted(n for n, m in zip(names, mask) if m) == sorted(f"{c} {s}" for c, s in CFG.holdout)


# --- eval set and informative rendering ---


def test_eval_set_covers_every_class_exactly_n_per_class_times_deterministically():
    images, labels = eval_set(CFG, 3, seed=0)
    n_classes = len(class_names(CFG))
    assert images.shape == (3 * n_classes, 3, 32, 32) and labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels, minlength=n_classes), torch.full((n_classes,), 3))
    again, _ = eval_set(CFG, 3, seed=0)
    other, _ = eval_set(CFG, 3, seed=1)
    assert torch.equal(images, again) and not torch.equal(images, other)


def test_objects_stay_inside_the_canvas():
    images, _ = eval_set(CFG, 4, seed=0)
    border = images.clone()
    border[..., 1:-1, 1:-1] = 0
    assert border.max() < 0.2  # background stays below 0.15 + noise 0.04


def test_object_pixels_have_the_colour_of_their_label():
    images, labels = eval_set(CFG, 2, seed=0)
    palette = torch.tensor([COLOR_RGB[c] for c in CFG.colors])
    for image, label in zip(images, labels):
        # The brightest pixels are the object's interior; its anti-aliased rim is darker.
        brightness = image.amax(0)
        colour = image[:, brightness > brightness.max() - 0.1].median(dim=1).values
        expected = palette[label // len(CFG.shapes)]
        assert (colour - expected).abs().max() < 0.08, (class_names(CFG)[label], colour)


def test_different_shapes_at_the_same_place_give_different_masks():
    n = len(CFG.shapes)
    # Radii span the smallest two-object size to the largest single one; the offsets move
    # the centre across one pixel, since rasterisation can make small silhouettes alike.
    for radius in (0.125, 0.17, 0.2, 0.29):
        for offset in (0.0, 0.3, 0.6):
            centre = torch.full((n,), 0.5 + offset / CFG.image_size)
            alpha = shapes_module._shape_alpha(
                CFG, torch.arange(n), centre, centre, torch.full((n,), radius)
            )
            assert alpha.flatten(1).sum(1).min() > 15  # every silhouette is many pixels
            for i in range(n):
                for j in range(i + 1, n):
                    iou = (
                        torch.minimum(alpha[i], alpha[j]).sum()
                        / torch.maximum(alpha[i], alpha[j]).sum()
                    )
                    assert iou < 0.82, (CFG.shapes[i], CFG.shapes[j], radius, float(iou))


def test_position_words_agree_with_where_the_object_is():
    scenes = _scenes(300, seed=6, split="eval")
    grid = (torch.arange(32) + 0.5) / 32
    for image, caption in zip(scenes.images, scenes.captions):
        weight = (image.amax(0) > 0.6).float()
        x = (weight.sum(0) * grid).sum() / weight.sum()
        y = (weight.sum(1) * grid).sum() / weight.sum()
        words = set(caption.split()[-2:])
        assert ("left" not in words or x < 0.45) and ("right" not in words or x > 0.55), caption
        assert ("top" not in words or y < 0.45) and ("bottom" not in words or y > 0.55), caption
        if caption.endswith("in the center"):
            assert (x - 0.5).abs() < 0.1 and (y - 0.5).abs() < 0.1, caption


def test_relation_words_agree_with_where_the_two_objects_are():
    scenes = _scenes(300, seed=8, cfg=WorldConfig(p_two_objects=1.0))
    palette = torch.tensor([COLOR_RGB[c] for c in CFG.colors])
    grid = (torch.arange(32) + 0.5) / 32
    grammar, checked = _caption_grammar(CFG), 0
    for image, caption in zip(scenes.images, scenes.captions):
        match = grammar.match(caption)
        first, second = CFG.colors.index(match.group(2)), CFG.colors.index(match.group(7))
        if first == second:
            continue
        # Each pixel goes to its nearest palette colour; faint and blended pixels are dropped.
        pixels = image.flatten(1).T
        distance, nearest = torch.cdist(pixels, palette).min(dim=1)
        solid = (distance < 0.15) & (pixels.amax(1) > 0.6)
        centres = []
        for color in (first, second):
            weight = (solid & (nearest == color)).float().reshape(32, 32)
            weight = weight / weight.sum()
            centres.append(((weight.sum(0) * grid).sum(), (weight.sum(1) * grid).sum()))
        (x1, y1), (x2, y2) = centres
        expected = {"left of": x1 < x2, "right of": x1 > x2, "above": y1 < y2, "below": y1 > y2}
        assert expected[match["rel"]], caption
        checked += 1
    assert checked > 200


# --- vocabulary and templates ---


def test_vocabulary_is_sorted_deterministic_and_covers_templates():
    words = vocabulary(CFG)
    assert words == sorted(set(words)) == vocabulary(WorldConfig())
    for template in prompt_templates():
        assert template.count("{}") == 1
        for name in class_names(CFG):
            assert set(template.format(name).split()) <= set(words)


def test_custom_world_renders_and_its_vocabulary_covers_captions():
    cfg = WorldConfig(colors=("pink", "gray"), shapes=("ring", "bar"), holdout=(("pink", "bar"),))
    scenes = _scenes(50, seed=0, cfg=cfg)
    assert all(set(c.split()) <= set(vocabulary(cfg)) for c in scenes.captions)
    assert not is_holdout(cfg, _labels(cfg, scenes.colors, scenes.shapes)).any()


# --- bad inputs ---


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_size": 8}, "image_size"),
        ({"colors": ("red", "mauve")}, "colors"),
        ({"colors": ("red", "red")}, "colors"),
        ({"shapes": ("circle", "hexagon")}, "shapes"),
        ({"holdout": (("green", "hexagon"),)}, "holdout"),
        ({"holdout": (("white", "circle"),), "colors": ("red",)}, "holdout"),
        ({"p_two_objects": 1.5}, "p_two_objects"),
    ],
)
def test_world_config_rejects_bad_fields_naming_them(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WorldConfig(**kwargs)


def test_sampling_rejects_bad_arguments_naming_them():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="split"):
        sample_scenes(CFG, 4, generator=g, split="test")
    with pytest.raises(ValueError, match="batch_size"):
        sample_scenes(CFG, 0, generator=g)
    with pytest.raises(TypeError, match="generator"):
        sample_scenes(CFG, 4, generator=0)
    with pytest.raises(ValueError, match="n_per_class"):
        eval_set(CFG, 0, seed=0)
    with pytest.raises(ValueError, match="labels"):
        is_holdout(CFG, torch.tensor([48]))


# --- tokenizer ---

TOK = WordTokenizer.for_world(CFG)


def test_tokenizer_id_layout_follows_clip():
    assert (TOK.pad_id, TOK.unk_id, TOK.sot_id) == (0, 1, 2)
    assert TOK.vocab_size == len(vocabulary(CFG)) + 4
    assert TOK.eot_id == TOK.vocab_size - 1


def test_captions_and_templates_round_trip_without_unknown_words():
    captions = _scenes(400, seed=9).captions + _scenes(100, seed=9, split="eval").captions
    captions += [t.format(name) for t in prompt_templates() for name in class_names(CFG)]
    tokens = TOK.encode(captions, 24)
    assert not (tokens == TOK.unk_id).any()
    assert TOK.decode(tokens) == captions


def test_encode_layout_sot_words_eot_then_pad_and_eot_is_argmax():
    tokens = TOK.encode(["a red circle", "there is a small blue square on the left"], 16)
    assert tokens.shape == (2, 16) and tokens.dtype == torch.int64
    lengths = torch.tensor([3, 9]) + 2
    assert torch.equal(tokens.argmax(-1), lengths - 1)
    assert (tokens[:, 0] == TOK.sot_id).all()
    positions = torch.arange(16)
    assert ((tokens == 0) == (positions >= lengths[:, None])).all()


@given(context_length=st.integers(2, 14), n_words=st.integers(0, 14))
def test_truncation_keeps_eot_as_last_non_pad_token(context_length, n_words):
    words = (vocabulary(CFG) * 2)[:n_words]
    row = TOK.encode(" ".join(words), context_length)[0]
    length = min(n_words + 2, context_length)
    assert row[length - 1] == TOK.eot_id == row.max()
    assert (row[length:] == TOK.pad_id).all()
    assert TOK.decode(row) == [" ".join(words[: length - 2])]


def test_encode_normalises_case_and_punctuation_and_marks_unknown_words():
    assert torch.equal(TOK.encode("A Red, circle!", 8), TOK.encode("a red circle", 8))
    tokens = TOK.encode("a mauve circle", 8)
    assert tokens[0, 2] == TOK.unk_id
    assert TOK.decode(tokens) == ["a <unk> circle"]


def test_json_round_trip_rebuilds_an_identical_tokenizer():
    again = WordTokenizer.from_json(TOK.to_json())
    assert again == TOK and again.vocab_size == TOK.vocab_size
    caption = "an image of a large cyan bar at the top"
    assert torch.equal(again.encode(caption, 12), TOK.encode(caption, 12))


def test_tokenizer_rejects_bad_inputs_naming_the_argument():
    with pytest.raises(ValueError, match="context_length"):
        TOK.encode("a red circle", 1)
    with pytest.raises(TypeError, match="texts"):
        TOK.encode(["a red circle", 3], 8)
    with pytest.raises(ValueError, match="words"):
        WordTokenizer(["red", "blue", "red"])
    with pytest.raises(ValueError, match="words"):
        WordTokenizer(["Red"])
    with pytest.raises(TypeError, match="words"):
        WordTokenizer(["red", 3])
    with pytest.raises(ValueError, match="ids"):
        TOK.decode(torch.tensor([[2, TOK.vocab_size]]))
    with pytest.raises(ValueError, match="s is not"):
        WordTokenizer.from_json('{"words": ["red"]}')
