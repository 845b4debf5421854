"""Evaluation on user data: recall@k and zero-shot on cases with known answers, every family
that serves embeddings, and ``python -m train evaluate``."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fmm
import models
from train import evaluate_data
from train.__main__ import cli, main
from train.data import WordTokenizer, WorldConfig, eval_set, sample_scenes
from train.data.formats import open_table
from train.evaluate_data import Embedder, retrieval, retrieval_recall, zero_shot

E = torch.eye(16)


def _known_case():
    """10 images (one-hot), 2 captions each; the hand-counted ranks are in the test."""
    n = lambda v: F.normalize(v, dim=-1)
    captions, owner = [], []
    for i in range(6):  # both captions exactly their image
        captions += [E[i], E[i]]
        owner += [i, i]
    captions += [n(E[6] + 2 * E[7]), E[6]]  # one caption nearer image 7: t2i rank 1
    captions += [n(E[7] + 2 * E[8])] * 2  # both nearer image 8; image 7 ranks c(6,0) first
    captions += [E[11], E[12]]  # image 8's captions match nothing: last everywhere
    captions += [E[9], E[13]]
    owner += [6, 6, 7, 7, 8, 8, 9, 9]
    return E[:10], torch.stack(captions), torch.tensor(owner)


# Image ranks of their best caption: 0 x 7, image 7: 1, image 8: 18 (every other caption
# ties or beats its 0). Caption ranks: 0 x 14, 1 x 3, 9 x 3.
KNOWN = {
    "image_to_text_r1": 0.8,
    "image_to_text_r5": 0.9,
    "image_to_text_r10": 0.9,
    "text_to_image_r1": 0.7,
    "text_to_image_r5": 0.85,
    "text_to_image_r10": 1.0,
    "images": 10,
    "captions": 20,
}


def test_recall_counts_an_image_found_when_any_of_its_captions_ranks_within_k():
    assert retrieval_recall(*_known_case()) == KNOWN


def test_recall_in_blocks_of_seven_scores_equals_one_block(monkeypatch):
    monkeypatch.setattr(evaluate_data, "BLOCK_ELEMENTS", 7)  # 1 row of 20 captions per block
    assert retrieval_recall(*_known_case()) == KNOWN


def test_ties_count_against_the_model_so_a_collapsed_one_scores_zero():
    _, _, owner = _known_case()
    same = torch.full((10, 4), 0.5)
    figures = retrieval_recall(same, torch.full((20, 4), 0.5), owner)
    assert figures["image_to_text_r10"] == 0.0 and figures["text_to_image_r5"] == 0.0


def test_recall_equals_a_brute_force_ranking_of_the_whole_matrix(monkeypatch):
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(23, 8, generator=g), dim=-1)
    owner = torch.cat([torch.arange(20), torch.randint(0, 20, (41,), generator=g)])
    owner = owner[torch.randperm(61, generator=g)]  # images 20-22 have no caption
    texts = F.normalize(images[owner] + 0.9 * torch.randn(61, 8, generator=g), dim=-1)
    sims = images @ texts.T
    order = sims.argsort(dim=1, descending=True)  # no ties in random floats
    first = [(owner[order[i]] == i).nonzero()[0].item() for i in range(20)]
    t2i = [(sims[:, j] > sims[owner[j], j]).sum().item() for j in range(61)]
    monkeypatch.setattr(evaluate_data, "BLOCK_ELEMENTS", 50)
    figures = retrieval_recall(images, texts, owner)
    for k in (1, 5, 10):
        assert figures[f"image_to_text_r{k}"] == round(sum(r < k for r in first) / 20, 4)
        assert figures[f"text_to_image_r{k}"] == round(sum(r < k for r in t2i) / 61, 4)


# --- through tables: a fake model that reads each image's index off its red channel --------


def _index_of(image) -> torch.Tensor:
    """The transform of the fake model: an image's red value is its index."""
    return torch.tensor([float(image.getpixel((0, 0))[0])])


def _fake(vectors: dict[str, torch.Tensor], image_vectors: torch.Tensor, seen: list) -> Embedder:
    def texts(batch):
        seen.extend(batch)
        return torch.stack([vectors[t] for t in batch])

    images = lambda x: image_vectors[x[:, 0].long()]
    return Embedder(_index_of, images, texts, torch.device("cpu"))


def _png(path, value: int, size=(5, 3)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 0, 0)).save(path)


@pytest.mark.parametrize("workers", [0, 1])
def test_retrieval_on_a_csv_with_a_row_per_caption_follows_the_coco_protocol(tmp_path, workers):
    images, captions, owner = _known_case()
    words = [f"caption {j}" for j in range(len(captions))]
    with open(tmp_path / "val.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["filepath", "title"])
        for j, i in enumerate(owner.tolist()):  # two rows name each image
            rows.writerow([f"images/{i}.png", words[j]])
    for i in range(10):
        _png(tmp_path / "images" / f"{i}.png", i)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    with open(tmp_path / "val.csv", "a", newline="") as f:
        csv.writer(f).writerow(["images/broken.png", "a caption of an unreadable image"])
    seen = []
    embedder = _fake(dict(zip(words, captions)), images, seen)
    figures = retrieval(open_table(tmp_path / "val.csv"), embedder, batch_size=3, workers=workers)
    assert {k: figures[k] for k in KNOWN} == KNOWN
    assert figures["skipped_images"] == 1 and "broken.png" in figures["skipped_examples"][0]
    assert sorted(seen) == sorted(words)  # every caption embedded once, not the broken one's


def _folder(root, classes: dict[str, list[int]]):
    for name, values in classes.items():
        for n, value in enumerate(values):
            _png(root / name / f"{n}.png", value)
    return root


def test_zero_shot_on_a_tiny_imagefolder_with_known_answers(tmp_path):
    # 6 classes; image values 0..5 are their class's vector; 6 is nearest class 1 (an image
    # of class 0 ranked second), 7 points away from class 2 (its class ranked last).
    names = ["red_circle", "blue_square", "green_ring", "cyan_bar", "pink_cross", "gray_dot"]
    image_vectors = torch.cat(
        [E[:6, :6], F.normalize(E[1, :6] + 0.5 * E[0, :6], dim=0)[None], (0.1 - E[2, :6])[None]]
    )
    root = _folder(tmp_path / "heldout", {n: [i] for i, n in enumerate(names)})
    _png(root / "red_circle" / "9.png", 6)
    _png(root / "green_ring" / "9.png", 7)
    readable = [n.replace("_", " ") for n in names]
    vectors = {
        template.format(name): E[c, :6]
        for c, name in enumerate(readable)
        for template in ("{}", "a photo of a {}.")
    }
    seen = []
    figures = zero_shot(
        open_table(root), _fake(vectors, image_vectors, seen), templates=("{}", "a photo of a {}.")
    )
    assert figures["zero_shot_top1"] == round(6 / 8, 4)
    assert figures["zero_shot_top5"] == round(7 / 8, 4)
    assert figures["zero_shot_per_class"] == {
        "blue square": 1.0, "cyan bar": 1.0, "gray dot": 1.0, "green ring": 0.5,
        "pink cross": 1.0, "red circle": 0.5,
    }  # fmt: skip
    assert figures["zero_shot_classes"] == 6 and figures["zero_shot_images"] == 8
    assert sorted(seen) == sorted(vectors)  # every prompt once, names with spaces


def test_zero_shot_ensemble_is_the_renormalised_mean_of_its_prompts(tmp_path):
    # Class "a": its two prompts embed at e0 and e1; the image at (e0 + e1)/sqrt(2) is class a
    # only through the ensemble's mean (class "b", at e0 + e1/2 + e2/2 with both prompts,
    # is nearer it than e0 alone).
    root = _folder(tmp_path / "two", {"a": [0], "b": [1]})
    image_vectors = torch.stack([F.normalize(E[0] + E[1], dim=0), E[2]])
    b = F.normalize(E[0] + 0.5 * E[1] + 0.5 * E[2], dim=0)
    vectors = {"a": E[0], "x a": E[1], "b": b, "x b": b}
    figures = zero_shot(
        open_table(root), _fake(vectors, image_vectors, []), templates=("{}", "x {}")
    )
    assert figures["zero_shot_per_class"] == {"a": 1.0, "b": 1.0}
    alone = zero_shot(open_table(root), _fake(vectors, image_vectors, []), templates=("{}",))
    assert alone["zero_shot_per_class"] == {"a": 0.0, "b": 1.0}


def test_the_default_prompts_follow_where_the_text_tower_learned_its_words():
    from train.data.tokenizers import BPETokenizer, CLIPRunTokenizer

    world = WordTokenizer.for_world(WorldConfig())
    bpe = BPETokenizer.train(["a red circle", "a blue square"], vocab_size=300)
    assert evaluate_data.default_templates(world) == ("{}",)
    assert evaluate_data.default_templates(bpe) == ("{}",)
    clip_bpe = CLIPRunTokenizer.__new__(CLIPRunTokenizer)  # the type decides; no vocab file read
    assert evaluate_data.default_templates(clip_bpe) == evaluate_data.CLIP_TEMPLATES
    assert len(evaluate_data.CLIP_TEMPLATES) == 8


TWO_TOWERS = sorted(
    f.name for f in models.FAMILIES if f.serving and f.serving.embed_image and f.serving.embed_text
)


def test_the_families_with_two_towers_are_clip_flava_albef_coca():
    assert TWO_TOWERS == ["albef", "clip", "coca", "flava"]


@pytest.mark.parametrize("name", TWO_TOWERS)
def test_every_family_that_serves_embeddings_is_evaluated_through_its_hook(name, tmp_path):
    family = models.get_family(name)
    cfg = f"{name}_tiny"
    tokenizer = WordTokenizer.for_world(WorldConfig())
    cfg = family.presets[cfg]()
    params = family.init(cfg, fmm.random.key(0))
    size = family.serving.image_shape(cfg)[-1]
    from functools import partial

    from train.data.images import eval_transform

    transform = partial(eval_transform, size=size, mean=(0.5,) * 3, std=(0.25,) * 3)
    embedder = evaluate_data.embedder_for(family, params, cfg, tokenizer, transform=transform)
    root = _folder(tmp_path / "shots", {"red_circle": [10, 20], "blue_bar": [30]})
    figures = zero_shot(open_table(root), embedder, templates=("a {}",))
    assert figures["zero_shot_images"] == 3 and 0 <= figures["zero_shot_top1"] <= 1


# --- the command ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--run", "R"], "nothing to evaluate"),
        (["--run", "R", "--weights", "pyproject.toml"], "not allowed with argument"),
        (["--zeroshot-data", "D"], "one of the arguments --run --weights is required"),
        (["--run", "R", "--zeroshot-data", "D", "--template", "{0}"], "--template"),
        (["--run", "R", "--zeroshot-data", "D", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_flags_get_one_line_and_status_2(argv, says, capsys):
    try:
        status = cli(["evaluate", *argv])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and says in err and len(err.splitlines()) == 1


def test_a_missing_table_is_one_line_naming_the_flag(tmp_path, capsys):
    status = cli(["evaluate", "--run", str(tmp_path), "--val-data", str(tmp_path / "none.csv")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "--val-data" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """A trained-for-4-steps clip run, a val.csv of scenes and an ImageFolder of classes."""
    root = tmp_path_factory.mktemp("eval")
    main(["clip", "--out", str(root / "run"), "--steps", "4", "--batch-size", "8",
          "--eval-per-class", "1"])  # fmt: skip
    world = WorldConfig()
    scenes = sample_scenes(world, 12, generator=torch.Generator().manual_seed(5), split="eval")
    with open(root / "val.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["filepath", "title"])
        for i, caption in enumerate(scenes.captions):
            _save(scenes.images[i], root / "val" / f"{i}.png")
            rows.writerow([f"val/{i}.png", caption])
    images, labels = eval_set(world, 1, seed=3)
    names = [f"{c}_{s}" for c in world.colors for s in world.shapes]
    for i, label in enumerate(labels.tolist()):
        _save(images[i], root / "heldout" / names[label] / f"{i}.png")
    return root


def _save(pixels: torch.Tensor, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)


def test_evaluate_a_run_writes_the_figures_and_the_plot(shapes_data, capsys):
    root = shapes_data
    main(["evaluate", "--run", str(root / "run"), "--val-data", str(root / "val.csv"),
          "--zeroshot-data", str(root / "heldout"), "--workers", "0"])  # fmt: skip
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    figures = json.loads((root / "run" / "eval.json").read_text())
    assert set(figures["retrieval"]) == {*KNOWN}
    assert figures["retrieval"]["images"] == 12 and figures["retrieval"]["captions"] == 12
    assert figures["zero_shot_classes"] == 48 and len(figures["zero_shot_per_class"]) == 48
    assert 0 <= figures["zero_shot_top1"] <= figures["zero_shot_top5"] <= 1
    assert printed["zero_shot_top1"] == figures["zero_shot_top1"]
    assert printed["image_to_text_r1"] == figures["retrieval"]["image_to_text_r1"]
    assert (root / "run" / "eval_zero_shot.png").read_bytes()[:4] == b"\x89PNG"


def test_clip_training_evaluates_on_user_data_every_n_steps_and_at_the_end(shapes_data, tmp_path):
    root, out = shapes_data, tmp_path / "run"
    main(["clip", "--out", str(out), "--steps", "4", "--batch-size", "8", "--eval-every", "2",
          "--val-data", str(root / "val.csv"), "--zeroshot-data", str(root / "heldout"),
          "--workers", "0", "--template", "a {}"])  # fmt: skip
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "zero_shot_top1" in r] == [2, 4]
    assert all("image_to_text_r1" in r for r in lines if r["step"] in (2, 4))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["zero_shot_top1"] == lines[-1]["zero_shot_top1"]  # the same params
    assert metrics["retrieval"]["text_to_image_r5"] == lines[-1]["text_to_image_r5"]
    assert metrics["zero_shot_templates"] == ["a {}"] and "eval_images" not in metrics
    assert "zero_shot_top1_unseen_combos" not in metrics  # the user's zero-shot replaced it
    # and `evaluate --run` on the saved run gives the same figures
    main(["evaluate", "--run", str(out), "--zeroshot-data", str(root / "heldout"),
          "--template", "a {}", "--workers", "0"])  # fmt: skip
    alone = json.loads((out / "eval.json").read_text())
    assert alone["zero_shot_per_class"] == metrics["zero_shot_per_class"]


def test_the_last_eval_step_ending_a_run_keeps_mean_last_50_steps(shapes_data, tmp_path):
    main(["clip", "--out", str(tmp_path / "r"), "--steps", "3", "--batch-size", "8",
          "--eval-every", "3", "--val-data", str(shapes_data / "val.csv"), "--workers", "0",
          "--eval-per-class", "1"])  # fmt: skip
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    tail = metrics["mean_last_50_steps"]
    assert tail["image_to_text_r1"] == metrics["retrieval"]["image_to_text_r1"]  # one line has it
    assert "zero_shot_top1_unseen_combos" in metrics  # the built-in zero-shot stays


def test_evaluate_converted_weights_equals_the_same_model_evaluated_directly(shapes_data, tmp_path):
    from functools import partial
    from pathlib import Path

    from tests.reference import reference
    from train.data.images import eval_transform
    from train.finetune import load_for_eval

    transformers = reference("transformers")
    vocab = Path(reference("open_clip").__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    hf = transformers.CLIPConfig(
        text_config=dict(**sizes, max_position_embeddings=16, vocab_size=49408),
        vision_config=dict(**sizes, image_size=32, patch_size=8),
        projection_dim=16,
    )
    transformers.CLIPModel(hf).save_pretrained(tmp_path / "tiny")
    out = tmp_path / "tiny.json"
    main(["evaluate", "--weights", str(tmp_path / "tiny"), "--format", "hf", "--vocab",
          str(vocab), "--zeroshot-data", str(shapes_data / "heldout"), "--val-data",
          str(shapes_data / "val.csv"), "--out", str(out), "--workers", "0"])  # fmt: skip
    figures = json.loads(out.read_text())
    family, cfg, params, tokenizer, settings = load_for_eval(tmp_path / "tiny", "hf", vocab)
    transform = partial(eval_transform, **settings)
    embedder = evaluate_data.embedder_for(family, params, cfg, tokenizer, transform=transform)
    direct = zero_shot(open_table(shapes_data / "heldout"), embedder)
    assert figures["zero_shot_per_class"] == direct["zero_shot_per_class"]
    assert figures["retrieval"]["images"] == 12
    assert (tmp_path / "tiny_zero_shot.png").is_file()


@pytest.mark.parametrize("recipe", ["flava", "albef"])
def test_flava_and_albef_take_val_and_zeroshot_data(recipe, shapes_data, tmp_path):
    main([recipe, "--out", str(tmp_path / "r"), "--steps", "2", "--batch-size", "4",
          "--eval-per-class", "1", "--val-data", str(shapes_data / "val.csv"), "--zeroshot-data",
          str(shapes_data / "heldout"), "--workers", "0"])  # fmt: skip
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["retrieval"]["captions"] == 12 and metrics["zero_shot_classes"] == 48
