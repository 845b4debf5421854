"""``python -m train zeroshot`` against open_clip's own pipeline on the same weights."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from fmm.convert import ConversionError
from tests.models.test_clip_convert import randomize_
from tests.reference import reference
from train.__main__ import main
from train.data.transforms import clip_preprocess
from train.recipes import zeroshot

LABELS = ["a dog", "a cat", "a red car", "two birds on a wire"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    oc = reference("open_clip")
    root = tmp_path_factory.mktemp("zeroshot")
    ref = oc.model.CLIP(
        64,
        dict(image_size=32, layers=1, width=128, patch_size=8),
        dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=1),
        quick_gelu=True,
    )
    randomize_(ref, seed=7)
    torch.save(ref.state_dict(), root / "weights.pt")
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(40, 60), (64, 32), (32, 32)]):
        path = root / f"image{i}.png"
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    vocab = oc.tokenizer.default_bpe()
    return oc, ref, root, paths, vocab


def test_probabilities_equal_open_clip_pipeline(setup, capsys):
    oc, ref, root, paths, vocab = setup
    argv = ["zeroshot", "--weights", str(root / "weights.pt"), "--format", "open_clip",
            "--vocab", vocab, "--labels", ",".join(LABELS), "--template", "a photo of {}.",
            *map(str, paths)]  # fmt: skip
    parser = argparse.ArgumentParser()
    zeroshot.add_arguments(parser)
    result = zeroshot.run(parser.parse_args(argv[1:]))
    preprocess = oc.transform.image_transform(32, is_train=False)
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p)) for p in paths])
        img, txt, scale = ref(images, oc.tokenize([f"a photo of {x}." for x in LABELS]))
        expected = (scale * img @ txt.T).softmax(dim=-1)
    for path, row in zip(paths, expected):
        ours = torch.tensor([result[str(path)][label] for label in LABELS])
        torch.testing.assert_close(ours, row, atol=1e-5, rtol=0)
    out = capsys.readouterr().out
    for path in paths:
        assert str(path) in out
    best = LABELS[int(expected[0].argmax())]
    first_table = out.split(str(paths[1]))[0]
    assert first_table.splitlines()[2].split()[1:3] == best.split()[:2]

    assert main(argv) == 0  # the command line itself runs


def test_preprocess_equals_open_clip_transform(setup):
    oc, _, _, paths, _ = setup
    preprocess = oc.transform.image_transform(224, is_train=False)
    for path in paths:
        torch.testing.assert_close(
            clip_preprocess([path], size=224)[0], preprocess(Image.open(path)), atol=0, rtol=0
        )


def test_bad_input_is_named(setup, tmp_path, capsys):
    _, _, root, paths, vocab = setup
    base = ["zeroshot", "--weights", str(root / "weights.pt"), "--format", "open_clip",
            "--vocab", vocab]  # fmt: skip
    with pytest.raises(ValueError, match="--labels has no labels"):
        main([*base, "--labels", " , ", str(paths[0])])
    for template in ("a photo", "{}{}", "{0:>20000000}", "{x} {}"):  # refused before any work
        with pytest.raises(SystemExit):
            main([*base, "--labels", "a,b", "--template", template, str(paths[0])])
        assert "error: --template must contain exactly one '{}'" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        main([*base, "--labels", "a,b", str(tmp_path / "broken.png")])
    with pytest.raises(ConversionError, match="use format='open_clip'"):
        main([*base[:4], "hf", *base[5:], "--labels", "a,b", str(paths[0])])
