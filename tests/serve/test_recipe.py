"""`python -m train serve`: flags are checked before anything loads, and a run it cannot
serve is named."""

import pytest
import torch

import fmm
from models import vqvae
from tests.serve._runs import tiny_family_run
from train import checkpoint
from train.__main__ import cli, main
from train.loop import load_run
from train.recipes import serve
from train.recipes.clip import normalize_images


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-batch", "0", "--max-batch must be >= 1, got '0'"),
        ("--max-queue", "0", "--max-queue must be >= 1"),
        ("--max-wait-ms", "-1", "--max-wait-ms must be >= 0"),
        ("--timeout-s", "0", "--timeout-s must be > 0"),
        ("--timeout-s", "nan", "--timeout-s must be a finite number"),
        ("--max-body-mb", "0", "--max-body-mb must be > 0"),
        ("--header-timeout-s", "0", "--header-timeout-s must be > 0"),
        ("--body-timeout-s", "-1", "--body-timeout-s must be > 0"),
        ("--keep-alive-s", "0", "--keep-alive-s must be > 0"),
        ("--store-cache-mb", "-1", "--store-cache-mb must be >= 0"),
        ("--max-connections", "0", "--max-connections must be >= 1"),
        ("--port", "70000", "--port must be >= 0 and <= 65535"),
        ("--max-buffered-mb", "1", "--max-buffered-mb (1.0) must be at least --max-body-mb"),
    ],
)
def test_bad_flags_are_refused_by_name_in_one_line(tmp_path, capsys, flag, value, message):
    try:
        status = cli(["serve", "--ckpt", str(tmp_path), flag, value])
    except SystemExit as e:  # argparse's refusals leave from inside the parser
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_run_of_another_kind_is_refused_by_name(tmp_path):
    cfg = vqvae.vqvae_shapes_4x4()  # a family with nothing to serve: no embeddings, no drawing
    run_dir = tmp_path / "run"
    params = vqvae.init(cfg, fmm.random.key(0))
    checkpoint.save(run_dir, params, config={"model": "vqvae", "vqvae": cfg.to_dict()})
    with pytest.raises(checkpoint.CheckpointError, match="holds a 'vqvae' run, which `serve`"):
        main(["serve", "--ckpt", str(run_dir), "--port", "0"])
    with pytest.raises(checkpoint.CheckpointError, match=r"no config\.json"):
        main(["serve", "--ckpt", str(tmp_path / "missing"), "--port", "0"])


@pytest.mark.parametrize("family", ["flava", "albef", "bert"])
def test_every_family_with_serving_hooks_serves_its_embeddings(tmp_path, family):
    # One path for all: the family's FAMILY.serving, nothing in `serve` knows it by name.
    run = load_run(tiny_family_run(tmp_path / family, family))
    served = serve.load_model(run.path)
    serving, cfg = run.family.serving, run.cfg
    texts = ["a red circle", "a large blue square"]
    length = run.family.batch(cfg)["tokens"].limits["seq"]
    want = serving.embed_text(run.params, run.tokenizer.encode(texts, length), cfg=cfg)
    torch.testing.assert_close(served.embed_text(texts), want)
    assert served.name == family and served.dim == want.shape[-1]
    if serving.embed_image is not None:
        images = [torch.rand(served.image_shape) for _ in range(2)]
        direct = serving.embed_image(run.params, normalize_images(torch.stack(images)), cfg=cfg)
        torch.testing.assert_close(served.embed_image(images), direct)
    else:
        assert served.embed_image is None and served.image_shape is None
