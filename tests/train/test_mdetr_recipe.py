"""``python -m train mdetr`` for a few steps (its files and metric ranges), the grounding
scenes it trains on (boxes tight on the silhouettes, spans naming the target's words, no
held-out combination in training), its AP and bad flags refused by name."""

import json

import pytest
import torch

from models import mdetr
from models.family import check_batch
from train.__main__ import UsageError, main
from train.data import WordTokenizer
from train.data.grounding import sample_grounding
from train.loop import load_run
from train.recipes import mdetr as recipe

ARGS = ["--steps", "2", "--batch-size", "4", "--eval-phrases", "16"]


def test_recipe_writes_its_files_and_metrics_in_range(tmp_path):
    out = tmp_path / "run"
    main(["mdetr", "--out", str(out), *ARGS])
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "loss.png", "grounding.png", "tokenizer.json"} <= names
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("ap50", "top_box_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    counted = sum(metrics.get(f"phrases_{s}", 0) for s in recipe.SPLITS if s != "relation_twin")
    assert metrics["phrases"] == counted == 16
    assert metrics["goal"] == recipe.GOAL and metrics["goal_met"] == (metrics["ap50"] >= 0.7)
    assert load_run(out, family="mdetr").cfg.image_size == recipe.IMAGE


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--eval-phrases", "2"], "--eval-phrases"), (["--image-size", "16"], "--image-size")],
)
def test_bad_flags_are_refused_by_name_before_any_directory(tmp_path, flags, message):
    out = tmp_path / "never"
    with pytest.raises(UsageError) as caught:
        main(["mdetr", "--out", str(out), *ARGS, *flags])
    assert message in caught.value.message
    assert not out.exists()


def test_grounding_boxes_are_tight_on_lone_objects_and_spans_name_the_target():
    world = recipe.world()
    scenes = sample_grounding(world, 64, generator=torch.Generator().manual_seed(0))
    assert not scenes.holdout.any()  # training never shows a held-out combination
    assert (scenes.twin <= scenes.relation).all() and (scenes.objects[scenes.twin] == 3).all()
    n = world.image_size
    for i in (scenes.objects == 1).nonzero()[:, 0].tolist():
        ys, xs = (scenes.images[i].amax(0) > 0.45).nonzero().T.float()  # the object's pixels
        cx, cy, w, h = (scenes.boxes[i, 0] * n).tolist()
        assert abs(xs.min() - (cx - w / 2)) < 1.5 and abs(xs.max() + 1 - (cx + w / 2)) < 1.5
        assert abs(ys.min() - (cy - h / 2)) < 1.5 and abs(ys.max() + 1 - (cy + h / 2)) < 1.5
    for phrase, spans, k in zip(scenes.phrases, scenes.spans.tolist(), scenes.n_boxes.tolist()):
        words = phrase.split()
        for start, end in spans[:k]:
            colour, shape = words[start:end]
            assert colour in world.colors and shape in world.shapes
    held = sample_grounding(world, 256, generator=torch.Generator().manual_seed(1), split="eval")
    assert 0.35 < held.holdout.float().mean() < 0.65


def test_the_batch_fits_the_family_and_maps_spans_past_sot():
    world = recipe.world()
    tokenizer = WordTokenizer.for_world(world)
    cfg = recipe.model_config(tokenizer)
    scenes = sample_grounding(world, 6, generator=torch.Generator().manual_seed(2))
    batch = recipe.grounding_batch(scenes, tokenizer)
    check_batch(mdetr.batch_fields(cfg), batch, where="grounding_batch")
    for i, phrase in enumerate(scenes.phrases):
        named = batch["tokens"][i][batch["token_map"][i, 0]]
        assert named.tolist() == tokenizer.encode(" ".join(phrase.split()[1:3]), 4)[0, 1:3].tolist()
    assert (batch["token_map"].any(-1) == batch["box_valid"]).all()


def test_average_precision_ranks_every_box_and_counts_one_hit_per_phrase():
    ap = recipe.average_precision
    assert ap(torch.tensor([[0.9, 0.1]]), torch.tensor([[0.8, 0.0]])) == 1.0
    # Ranked: phrase 0's good box (hit, P=1), phrase 1's bad box, phrase 1's good box
    # (hit, P=2/3); a second good box of phrase 0 is a false positive after both.
    scores = torch.tensor([[0.9, 0.2], [0.5, 0.8]])
    iou = torch.tensor([[0.7, 0.9], [0.6, 0.1]])
    assert ap(scores, iou) == pytest.approx((1 + 2 / 3) / 2, abs=1e-4)
    assert ap(scores, torch.zeros(2, 2)) == 0.0
