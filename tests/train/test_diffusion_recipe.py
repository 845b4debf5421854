"""``python -m train diffusion`` for a few steps (its files, figures and refusals), its
batches against the adm family, and :func:`train.evaluate.frechet_distance`'s laws and
parity with scipy's matrix square root."""

import json
from argparse import Namespace

import pytest
import torch

import fmm
from models import adm
from models.family import check_batch
from tests.reference import reference
from train import checkpoint
from train.__main__ import UsageError, main
from train.data import WorldConfig
from train.evaluate import frechet_distance
from train.loop import load_run
from train.loop.load import MODEL_STATE_FILE
from train.recipes import diffusion

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--steps", "3", "--batch-size", "4", "--eval-per-class", "1"]
DIFFUSION = [*TINY, "--sample-steps", "2", "--width", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    main(["clip", "--out", str(root / "clip"), *TINY])
    main(["vqvae", "--out", str(root / "vqvae"), *TINY])
    main(["mmgpt", "--out", str(root / "mmgpt"), "--vqvae", str(root / "vqvae"),
          "--width", "32", "--layers", "1", *TINY])  # fmt: skip
    main(["diffusion", "--out", str(root / "diffusion"), "--judge", str(root / "clip"),
          "--compare-mmgpt", str(root / "mmgpt"), "--sample-from", "ema",
          "--prediction", "x0", "--snr-gamma", "2.5", *DIFFUSION])  # fmt: skip
    return root


def test_recipe_writes_samples_and_judged_figures_beside_mmgpt(runs):
    out = runs / "diffusion"
    for name in ("samples.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == PNG
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["sample_steps"] == 2
    assert metrics["sampled_images"] == 48  # one per colour x shape caption
    for prefix in ("", "mmgpt_"):
        for name in ("consistency", "consistency_unseen_combos"):
            assert 0.0 <= metrics[prefix + name] <= 1.0
        assert metrics[prefix + "frechet_distance"] >= 0.0
    assert 0.0 <= metrics["judge_on_real_scenes"] <= 1.0
    assert 0.0 <= metrics["frechet_real_scenes"] < metrics["frechet_distance"]
    run = load_run(out, family="adm")
    assert run.cfg.cond_key == "clip_text" and run.cfg.image_size == 16
    assert run.cfg.prediction == "x0" and run.cfg.snr_gamma == 2.5
    assert run.config["condition"] == "text" and run.config["clip_run"] == str(runs / "clip")
    assert metrics["sampled_from"] == "ema"
    # The EMA is saved beside the params: three updates in, it has moved off them.
    state = run.more_params(MODEL_STATE_FILE, like=diffusion.init_ema(run.cfg, run.params))
    assert state["step"].item() == 3
    gaps = fmm.tree.map(lambda e, p: (e - p).abs().max(), state["ema"], run.params)
    assert 0.0 < max(g.item() for g in fmm.tree.leaves(gaps)) < 1.0


def test_the_ema_follows_its_warmup_then_its_decay():
    params = {"w": torch.zeros(3)}
    _, state = diffusion.update_ema(
        diffusion.init_ema(None, params), {"w": torch.ones(3)}, cfg=None
    )
    # The first update weighs the new params by 1 - 1/10: a short run forgets its init.
    assert torch.allclose(state["ema"]["w"], torch.full((3,), 0.9))
    assert state["step"].item() == 1 and params["w"].eq(0).all()  # inputs untouched
    assert diffusion.ema_decay(torch.tensor(10**6)).item() == pytest.approx(diffusion.EMA_DECAY)


@pytest.mark.parametrize("condition", diffusion.CONDITIONS)
def test_training_batches_fit_the_family_with_either_condition(runs, condition):
    encoder = load_run(runs / "clip", family="clip")
    args = Namespace(width=8, image_size=16, cond_dropout=0.1, condition=condition,
                     prediction="noise", snr_gamma=5.0, plain_mse=True)  # fmt: skip
    cfg = diffusion.model_config(args, encoder.cfg.embed_dim)
    assert cfg.prediction == "noise" and cfg.snr_gamma is None
    embed = diffusion.embedder(encoder, condition)
    batch = diffusion.scenes_and_conditions(
        WorldConfig(), embed, cfg, condition, torch.Generator().manual_seed(0), 3
    )
    check_batch(adm.FAMILY.batch(cfg), batch, where="scenes_and_conditions")
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    norms = batch[cfg.cond_key].norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


@pytest.mark.parametrize(
    ("flags", "error", "message"),
    [
        (["--image-size", "24"], UsageError, "--image-size"),
        (["--sample-steps", "0"], UsageError, "--sample-steps"),
        (["--cond-dropout", "1"], UsageError, "--cond-dropout"),
        (["--condition", "audio"], UsageError, "--condition"),
        (["--sample-from", "teacher"], UsageError, "--sample-from"),
        (["--prediction", "eps"], UsageError, "--prediction"),
        (["--snr-gamma", "0"], UsageError, "--snr-gamma"),
        (["--snr-gamma", "5", "--plain-mse"], UsageError, "not allowed with argument"),
        (["--width", "12"], SystemExit, "--width"),
        (["--cond-dropout", "0"], SystemExit, "--cond-dropout > 0"),
        (["--clip", "VQVAE"], checkpoint.CheckpointError, "not a run of the 'clip' family"),
        (["--compare-mmgpt", "CLIP"], checkpoint.CheckpointError, "'mmgpt' family"),
    ],
)
def test_bad_flags_are_refused_by_name_before_any_directory(runs, tmp_path, flags, error, message):
    flags = [str(runs / f.lower()) if f in ("VQVAE", "CLIP") else f for f in flags]
    out = tmp_path / "never"
    with pytest.raises(error) as caught:
        main(["diffusion", "--out", str(out), "--judge", str(runs / "clip"), *DIFFUSION, *flags])
    assert message in (caught.value.message if error is UsageError else str(caught.value))
    assert not out.exists()


def _features(n: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return scale * torch.randn(n, d, generator=g, dtype=torch.float64) @ mix


def test_frechet_distance_matches_scipys_matrix_square_root():
    linalg = reference("scipy.linalg")
    a, b = _features(300, 6, 0), _features(200, 6, 1, scale=0.5) + 0.3
    ca, cb = (torch.cov(x.T).numpy() for x in (a, b))
    root = linalg.sqrtm(ca @ cb).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + (ca + cb - 2 * root).trace()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def _with_moments(x: torch.Tensor, mean: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """``x`` whitened exactly (its own Cholesky factor), then given ``mean`` and the diagonal
    covariance ``diag(variances)``."""
    centred = x - x.mean(0)
    white = torch.linalg.solve_triangular(
        torch.linalg.cholesky(torch.cov(centred.T)), centred.T, upper=False
    ).T
    return white * variances.sqrt() + mean


def test_frechet_distance_laws():
    a = _features(400, 5, 2)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert frechet_distance(a + shift, a) == pytest.approx(shift.square().sum().item(), rel=1e-9)
    # Exactly diagonal covariances: the trace term is sum (sqrt(s_a) - sqrt(s_b))^2.
    sa, sb = torch.tensor([1.0, 4.0, 0.25]).double(), torch.tensor([2.0, 1.0, 9.0]).double()
    ma, mb = torch.tensor([0.0, 1.0, 2.0]).double(), torch.tensor([1.0, 1.0, -1.0]).double()
    x, y = _with_moments(_features(50, 3, 4), ma, sa), _with_moments(_features(70, 3, 5), mb, sb)
    closed = (ma - mb).square().sum() + (sa.sqrt() - sb.sqrt()).square().sum()
    assert frechet_distance(x, y) == pytest.approx(closed.item(), rel=1e-9)
    assert frechet_distance(a.float(), (a + shift).float()) == pytest.approx(
        frechet_distance(a, a + shift), rel=1e-5
    )


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (torch.zeros(1, 3), torch.zeros(4, 3), "a must be"),
        (torch.zeros(4, 3), torch.zeros(4), "b must be"),
        (torch.zeros(4, 3), torch.zeros(4, 2), "same width"),
    ],
)
def test_frechet_distance_refuses_bad_features(a, b, message):
    with pytest.raises(ValueError, match=message):
        frechet_distance(a, b)
