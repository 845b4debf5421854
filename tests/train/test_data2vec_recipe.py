"""``python -m train data2vec`` for a few steps per modality: its probe figures, the teacher
it carries as the loop's model state, and the caption probe set the text probe reads."""

import json

import pytest
import torch

import fmm
from models import data2vec
from models.family import check_batch
from train.__main__ import main
from train.loop import load_run
from train.loop.engine import base_keys
from train.recipes._ssl import CONTEXT, data_for, probe_set, training_batch
from train.recipes.data2vec import config_for, features

ARGS = ["--steps", "3", "--batch-size", "4", "--probe-per-class", "2", "--probe-steps", "20"]
ARGS += ["--sound-pool", "8", "--seed", "1"]
FORM = {"image": "shape", "audio": "timbre", "text": "shape"}


@pytest.fixture(scope="module", params=["image", "text", "audio"])
def run_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"data2vec_{request.param}")
    main(["data2vec", "--modality", request.param, "--out", str(out), *ARGS])
    return request.param, out


def test_recipe_writes_the_probe_figures(run_dir):
    modality, out = run_dir
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "loss.png", "probes.png", "model_state.safetensors"} <= names
    metrics = json.loads((out / "metrics.json").read_text())
    form = FORM[modality]
    assert metrics["probe_accuracy"] == metrics[f"probe_{form}_heldout"]
    gain = 100 * (metrics["probe_accuracy"] - metrics["probe_accuracy_random_init"])
    assert metrics["probe_gain_points"] == pytest.approx(gain, abs=0.02)
    for split in ("heldout", "iid", "pretrain_heldout"):
        for suffix in ("", "_random_init"):
            assert 0.0 <= metrics[f"probe_{form}_{split}{suffix}"] <= 1.0
    assert metrics["heldout_regression"] > 0
    assert 0 < metrics["teacher_student_distance"] < 1
    assert metrics["probe_examples"]["fit"] > 0 and metrics["probe_examples"]["test"] > 0


def test_the_teacher_is_an_ema_that_moved_from_the_init_and_lags_the_student(run_dir):
    modality, out = run_dir
    run = load_run(out, family="data2vec")
    assert run.cfg.modality == modality and int(run.model_state["step"]) == 3
    init = data2vec.init(run.cfg, base_keys(1)["init"])
    teacher = run.model_state["teacher"]
    for name in ("transformer", "pos"):
        t, s, s0 = (flat(p[name]) for p in (teacher, run.params, init))
        assert not torch.equal(t, s0) and not torch.equal(t, s)
        # An EMA of the student's path: between its init and where the student is now.
        assert (t - s0).norm() < (s - s0).norm()


def flat(tree) -> torch.Tensor:
    leaves = fmm.tree.flatten(tree)
    return torch.cat([leaves[k].flatten() for k in sorted(leaves)])


def test_caption_probe_labels_the_first_named_of_two_objects():
    data = data_for("text")
    tokens, attributes, unseen = probe_set(data, 2, seed=0)
    (shape, shapes), (color, colors) = attributes["shape"], attributes["color"]
    assert tokens.shape == (len(shape), CONTEXT) and (shapes, colors) == (6, 8)
    assert unseen.any() and not unseen.all()
    words = data.tokenizer.words
    for row in range(5):
        named = [words[i - 3] for i in tokens[row].tolist() if i >= 3 and i < len(words) + 3]
        colours = [w for w in named if w in data.world.colors]
        kinds = [w for w in named if w in data.world.shapes]
        assert len(colours) == len(kinds) == 2  # two objects, first-named first
        assert (colours[0], kinds[0]) == (
            data.world.colors[color[row]],
            data.world.shapes[shape[row]],
        )


def test_text_batches_fit_the_family():
    data = data_for("text")
    cfg = config_for(data)
    batch = training_batch(data, None, torch.Generator().manual_seed(0), 3)
    check_batch(data2vec.batch_fields(cfg), batch, where="training_batch")
    assert batch["valid"].sum(1).min() >= 4  # <sot>, at least "a <colour> <shape>", <eot>


def test_layer_features_stack_every_block_and_text_has_no_class_token(tmp_path):
    data = data_for("audio")
    cfg = config_for(data)
    params = data2vec.init(cfg, base_keys(0)["init"])
    x = torch.randn(3, *cfg.input_shape)
    layers = features(params, cfg, x, torch.device("cpu"), kind="layers")
    assert layers.shape == (3, cfg.layers * cfg.width)
    mean = features(params, cfg, x, torch.device("cpu"))
    assert torch.allclose(mean, data2vec.features(params, x, cfg=cfg))
    with pytest.raises(ValueError, match="--probe-features cls"):
        main(["data2vec", "--modality", "text", "--probe-features", "cls", "--out", str(tmp_path)])
