"""`python -m train albef`: questions and answers, the batches the ALBEF family reads, a few
steps of each task end to end (files written, metrics in range, the run and its momentum
encoders and queues reload)."""

import json
from dataclasses import replace

import pytest
import torch

from models import albef
from models.family import check_batch
from train.__main__ import main
from train.data import WorldConfig, sample_scenes
from train.loop import load_run
from train.recipes import albef as recipe

WORLD = WorldConfig()


def test_questions_have_the_answer_of_the_scene():
    colors, shapes = torch.tensor([0, 5, 2]), torch.tensor([0, 3, 4])
    kinds, other = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1])
    questions, answers = recipe.make_questions(WORLD, colors, shapes, kinds, other)
    names = recipe.answer_names(WORLD)
    assert questions == [
        "what colour is the circle?",
        "what shape is the blue object?",
        "is the cross orange?",
    ]
    assert [names[a] for a in answers] == ["red", "diamond", "no"]
    tok = recipe.tokenizer_for(WORLD)
    assert tok.unk_id not in tok.encode(questions, recipe.CONTEXT)  # every word is known


def test_retrieval_captions_name_exactly_the_object_of_their_id():
    # Partial matches (a two-object image against one of its objects' captions) would be
    # ITM negatives; one-object scenes with ids by class leave none.
    tok = recipe.tokenizer_for(WORLD)
    batch = recipe.retrieval_batch(WORLD, tok, torch.Generator().manual_seed(0), 32)
    scenes = sample_scenes(
        replace(WORLD, p_two_objects=0.0), 32, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(batch["tokens"], tok.encode(scenes.captions, recipe.CONTEXT))
    n_shapes = len(WORLD.shapes)
    for caption, i in zip(scenes.captions, batch["idx"].tolist()):
        words = caption.split()
        assert [w for w in words if w in WORLD.shapes] == [WORLD.shapes[i % n_shapes]], caption
        assert WORLD.colors[i // n_shapes] in words, caption


def test_both_tasks_draw_the_batches_the_family_reads():
    tok = recipe.tokenizer_for(WORLD)
    for task, draw in (("pretrain", recipe.retrieval_batch), ("vqa", recipe.vqa_batch)):
        cfg = albef.albef_tiny(vocab_size=tok.vocab_size, max_positions=recipe.CONTEXT,
                               num_answers=len(recipe.answer_names(WORLD)))  # fmt: skip
        batch = draw(WORLD, tok, torch.Generator().manual_seed(0), 8)
        check_batch(albef.FAMILY.batch(cfg, task=task), batch, where=task)


@pytest.mark.parametrize("task", recipe.TASKS)
def test_a_few_steps_of_each_task_run_end_to_end(tmp_path, task, capsys):
    out = tmp_path / task
    args = ["albef", "--task", task, "--steps", "3", "--batch-size", "8", "--eval-per-class", "1"]
    assert main([*args, "--out", str(out), "--rerank-k", "2"]) == 0
    for name in ("metrics.json", "loss.png", "params.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    headline = metrics["vqa_accuracy" if task == "vqa" else "image_to_text_r1"]
    assert 0.0 <= headline <= 1.0 and metrics["goal"] == 0.8
    if task == "retrieval":  # k is judged on other images than the reported ones
        by_k = metrics["eval_validation_r1_by_k"]
        assert sorted(map(int, by_k)) == list(recipe.VALIDATION_KS)
        assert all(0.0 <= r <= 1.0 for r in by_k.values())
    run = load_run(out, family="albef")
    assert (run.cfg.num_answers > 0) == (task == "vqa") == ("vqa_head" in run.params)
    assert run.tokenizer == recipe.tokenizer_for(WORLD)
    # the momentum encoders and queues are saved with the params, at the step the run ended
    assert int(run.model_state["step"]) == 3 and set(run.model_state["momentum"]) == set(
        albef.MOMENTUM_PARTS
    )
    assert "wrote" in capsys.readouterr().out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="--batch-size must be >= 2"):
        main(["albef", "--steps", "2", "--batch-size", "1"])
